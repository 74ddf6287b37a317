"""Functions test_file.py runs in a fresh interpreter (support.run_child imports
this module by name), where faulthandler and the order of signal handlers
are the child's own."""

from __future__ import annotations

import faulthandler
import os
import signal


def touch_truncated(path: str, faulthandler_first: bool, reinstall: bool) -> list[int]:
    """Map ``path`` (four pages), cut it to one page, read the lost pages
    through a memoryview; faulthandler enabled before the region is made or
    after it (then the repair put back on top when ``reinstall``)."""
    from mmap_alloc import FileRegion, files

    page = os.sysconf("SC_PAGE_SIZE")
    with open(path, "wb") as f:
        f.write(b"\x07" * 4 * page)
    if faulthandler_first:
        faulthandler.enable()
    region = FileRegion.open(path, "r+")
    if not faulthandler_first:
        faulthandler.enable()
        if reinstall:
            files.install_repair()
    view = memoryview(region)
    os.truncate(path, page)
    return [view[0], view[2 * page], view[4 * page - 1]]


def foreign_sigbus(path: str, how: str) -> None:
    """With a file region mapped (the repair's handler installed) and
    faulthandler enabled, a SIGBUS that is not the library's: sent to the
    process, or a fault in a stdlib mmap of a truncated file."""
    import mmap

    from mmap_alloc import FileRegion

    page = os.sysconf("SC_PAGE_SIZE")
    faulthandler.enable()
    with open(path, "wb") as f:
        f.write(b"\x07" * 4 * page)
    region = FileRegion.open(path)
    assert region[0] == 7
    if how == "sent":
        signal.raise_signal(signal.SIGBUS)
    else:
        other = path + ".other"
        with open(other, "wb") as f:
            f.write(b"\x07" * 4 * page)
        with open(other, "r+b") as f:
            stdlib = mmap.mmap(f.fileno(), 0)
        os.truncate(other, page)
        print(stdlib[3 * page])
    print("survived")
