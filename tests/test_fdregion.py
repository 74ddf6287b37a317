"""What FileRegion and SharedRegion share through their base (_fdregion): each
keeps its own messages, and its with-statement and types."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from mmap_alloc import FileRegion, Perm, Region, SharedRegion
from mmap_alloc._linux import PAGE_SIZE as P
from support import on_return


def test_a_read_only_file_region_says_why_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(P))
    with FileRegion.open(path) as region:
        assert isinstance(region, Region)
        assert region.file_size == P

        def read_write() -> None:
            region.protect(Perm.READ | Perm.WRITE)

        for change in (read_write, region.make_writable):
            with pytest.raises(PermissionError) as info:
                change()
            assert str(info.value.strerror).endswith(
                ": the file is open read-only (mode 'r'), and the kernel refuses write access to "
                "a shared mapping of it; open it with 'r+' (shared) or 'c' (copy-on-write)"
            )
        with pytest.raises(TypeError) as refused:
            pickle.dumps(region)
        assert str(refused.value) == (
            "a FileRegion is pickled only by multiprocessing, which passes its file descriptor "
            "(pass it to a Process, Pool or Queue of multiprocessing or concurrent.futures); "
            "elsewhere, open the file again"
        )
    with pytest.raises(ValueError, match="region is closed"):
        region.__enter__()


def test_a_read_only_shared_region_says_why_write_is_refused() -> None:
    with SharedRegion.create(P) as owner:
        region = SharedRegion.from_fd(owner.fd, readonly=True)
        with region as entered:
            assert entered is region and isinstance(region, Region)
            assert region.file_size == os.fstat(region.fd).st_size == P
            with pytest.raises(PermissionError) as info:
                region.make_writable()
            assert str(info.value.strerror).endswith(
                ": the region is mapped read-only (readonly=True, or sealed against writing), "
                "and the kernel refuses it write access"
            )
            with pytest.raises(TypeError) as refused:
                pickle.dumps(region)
            assert str(refused.value).endswith(
                "concurrent.futures); to another program, send() it over a Unix socket"
            )
            assert str(refused.value).startswith("a SharedRegion is pickled only by")
        with pytest.raises(ValueError, match="region is closed"):
            region.__enter__()


def test_file_size_of_a_region_closed_as_it_is_read_is_a_value_error(tmp_path: Path) -> None:
    """Closed between the read of its descriptor and the fstat (a signal
    handler, a finalizer): the region's own error, not EBADF."""
    (tmp_path / "f").write_bytes(b"x" * P)
    regions: list[FileRegion | SharedRegion] = [FileRegion.open(tmp_path / "f")]
    regions.append(SharedRegion.create(P))
    for region in regions:
        getter = vars(type(region))["fd"].fget
        with on_return(getter, region.close), pytest.raises(ValueError, match="closed"):
            region.file_size  # noqa: B018
