"""Benchmark cases of file regions: FileRegion against the standard library's
``mmap.mmap`` on the same file (``python -m mmap_alloc bench --only file``).

- scanning a 64 MiB file in the page cache: ``find`` of a needle near its end
  and a slice of its last page, with the file opened and mapped in the timed
  operation, and with it mapped once before timing;
- the first sequential read of a 1 GiB sparse file (quick runs: 64 MiB), the
  page cache dropped before each (posix_fadvise DONTNEED): a FileRegion
  advised ``populate_read`` (one call faults every page in) or
  ``sequential``, against stdlib mmap with ``madvise(MADV_SEQUENTIAL)`` and
  with ``madvise(MADV_POPULATE_READ)``. A page is read by a strided numpy sum
  (one byte per page), the same for every variant.

The files are made on first use (the warm-up round) in a temporary folder,
and removed when the last case of the group is closed.
"""

from __future__ import annotations

import mmap
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .._linux import PAGE_SIZE, format_size
from ..files import FileRegion
from .harness import Case, Variant

if TYPE_CHECKING:
    from .cases import Scale

MiB, GiB = 1 << 20, 1 << 30
GROUP = "file regions"
OURS = "mmap_alloc FileRegion"
STDLIB = "stdlib mmap"
MADV_POPULATE_READ = 22  # mmap lacks the name before Python 3.13
NEEDLE = b"\xffmmap_alloc-needle\xff"


class _Files:
    """The two files, made on first use and removed by the last close."""

    def __init__(self, sparse_size: int, users: int) -> None:
        self.sparse_size = sparse_size
        self.users = users
        self._folder: str | None = None

    def _path(self, name: str) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="mmap_alloc-bench-")
        return os.path.join(self._folder, name)

    def scanned(self) -> str:
        """64 MiB of random bytes (the same every run) with the needle near
        the end and nowhere else, read once (so that the page cache holds it)."""
        path = self._path("scanned")
        if not os.path.exists(path):
            data = bytearray(random.Random(64).randbytes(64 * MiB).replace(b"\xff", b"\xfe"))
            at = len(data) - PAGE_SIZE - 200
            data[at : at + len(NEEDLE)] = NEEDLE
            with open(path, "wb") as f:
                f.write(data)
            with open(path, "rb") as f:
                while f.read(MiB):
                    pass
        return path

    def sparse(self) -> str:
        """A file of holes only: reading it reads no disk, only what the
        kernel does to map pages of it for the first time."""
        path = self._path("sparse")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(self.sparse_size)
        return path

    def close(self) -> None:
        self.users -= 1
        if self.users <= 0 and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def _scan(buffer: Any) -> None:
    found = buffer.find(NEEDLE)
    last = buffer[-PAGE_SIZE:]
    assert found > 0 and len(last) == PAGE_SIZE


def scan(scale: Scale, files: _Files) -> Iterator[Case]:
    """find() of a needle near the end of 64 MiB, and a slice of the last page."""

    def ours(n: int) -> None:
        path = files.scanned()
        for _ in range(n):
            with FileRegion.open(path) as region:
                _scan(region)

    def stdlib(n: int) -> None:
        path = files.scanned()
        for _ in range(n):
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            with mapped:
                _scan(mapped)

    yield Case(
        "file: open a 64 MiB file, find a needle at its end, slice its last page",
        GROUP,
        1,
        (Variant(OURS, ours), Variant(STDLIB, stdlib)),
        target=1.0,
        note="the file in the page cache; open, map, scan, close per op",
    )
    opened: dict[str, Any] = {}

    def mapped(name: str) -> Callable[[int], None]:
        def run(n: int) -> None:
            if name not in opened:
                path = files.scanned()
                with open(path, "rb") as f:
                    opened[STDLIB] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                opened[OURS] = FileRegion.open(path)
            buffer = opened[name]
            for _ in range(n):
                _scan(buffer)

        return run

    def close() -> None:
        for buffer in opened.values():
            buffer.close()
        opened.clear()
        files.close()

    yield Case(
        "file: find a needle at the end of a mapped 64 MiB file, slice its last page",
        GROUP,
        1,
        (Variant(OURS, mapped(OURS)), Variant(STDLIB, mapped(STDLIB))),
        target=1.0,
        note="mapped once before timing; scan per op",
        close=close,
    )


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def first_read(scale: Scale, files: _Files) -> Iterator[Case]:
    """Map a sparse file for the first time and read every page of it."""
    import numpy as np

    def touch(buffer: Any) -> None:
        np.frombuffer(buffer, np.uint8)[::PAGE_SIZE].sum()

    def ours(advice: str) -> Callable[[int], None]:
        def run(n: int) -> None:
            path = files.sparse()
            for _ in range(n):
                _drop_cache(path)
                with FileRegion.open(path) as region:
                    region.advise(advice)
                    with memoryview(region) as view:
                        touch(view)

        return run

    def stdlib(advice: int) -> Callable[[int], None]:
        def run(n: int) -> None:
            path = files.sparse()
            for _ in range(n):
                _drop_cache(path)
                with open(path, "rb") as f:
                    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                with mapped:
                    mapped.madvise(advice)
                    touch(mapped)

        return run

    yield Case(
        f"file: first sequential read of a {format_size(files.sparse_size)} sparse file",
        GROUP,
        1,
        (
            Variant(f"{OURS}, advise('populate_read')", ours("populate_read")),
            Variant(f"{OURS}, advise('sequential')", ours("sequential")),
            Variant(f"{STDLIB}, madvise(MADV_SEQUENTIAL)", stdlib(mmap.MADV_SEQUENTIAL)),
            Variant(f"{STDLIB}, madvise(MADV_POPULATE_READ)", stdlib(MADV_POPULATE_READ)),
        ),
        subject=f"{OURS}, advise('populate_read')",
        reference=f"{STDLIB}, madvise(MADV_SEQUENTIAL)",
        note="page cache dropped before each op; a strided numpy sum reads one byte a page",
        close=files.close,
    )


def file_cases(scale: Scale) -> Iterator[Case]:
    """The file region group: scanning, and a first read (with numpy)."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        reading = False
    else:
        reading = True
    files = _Files(64 * MiB if scale.quick else GiB, users=2 if reading else 1)
    yield from scan(scale, files)
    if reading:
        yield from first_read(scale, files)
