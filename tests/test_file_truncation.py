"""No truncation can crash the process: when the file under a FileRegion (or
a SharedRegion without the shrink seal) shrinks, the pages past its new end
read as zeros through every exporter, writes there stay in this process,
the region's own methods raise FileTruncatedError for them until refresh(),
and a SIGBUS that is not the library's still kills the process as before.

Each case that could crash runs in a child process (support.run_forked), so a
crash fails that test and names it; the cases about faulthandler run in a
fresh interpreter (support.run_child), with stderr to read."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

from mmap_alloc import (
    FileRegion,
    FileTruncatedError,
    MapAllocError,
    Perm,
    SharedRegion,
    _mman,
    files,
)
from mmap_alloc._linux import PAGE_SIZE as P
from support import (
    FORGED_FAULT,
    HUGETLB,
    emulated_skip,
    pattern,
    run_child,
    run_forked,
    run_in_child,
    skip_if_emulated,
)

DATA = pattern(8 * P)
needs_numpy = pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "data.bin"
    file.write_bytes(DATA)
    return file


def cut(path: Path | str, size: int) -> None:
    """Truncate the file from another process, as the cases the issue names do."""
    subprocess.run(
        [sys.executable, "-c", f"import os; os.truncate({str(path)!r}, {size})"], check=True
    )


# ---------------------------------------------------------------- through every exporter


def _numpy_reads_zeros_and_writes_stay_here(path: str, mode: str) -> None:
    import numpy as np

    region = FileRegion.open(path, mode)
    array = region.ndarray(np.uint8, 8 * P)
    cut(path, 2 * P + 7)
    assert bytes(array[: 2 * P + 7]) == DATA[: 2 * P + 7]
    assert not array[2 * P + 7 :].any()  # the rest of the last page, and the lost pages
    assert region.truncated
    if mode != "r":
        array[5 * P] = 9
        assert array[5 * P] == 9  # a private page: this process sees it
        assert os.stat(path).st_size == 2 * P + 7  # never the file
        with open(path, "rb") as f:
            assert f.read() == DATA[: 2 * P + 7]


@needs_numpy
@pytest.mark.parametrize("mode", ["r", "r+", "c"])
def test_numpy_reads_zeros_past_the_end_and_writes_there_stay_here(path: Path, mode: str) -> None:
    run_forked(_numpy_reads_zeros_and_writes_stay_here, str(path), mode)


def _memoryview_and_ctypes(path: str) -> None:
    region = FileRegion.open(path, "r+")
    view = memoryview(region)
    c_array = (ctypes.c_ubyte * (8 * P)).from_buffer(region)
    os.truncate(path, P)
    assert view[7 * P] == 0
    assert c_array[6 * P] == 0
    assert ctypes.string_at(region.address + 4 * P, 4) == bytes(4)  # a raw pointer too
    c_array[3 * P] = 5
    assert view[3 * P] == 5


def test_memoryview_ctypes_and_raw_pointers_read_zeros(path: Path) -> None:
    run_forked(_memoryview_and_ctypes, str(path))


def _own_methods_raise(path: str) -> None:
    region = FileRegion.open(path, "r+")
    os.truncate(path, 2 * P)
    with pytest.raises(FileTruncatedError) as caught:
        region[:]  # the copy itself finds the lost pages
    assert caught.value.size == 2 * P
    error = caught.value
    assert isinstance(error, MapAllocError) and isinstance(error, OSError)
    assert error.errno == 6 and "refresh()" in str(error)
    assert region.truncated
    lost = 3 * P
    calls: list[Callable[[], object]] = [
        lambda: region[lost],
        lambda: region[lost:],
        lambda: region.__setitem__(lost, 1),
        lambda: region.__setitem__(slice(lost, lost + 2), b"ab"),
        lambda: region.find(b"x", lost),
        lambda: b"x" in region,
        lambda: list(iter(region)),
        lambda: region.view(lost, 1),
        lambda: memoryview(region),
        lambda: region.protect(Perm.READ, lost, P),
        lambda: region.advise("willneed", lost, P),
        region.flush,
    ]
    for call in calls:
        with pytest.raises(FileTruncatedError):
            call()
    assert region[: 2 * P] == DATA[: 2 * P]  # what the file still holds is there
    assert region.find(DATA[P : P + 8], 0, 2 * P) == DATA.find(DATA[P : P + 8])
    with open(path, "ab") as f:
        f.write(b"\3" * (6 * P))
    assert region.refresh() == 8 * P
    assert not region.truncated
    assert region[2 * P :] == b"\3" * (6 * P)  # the file again, where the zeros were
    region.close()


def test_the_regions_own_methods_raise_file_truncated_error_until_refresh(path: Path) -> None:
    run_forked(_own_methods_raise, str(path))


def _refresh_maps_again_under_an_array(path: str) -> None:
    import numpy as np

    region = FileRegion.open(path, "r+")
    array = region.ndarray(np.uint8, 8 * P)
    cut(path, P)
    assert array.sum() == sum(DATA[:P])
    with open(path, "ab") as f:
        f.write(b"\4" * (7 * P))
    assert region.refresh() == 8 * P  # in place: the array lives
    assert bytes(array[P:]) == b"\4" * (7 * P)
    array[-1] = 8
    with open(path, "rb") as f:
        assert f.read()[-1] == 8  # shared with the file again


@needs_numpy
def test_refresh_maps_the_file_again_in_place_under_an_array(path: Path) -> None:
    run_forked(_refresh_maps_again_under_an_array, str(path))


def _a_system_call_into_a_lost_page(path: str) -> None:
    region = FileRegion.open(path, "r+")
    view = memoryview(region)
    os.truncate(path, P)
    source = os.open(path, os.O_RDONLY)
    with pytest.raises(OSError) as caught:
        os.readv(source, [view[4 * P : 5 * P]])  # the kernel's copy faults: EFAULT, no signal
    assert caught.value.errno == 14
    assert view[4 * P] == 0  # a touch from user space repairs the page
    assert os.preadv(source, [view[4 * P : 5 * P]], 0) == P


def test_a_system_call_into_a_lost_page_is_efault_until_a_touch_repairs_it(path: Path) -> None:
    run_forked(_a_system_call_into_a_lost_page, str(path))


def _shared_region_without_the_seal() -> None:
    region = SharedRegion.create(4 * P, seal_shrink=False)
    peer = SharedRegion.from_fd(region.fd, require_seal=False)
    view = memoryview(peer)
    os.ftruncate(region.fd, P)
    assert view[3 * P] == 0
    del view
    with pytest.raises(FileTruncatedError):
        peer[3 * P]
    assert peer.refresh() == P and peer.capacity == P


def test_a_shared_region_without_the_shrink_seal_survives_a_truncation() -> None:
    run_forked(_shared_region_without_the_seal)


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """Four free 2 MiB hugetlb pages, reserved for the test and given back after."""
    skip_if_emulated(HUGETLB)
    nr = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
    if os.geteuid() != 0 or not nr.exists():
        pytest.skip("reserving hugetlb pages needs root and 2 MiB huge pages")
    nr.write_text(str(int(nr.read_text()) + 4))
    try:
        if int((nr.parent / "free_hugepages").read_text()) < 4:
            pytest.skip("the kernel could not reserve 4 free 2 MiB pages")
        yield 2 << 20
    finally:
        nr.write_text(str(max(0, int(nr.read_text()) - 4)))


def _hugetlb_files_are_repaired_in_huge_pages(huge: int) -> None:
    import numpy as np

    fd = os.memfd_create("huge", os.MFD_HUGETLB)  # a file of hugetlbfs
    os.ftruncate(fd, 3 * huge)
    region = FileRegion.open(fd, "r+")
    assert (region.capacity, region.backing) == (3 * huge, "hugetlb")
    array = region.ndarray(np.uint8, 3 * huge)
    array[:] = 3
    os.ftruncate(fd, huge)
    assert array.sum() == 3 * huge  # two huge pages of zeros
    del array
    assert region.refresh() == huge and region.capacity == huge
    shared = SharedRegion.create(2 * huge, huge="hugetlb", seal_shrink=False)
    view = memoryview(shared)
    os.ftruncate(shared.fd, huge)
    assert view[huge + 5] == 0


@needs_numpy
def test_hugetlb_files_are_repaired_in_whole_huge_pages(huge_pages: int) -> None:
    run_forked(_hugetlb_files_are_repaired_in_huge_pages, huge_pages)


# ---------------------------------------------------------------- many regions, many threads


def _many_regions_from_threads(folder: str) -> None:
    regions = []
    for i in range(64):
        path = f"{folder}/{i}"
        with open(path, "wb") as f:
            f.write(bytes([i + 1]) * (16 * P))
        regions.append((path, FileRegion.open(path, ("r", "r+", "c")[i % 3])))
    views = [memoryview(region) for _, region in regions]
    for path, _ in regions:
        os.truncate(path, 3 * P + 5)
    failures: list[BaseException] = []
    done = threading.Event()
    deadline = time.monotonic() + 2.0
    counts = {"churn": 0, "flip": 0}

    def reader(k: int) -> None:
        buffer = ctypes.create_string_buffer(16 * P)
        try:
            rounds = 0
            while rounds < 10 or time.monotonic() < deadline:  # while the others churn
                rounds += 1
                for i in range(k, 64, 4):
                    ctypes.memmove(buffer, regions[i][1].address, 16 * P)  # no GIL held
                    assert buffer.raw[: 3 * P + 5] == bytes([i + 1]) * (3 * P + 5), i
                    assert buffer.raw[3 * P + 5 :] == bytes(13 * P - 5), i
        except BaseException as exc:
            failures.append(exc)

    flip = f"{folder}/flip"
    with open(flip, "wb") as f:
        f.write(b"\1" * (16 * P))
    flipping = FileRegion.open(flip, "r+")
    flip_view = memoryview(flipping)

    def churn() -> None:  # meanwhile: regions made, grown, refreshed and closed
        k = 0
        while not done.is_set():
            path = f"{folder}/churn"
            with open(path, "wb") as f:
                f.write(b"\1" * P)
            other = FileRegion.open(path, "r+")
            other.resize(4 * P)
            regions[k % 64][1].refresh()
            other.close()
            # a file cut short and grown again, refreshed under a reader
            os.truncate(flip, P if k % 2 else 16 * P)
            flipping.refresh()
            k += 1
            counts["churn"] = k

    def flip_reader() -> None:
        buffer = ctypes.create_string_buffer(16 * P)
        while not done.is_set():
            ctypes.memmove(buffer, flipping.address, 16 * P)
            counts["flip"] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    others = [threading.Thread(target=churn), threading.Thread(target=flip_reader)]
    for thread in [*threads, *others]:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    for thread in others:
        thread.join()
    assert not failures, failures
    # every kind of change happened under the readers (a free-threaded build,
    # where the kernel's calls take turns, churns fewer times in the 2 s)
    assert counts["churn"] > 2 and counts["flip"] > 10, counts
    del views, flip_view


def test_64_regions_read_from_4_threads_after_truncation(tmp_path: Path) -> None:
    run_forked(_many_regions_from_threads, str(tmp_path), timeout=240)


# ---------------------------------------------------------------- other SIGBUS, other handlers


def _sent(path: str) -> None:
    FileRegion.open(path).close()
    signal.raise_signal(signal.SIGBUS)


def _foreign_fault(path: str) -> None:
    region = FileRegion.open(path)
    with open(path, "r+b") as f:
        stdlib = mmap.mmap(f.fileno(), 0)
    os.truncate(path, P)
    assert region[0] == DATA[0]
    print(stdlib[5 * P])


@pytest.mark.parametrize("body", [_sent, _foreign_fault], ids=["sent", "stdlib-mmap"])
def test_a_sigbus_that_is_not_the_librarys_still_kills(
    path: Path, body: Callable[[str], None]
) -> None:
    assert run_in_child(lambda: body(str(path))) == -signal.SIGBUS


@pytest.mark.parametrize("how", ["sent", "stdlib-mmap"])
def test_a_foreign_sigbus_reaches_faulthandler_as_before(path: Path, how: str) -> None:
    done = run_child("file_workers", "foreign_sigbus", str(path), how)
    assert done.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in done.stderr
    assert "survived" not in done.stdout


@pytest.mark.parametrize(
    ("faulthandler_first", "reinstall"), [(True, False), (False, True)], ids=["before", "after"]
)
def test_faulthandler_enabled_first_or_after_dumps_nothing_for_a_repair(
    path: Path, faulthandler_first: bool, reinstall: bool
) -> None:
    done = run_child("file_workers", "touch_truncated", str(path), faulthandler_first, reinstall)
    assert done.check() == [7, 0, 0]
    assert "Fatal Python error" not in done.stderr


def test_a_handler_installed_later_without_chaining_turns_the_repair_off(path: Path) -> None:
    # faulthandler.enable() after the last region was made: documented, and
    # install_repair() (or the next region made) puts the repair back on top
    done = run_child("file_workers", "touch_truncated", str(path), False, False)
    assert done.returncode == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in done.stderr


def _reinstalled_by_the_next_region(path: str) -> None:
    import faulthandler

    region = FileRegion.open(path)
    faulthandler.enable()
    assert not files.repair_installed()
    FileRegion.open(path).close()
    assert files.repair_installed()
    view = memoryview(region)
    os.truncate(path, P)
    assert view[-1] == 0


def test_the_next_region_made_puts_the_repair_back_on_top(path: Path) -> None:
    run_forked(_reinstalled_by_the_next_region, str(path))


def test_the_handler_is_installed_by_the_first_region_that_needs_it(path: Path) -> None:
    code = (
        "from mmap_alloc import MapAlloc, SharedRegion, FileRegion, files\n"
        "MapAlloc().alloc(4096).close(); SharedRegion.create(4096).close()\n"
        "print(files.repair_installed())\n"
        f"FileRegion.open({str(path)!r}).close(); print(files.repair_installed())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_the_table_watches_open_file_regions_only(path: Path) -> None:
    watched = _mman._repair_state()[2]
    with FileRegion.open(path), FileRegion.open(path, "c"):
        assert _mman._repair_state()[2] == watched + 2
    assert _mman._repair_state()[2] == watched


def _pin_of_repaired_pages(path: str) -> None:
    region = FileRegion.open(path, "r+")
    pin = region.pin()
    raw = (ctypes.c_char * (8 * P)).from_address(pin.address)
    os.truncate(path, P)
    assert raw[5 * P] == b"\0"
    with pytest.raises(FileTruncatedError):
        region.pin()
    del raw, pin
    region.close()


def test_raw_pointers_through_a_pin_read_zeros_and_a_new_pin_is_refused(path: Path) -> None:
    run_forked(_pin_of_repaired_pages, str(path))


# ---------------------------------------------------------------- races with the file and with fork

# rt_tgsigqueueinfo: a SIGBUS that looks as the kernel's own (BUS_ADRERR at an
# address), sent to this thread, which a process may do to itself
_SIGQUEUE = {"x86_64": 297, "aarch64": 240}.get(os.uname().machine)
_BUS_ADRERR = 2


def _fault_as_the_kernel_raises_it(address: int) -> None:
    info = (ctypes.c_char * 128)()
    ctypes.memmove(info, ctypes.byref(ctypes.c_int(signal.SIGBUS)), 4)
    ctypes.memmove(ctypes.addressof(info) + 8, ctypes.byref(ctypes.c_int(_BUS_ADRERR)), 4)
    ctypes.memmove(ctypes.addressof(info) + 16, ctypes.byref(ctypes.c_void_p(address)), 8)
    libc = ctypes.CDLL(None, use_errno=True)
    args = (os.getpid(), threading.get_native_id(), signal.SIGBUS, info)
    assert libc.syscall(_SIGQUEUE, *args) == 0, os.strerror(ctypes.get_errno())


def _grown_back_before_the_handler_looks(path: str) -> None:
    region = FileRegion.open(path)
    pin = region.pin()
    # the fault of a reader while the file was short; the file is whole again
    _fault_as_the_kernel_raises_it(pin.address + 5 * P)
    del pin
    assert files.repair_installed()
    view = memoryview(region)
    os.truncate(path, P)
    assert view[-1] == 0


@pytest.mark.skipif(_SIGQUEUE is None, reason="rt_tgsigqueueinfo's number is known here")
@emulated_skip(FORGED_FAULT)
def test_a_fault_the_file_grew_back_over_runs_again_and_keeps_the_repair(path: Path) -> None:
    run_forked(_grown_back_before_the_handler_looks, str(path))


def _write_under_a_hole_of_a_full_disk(mount: str) -> None:
    with open(f"{mount}/sparse", "wb") as sparse:
        sparse.truncate(8 * P)  # a hole: no block behind any page
    with contextlib.suppress(OSError), open(f"{mount}/fill", "wb") as fill:
        while True:  # until ENOSPC: the disk is full
            fill.write(b"x" * P)
            fill.flush()
    region = FileRegion.open(f"{mount}/sparse", "r+")
    memoryview(region)[5 * P] = 1  # the kernel has no block for it, however often it runs


def test_a_fault_inside_the_file_that_never_goes_away_still_kills(small_tmpfs: Path) -> None:
    assert run_in_child(lambda: _write_under_a_hole_of_a_full_disk(str(small_tmpfs))) == (
        -signal.SIGBUS
    )


def _forks_while_a_large_region_closes(folder: str) -> None:
    big = f"{folder}/big"
    with open(big, "wb") as f:
        f.truncate(4 << 20)  # large enough that its unmap runs without the GIL
    FileRegion.open(big).close()  # its first one imports multiprocessing: not under a fork
    stop = threading.Event()

    def open_and_close() -> None:
        while not stop.is_set():
            FileRegion.open(big).close()

    closer = threading.Thread(target=open_and_close)
    closer.start()
    try:
        for n in range(150):
            status = run_in_child(functools.partial(_truncated_in_a_fresh_child, f"{folder}/{n}"))
            assert status == 0, f"child {n}: {status}"
    finally:
        stop.set()
        closer.join()


def _truncated_in_a_fresh_child(path: str) -> None:
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    view = memoryview(FileRegion.open(path))
    os.truncate(path, P)
    assert view[-1] == 0  # never a slot the parent's closing thread left behind
    regions_open = [o for o in gc.get_objects() if isinstance(o, FileRegion) and not o.closed]
    watched = _mman._repair_state()[2]
    assert watched == len(regions_open), (watched, regions_open)  # no slot of a region closing


def test_a_fork_while_another_thread_closes_a_large_region_leaves_the_child_nothing_of_it(
    tmp_path: Path,
) -> None:
    run_forked(_forks_while_a_large_region_closes, str(tmp_path), timeout=240)
