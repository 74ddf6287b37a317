"""FileRegion: files mapped like stdlib mmap and numpy.memmap: the modes,
every argument and error (nothing left open or mapped after a failure), what
a Region does on a file, flush, resize and refresh. What a truncation does
(nothing fatal, through any exporter) is in test_file_truncation.py."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest

from mmap_alloc import FileRegion, Perm, Region, _mman
from mmap_alloc._linux import PAGE_SIZE as P
from support import (
    RESIDENCY,
    emulated_skip,
    open_fds,
    pattern,
    rss,
    run_forked,
    skip_if_emulated,
)

GiB = 1 << 30
DATA = pattern(8 * P)
needs_numpy = pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A file of eight pages of DATA."""
    file = tmp_path / "data.bin"
    file.write_bytes(DATA)
    return file


def inode_mapped(inode: int) -> bool:
    with open("/proc/self/maps") as maps:
        return any(len(f := line.split()) > 4 and f[4] == str(inode) for line in maps)


# ---------------------------------------------------------------- the modes


def test_mode_r_reads_the_file_and_refuses_writes(path: Path) -> None:
    with FileRegion.open(path) as region:
        assert (region.mode, region.size, region.perms) == ("r", 8 * P, Perm.READ)
        assert region[:] == DATA
        with pytest.raises(TypeError, match="read-only"):
            region[0] = 1


def test_mode_r_plus_writes_reach_the_file(path: Path) -> None:
    with FileRegion.open(path, "r+") as region:
        region[P : P + 5] = b"hello"
        assert path.read_bytes()[P : P + 5] == b"hello"


def test_mode_c_writes_stay_in_this_process(path: Path) -> None:
    with FileRegion.open(path, "c") as region:
        region[:5] = b"mine!"
        assert region[:5] == b"mine!"
        assert path.read_bytes() == DATA


def test_mode_w_plus_creates_the_file_allocated_and_zeroed(tmp_path: Path) -> None:
    new = tmp_path / "new.bin"
    with FileRegion.open(new, "w+", size=3 * P + 1) as region:
        assert region[:] == bytes(3 * P + 1)
        region[-1] = 9
        st = os.stat(new)
        assert st.st_size == 3 * P + 1
        assert st.st_blocks * 512 >= 3 * P + 1  # on the disk now, not at a later write
    assert new.read_bytes()[-1] == 9


def test_mode_w_plus_truncates_an_existing_file(path: Path) -> None:
    with FileRegion.open(path, "w+", size=P) as region:
        assert region[:] == bytes(P)
    assert path.stat().st_size == P


def test_a_descriptor_is_duplicated_and_the_caller_keeps_theirs(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with FileRegion.open(fd, "r+") as region:
            assert region.fd != fd
            assert region.path is None
            region[:2] = b"fd"
        assert os.pread(fd, 2, 0) == b"fd"  # still open
    finally:
        os.close(fd)


def test_the_properties_say_what_was_opened(path: Path) -> None:
    with FileRegion.open(str(path), "c", offset=P, length=2 * P) as region:
        assert (region.path, region.mode, region.offset) == (str(path), "c", P)
        assert region.file_size == 8 * P
        assert not region.truncated
        assert os.path.samestat(os.fstat(region.fd), path.stat())
        assert fcntl_cloexec(region.fd)
        assert "mode='c'" in repr(region) and f"offset={P}" in repr(region)
    assert "closed" in repr(region)


def fcntl_cloexec(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_offset_and_length_map_that_part_of_the_file(path: Path) -> None:
    with FileRegion.open(path, offset=2 * P, length=P + 3) as region:
        assert region[:] == DATA[2 * P : 3 * P + 3]
    with FileRegion.open(path, offset=7 * P) as region:
        assert region[:] == DATA[7 * P :]


@needs_numpy
def test_a_header_of_another_size_is_skipped_with_ndarray_offset(tmp_path: Path) -> None:
    import numpy as np

    saved = np.arange(1000, dtype=np.float64)
    np.save(tmp_path / "a.npy", saved)
    with open(tmp_path / "a.npy", "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        header = f.tell()
    with FileRegion.open(tmp_path / "a.npy") as region:
        array = region.ndarray(np.float64, 1000, offset=header)
        assert (array == saved).all() and not array.flags.writeable
        del array


# ---------------------------------------------------------------- arguments and errors


BAD_ARGUMENTS: list[tuple[str, dict[str, object], type[Exception], str]] = [
    ("mode", {"mode": "rw"}, ValueError, r"mode must be one of 'r', 'r\+', 'c', 'w\+'.*'rw'"),
    ("mode type", {"mode": 1}, ValueError, "mode must be one of"),
    ("negative offset", {"offset": -P}, ValueError, "offset must not be negative"),
    ("unaligned offset", {"offset": 100}, ValueError, r"multiple of the page size.*ndarray\(\)"),
    ("offset past the end", {"offset": 8 * P}, ValueError, "at or past the end of file"),
    ("offset type", {"offset": 1.5}, TypeError, "offset must be an integer"),
    ("zero length", {"length": 0}, ValueError, "length must be positive, got 0"),
    ("length past the end", {"offset": P, "length": 8 * P}, ValueError, "past the end of file"),
    ("size without w+", {"mode": "r+", "size": P}, ValueError, "size is for mode 'w\\+' only"),
    ("w+ without size", {"mode": "w+"}, ValueError, "size .in bytes. is required"),
    ("w+ size zero", {"mode": "w+", "size": 0}, ValueError, "size must be positive"),
]


@pytest.mark.parametrize(
    ("options", "kind", "message"),
    [case[1:] for case in BAD_ARGUMENTS],
    ids=[case[0] for case in BAD_ARGUMENTS],
)
def test_a_bad_argument_is_refused_naming_it_and_leaves_nothing_open(
    path: Path, options: dict[str, object], kind: type[Exception], message: str
) -> None:
    before = open_fds()
    with pytest.raises(kind, match=message):
        FileRegion.open(path, **options)  # type: ignore[arg-type]
    assert open_fds() == before
    assert not inode_mapped(path.stat().st_ino)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").touch()
    with pytest.raises(ValueError, match="the file is empty"):
        FileRegion.open(tmp_path / "empty")


def test_a_missing_file_is_the_kernels_error_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        FileRegion.open(tmp_path / "nothing")
    assert caught.value.filename == str(tmp_path / "nothing")


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_a_directory_is_a_directory_error_with_the_path(tmp_path: Path, mode: str) -> None:
    before = open_fds()
    with pytest.raises(IsADirectoryError) as caught:
        FileRegion.open(tmp_path, mode)
    assert caught.value.filename == str(tmp_path)
    assert open_fds() == before


def _open_without_permission(path: str) -> None:
    os.setgid(65534)
    os.setuid(65534)  # root reads anything: a user who may not
    with pytest.raises(PermissionError) as caught:
        FileRegion.open(path)
    assert caught.value.filename == path


def test_no_permission_is_the_kernels_error_with_the_path(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0)
        with pytest.raises(PermissionError):
            FileRegion.open(path)
        return
    path.parent.chmod(0o755)
    path.chmod(0o600)
    run_forked(_open_without_permission, str(path))


def test_descriptors_opened_for_less_than_the_mode_needs_are_refused(path: Path) -> None:
    read_only, write_only = os.open(path, os.O_RDONLY), os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(PermissionError, match="open read-only: mode 'r\\+' needs"):
            FileRegion.open(read_only, "r+")
        with pytest.raises(PermissionError, match="write-only"):
            FileRegion.open(write_only)
        FileRegion.open(read_only, "c").close()  # copy-on-write needs reading only
    finally:
        os.close(read_only)
        os.close(write_only)


@pytest.mark.parametrize(
    ("file", "kind", "message"),
    [
        (True, TypeError, "file must be a path .* or a file descriptor .*, not bool"),
        (1.0, TypeError, "not float"),
        (-1, ValueError, "negative descriptor"),
        (1 << 20, OSError, "not an open file descriptor"),
    ],
)
def test_a_bad_file_argument_is_refused(file: object, kind: type[Exception], message: str) -> None:
    with pytest.raises(kind, match=message):
        FileRegion.open(file)  # type: ignore[arg-type]


SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"


@pytest.mark.skipif(not os.path.exists(SYSFS), reason=f"needs {SYSFS}")
def test_a_refusal_of_the_kernel_leaves_nothing_open() -> None:
    before, mapped = open_fds(), _mman.mapped_bytes()
    fd = os.open(SYSFS, os.O_RDONLY)
    try:
        for file in (SYSFS, fd):  # the region's own descriptor, and a duplicate
            with pytest.raises(OSError, match="its file system does not map files") as caught:
                FileRegion.open(file)
            assert caught.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    assert open_fds() == before
    assert _mman.mapped_bytes() == mapped


# ---------------------------------------------------------------- a Region on a file


def test_a_file_region_is_a_bytes_like_region(path: Path) -> None:
    with FileRegion.open(path) as region:
        assert isinstance(region, Region)
        needle = DATA[5 * P + 10 : 5 * P + 30]
        assert region.find(needle) == DATA.find(needle)
        assert region.rfind(DATA[:3]) == DATA.rfind(DATA[:3])
        assert needle in region
        assert region[::P] == DATA[::P]
        assert bytes(region.view(P, 10)) == DATA[P : P + 10]
        assert next(iter(region)) == DATA[0]


def test_close_unmaps_and_closes_the_descriptor(path: Path) -> None:
    region = FileRegion.open(path)
    fd = region.fd
    region.close()
    region.close()  # closing twice does nothing
    assert not inode_mapped(path.stat().st_ino)
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="region is closed"):
        region.flush()


def test_a_buffer_keeps_it_open(path: Path) -> None:
    with FileRegion.open(path) as region, memoryview(region) as view:
        with pytest.raises(BufferError):
            region.close()
        assert view[0] == DATA[0]


def test_protect_works_within_what_the_mode_allows(path: Path) -> None:
    with FileRegion.open(path) as region:
        with pytest.raises(PermissionError, match=r"open read-only .mode 'r'"):
            region.protect(Perm.READ | Perm.WRITE)
        region.protect(Perm.NONE, P, P)
        assert region.protections()[1] == (P, P, Perm.NONE)
    with FileRegion.open(path, "c") as region:
        region.protect(Perm.READ, 0, P)
        with pytest.raises(TypeError, match="read-only"):
            region[0] = 1


def test_advice_and_populate_work_on_sub_ranges(path: Path) -> None:
    with FileRegion.open(path) as region:
        region.advise("sequential")
        region.advise("willneed", P, 2 * P)
        region.advise("dontneed")
        region.advise("populate_read", 2 * P, 2 * P)
        skip_if_emulated(RESIDENCY)
        assert _mman.residency(region.address + 2 * P, 2 * P) == b"\1\1"


def test_lock_and_stats(path: Path) -> None:
    with FileRegion.open(path, "r+") as region:
        region.lock(0, P)
        assert region.stats().locked_bytes == P
        region.unlock()
        assert region.stats().size == 8 * P


@emulated_skip("the emulator refuses a 64 GiB mapping of a file (ENOMEM): its guest address space")
def test_a_64_gib_sparse_file_maps_read_only_without_memory(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 * GiB)
    before = rss()
    with FileRegion.open(sparse) as region:
        assert region.size == 64 * GiB
        assert rss() - before < 16 << 20
        region.advise("populate_read", 32 * GiB, 1 << 20)  # advice on a sub-range
        assert region[32 * GiB : 32 * GiB + 4] == bytes(4)
        assert rss() - before < 32 << 20


# ---------------------------------------------------------------- flush


def test_flush_writes_the_range_to_the_file(path: Path) -> None:
    with FileRegion.open(path, "r+") as region:
        region[:4] = b"sync"
        region.flush()
        region.flush(P, 2 * P)
        region.flush(length=1)
        with pytest.raises(ValueError, match="offset"):
            region.flush(3)
    assert path.read_bytes()[:4] == b"sync"


@pytest.mark.parametrize("mode", ["r", "c"])
def test_flush_does_nothing_for_modes_that_do_not_write_the_file(path: Path, mode: str) -> None:
    with FileRegion.open(path, mode) as region:
        if mode == "c":
            region[:4] = b"mine"
        region.flush()
    assert path.read_bytes() == DATA


# ---------------------------------------------------------------- resize


@pytest.mark.parametrize("mode", ["r+", "w+"])
def test_resize_grows_the_file_and_the_region_new_bytes_zero_and_allocated(
    path: Path, mode: str
) -> None:
    size = 8 * P if mode == "w+" else None
    with FileRegion.open(path, mode, size=size) as region:
        region[:2] = b"ok"
        region.resize(20 * P + 5)
        assert (region.size, region.file_size) == (20 * P + 5, 20 * P + 5)
        assert region[8 * P :] == bytes(12 * P + 5)
        assert region[:2] == b"ok"
        assert path.stat().st_blocks * 512 >= 20 * P
        region[-1] = 1
    assert path.read_bytes()[-1] == 1


def test_resize_of_a_region_further_in_the_file_moves_the_files_end(path: Path) -> None:
    with FileRegion.open(path, "r+", offset=2 * P, length=P) as region:
        region.resize(3 * P)
        assert region.file_size == 5 * P  # offset + new size, as stdlib mmap.resize()
        region.resize(P + 1)
        assert (region.size, region.file_size) == (P + 1, 3 * P + 1)
    assert path.read_bytes() == DATA[: 3 * P + 1]


def test_resize_shrinks_the_file(path: Path) -> None:
    with FileRegion.open(path, "r+") as region:
        region.resize(P + 3)
        assert (region.size, region.capacity, region.file_size) == (P + 3, 2 * P, P + 3)
        assert region[:] == DATA[: P + 3]


@pytest.mark.parametrize("mode", ["r", "c"])
def test_resize_needs_a_mode_that_changes_the_file(path: Path, mode: str) -> None:
    with (
        FileRegion.open(path, mode) as region,
        pytest.raises(ValueError, match=f"needs mode 'r\\+' or 'w\\+'.*mode '{mode}'"),
    ):
        region.resize(P)
    assert path.stat().st_size == 8 * P


def test_resize_with_an_export_grows_in_place_or_changes_nothing(path: Path) -> None:
    with FileRegion.open(path, "r+") as region, memoryview(region):
        address = region.address
        try:
            region.resize(9 * P)
        except BufferError:
            assert region.file_size == 8 * P
        else:
            assert region.address == address
        with pytest.raises(BufferError):
            region.resize(P)


def failing_file_resize(monkeypatch: pytest.MonkeyPatch, failures: list[OSError]) -> None:
    """files.py's resize call raises each of failures once, then resizes."""
    resize = _mman._file_resize

    def failing_first(region: Region, n: int) -> None:
        if failures:
            raise failures.pop(0)
        resize(region, n)

    monkeypatch.setattr("mmap_alloc.files._file_resize", failing_first)


def test_resize_runs_again_after_a_signal_interrupts_fallocate(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_file_resize(monkeypatch, [InterruptedError(errno.EINTR, "interrupted", "fallocate")])
    with FileRegion.open(path, "r+") as region:
        region.resize(12 * P)
        assert (region.size, region.file_size) == (12 * P, 12 * P)


def test_resize_writes_the_blocks_itself_once_where_fallocate_is_unsupported(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unsupported = OSError(errno.EOPNOTSUPP, "not supported", "fallocate")
    failing_file_resize(monkeypatch, [unsupported])
    with FileRegion.open(path, "r+") as region:
        region.resize(12 * P)
        assert (region.size, region.file_size) == (12 * P, 12 * P)
        failing_file_resize(monkeypatch, [unsupported, unsupported])
        with pytest.raises(OSError, match="fallocate failed: not supported"):
            region.resize(16 * P)  # the C library writes the blocks once, not forever
        assert region.size == 12 * P


def test_a_full_disk_is_an_error_of_resize_never_a_sigbus_later(small_tmpfs: Path) -> None:
    with FileRegion.open(small_tmpfs / "f", "w+", size=P) as region:
        with pytest.raises(OSError, match="no room for it") as caught:
            region.resize(1 << 20)
        assert caught.value.errno == errno.ENOSPC
        assert (region.size, region.file_size) == (P, P)
        region.resize(8 * P)  # what fits, fits, and every byte of it can be written
        region[:] = b"\1" * (8 * P)
    before = open_fds()
    with pytest.raises(OSError, match="cannot create"):
        FileRegion.open(small_tmpfs / "g", "w+", size=1 << 20)
    assert open_fds() == before


# ---------------------------------------------------------------- refresh


def test_refresh_maps_what_another_process_grew(path: Path) -> None:
    with FileRegion.open(path, "r+") as region:
        with open(path, "ab") as f:
            f.write(b"\5" * (3 * P))
        assert region.size == 8 * P
        assert region.refresh() == 11 * P
        assert region[8 * P :] == b"\5" * (3 * P)


def test_refresh_keeps_to_the_length_given(path: Path) -> None:
    with FileRegion.open(path, length=2 * P) as region:
        with open(path, "ab") as f:
            f.write(b"\5" * P)
        assert region.refresh() == 2 * P
        os.truncate(path, P + 1)
        assert region.refresh() == P + 1
        assert region.capacity == 2 * P


def test_refresh_of_a_file_cut_to_before_the_region_is_a_value_error(path: Path) -> None:
    with FileRegion.open(path, offset=4 * P) as region:
        os.truncate(path, 2 * P)
        with pytest.raises(ValueError, match="cut short to before the region's offset"):
            region.refresh()
        assert region.size == 4 * P


def test_every_mode_refreshes(path: Path) -> None:
    for mode in ("r", "r+", "c"):
        with FileRegion.open(path, mode) as region:
            os.truncate(path, 3 * P)
            assert region.refresh() == 3 * P
            assert region[:] == DATA[: 3 * P]
            path.write_bytes(DATA)


# ---------------------------------------------------------------- what a file is


@pytest.mark.parametrize(
    "make",
    [os.mkfifo, lambda p: os.symlink("/dev/null", p)],
    ids=["fifo", "device"],
)
def test_only_regular_files_are_mapped(tmp_path: Path, make: Callable[[Path], None]) -> None:
    make(tmp_path / "x")
    kind = stat.S_IFMT(os.stat(tmp_path / "x").st_mode)
    assert kind != stat.S_IFREG
    with pytest.raises(OSError, match="regular files only") as caught:
        FileRegion.open(tmp_path / "x")
    assert caught.value.errno == errno.ENODEV


def test_a_file_region_is_not_traced_by_tracemalloc(path: Path) -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        with FileRegion.open(path, "r+") as region:
            region.resize(16 * P)
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.DomainFilter(inclusive=True, domain=_mman.TRACE_DOMAIN)]
            )
            assert sum(trace.size for trace in snapshot.traces) == 0  # the file's pages
    finally:
        tracemalloc.stop()
