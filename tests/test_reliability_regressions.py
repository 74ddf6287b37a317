"""Regressions: bugs the reliability suite found, each pinned by the smallest case.

Other regressions live with their scenario: concurrent protect() exposing a
PROT_NONE page (test_reliability_threads), the protection lock held across
fork (test_reliability_fork), and realloc by copy of a mixed region under
RLIMIT_AS (test_reliability_faults).
"""

from __future__ import annotations

from machine_code import RET
from mmap_alloc import AllocError, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from support import run_forked

PAGE = PAGE_SIZE
R, RW = Perm.READ, Perm.READ | Perm.WRITE


def shrink_while_exported(alloc: MapAlloc, region: Region, size: int) -> None:
    """Shrink the size but keep the capacity: what realloc does while a buffer lives."""
    with memoryview(region):
        alloc.realloc(region, size)
    assert region.capacity == 2 * PAGE


def grow_across_boundary_into_read_only_page() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(2 * PAGE)
    region[:] = b"\xff" * region.size
    region.protect(R, PAGE, PAGE)
    shrink_while_exported(alloc, region, PAGE - 10)
    alloc.realloc(region, PAGE + 10)  # zeroes [PAGE - 10, PAGE + 10): used to memset the r-- page
    assert region[PAGE - 10 :] == bytes(20)
    assert region.protections() == [(0, PAGE, RW), (PAGE, PAGE, R)]
    alloc.dealloc(region)


def test_growing_across_a_page_boundary_into_a_read_only_page_does_not_crash() -> None:
    run_forked(grow_across_boundary_into_read_only_page)


def test_growing_across_a_page_boundary_keeps_each_page_protection() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(2 * PAGE)
    region.protect(R, 0, PAGE)  # r-- then rw-: zeroing used to make both r--
    region.protect(RW)
    region[:] = b"\xff" * region.size
    region.protect(R, 0, PAGE)
    shrink_while_exported(alloc, region, PAGE - 10)
    alloc.grow_in_place(region, PAGE + 10)
    assert region.protections() == [(0, PAGE, R), (PAGE, PAGE, RW)]
    assert region[PAGE - 10 :] == bytes(20)
    alloc.dealloc(region)


def test_realloc_that_drops_the_odd_pages_makes_the_region_uniform_again() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(2 * PAGE)
    region.protect(R, PAGE, PAGE)
    alloc.realloc(region, PAGE)
    assert not region.mixed
    assert region.perms == RW
    region[0] = 1  # the buffer is writable again
    alloc.dealloc(region)


def test_shrink_in_place_that_drops_the_odd_pages_makes_the_region_uniform_again() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(3 * PAGE)
    region.protect(Perm.NONE, 2 * PAGE, PAGE)
    alloc.shrink_in_place(region, PAGE)
    assert not region.mixed
    assert region.perms == RW
    assert memoryview(region).readonly is False
    alloc.dealloc(region)


def test_shrink_that_keeps_odd_pages_keeps_the_region_mixed() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(3 * PAGE)
    region.protect(R, PAGE, PAGE)
    alloc.shrink_in_place(region, 2 * PAGE)
    assert region.mixed
    assert region.protections() == [(0, PAGE, RW), (PAGE, PAGE, R)]
    alloc.dealloc(region)


def test_realloc_beyond_the_address_space_is_an_alloc_error() -> None:
    # mremap says EINVAL, the copy fallback's mmap ENOMEM: that used to escape as OSError.
    alloc = MapAlloc()
    region = alloc.alloc(PAGE)
    region.protect(R, 0, PAGE)
    try:
        alloc.realloc(region, 1 << 47)
    except AllocError:
        pass
    else:
        raise AssertionError("a realloc to 128 TiB succeeded")
    assert region.size == PAGE
    alloc.dealloc(region)


# ---------------------------------------------------------------- same-thread re-entrancy
# The crashes found by trying the library as a hostile user would (issue 10):
# Python code running on the same thread in the middle of a library call.


def signal_handler_between_check_and_store() -> None:
    import signal

    region = MapAlloc().alloc(2 * PAGE)

    def handler(signum: int, frame: object) -> None:
        region.protect(Perm.NONE, 0, PAGE)

    signal.signal(signal.SIGALRM, handler)
    for _ in range(3000):
        region.protect(RW, 0, PAGE)
        region.protect(R, PAGE, PAGE)
        signal.setitimer(signal.ITIMER_REAL, 0.00003)
        region.protect(RW, PAGE, PAGE)
        signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            bytes(region)  # the record says whether page 0 is readable: it never lies
        except BufferError:
            assert region.protections()[0] == (0, PAGE, Perm.NONE)
    region.close()


def test_a_signal_handler_that_protects_mid_protect_cannot_make_the_record_lie() -> None:
    run_forked(signal_handler_between_check_and_store)


def finalizer_closes_a_region_its_function_pins() -> None:
    import ctypes
    import gc

    region = MapAlloc().alloc(PAGE)
    region[: len(RET)] = RET
    region.make_exec()
    seen: list[str] = []

    class Holder:
        region: Region
        function: ctypes._CFunctionType
        cycle: object

        def __del__(self) -> None:
            try:
                self.region.close()
            except BufferError:
                seen.append("pinned")
            self.function()  # the code is still there

    holder = Holder()
    holder.region = region
    holder.function = region.function(ctypes.CFUNCTYPE(None))
    holder.cycle = holder
    del holder, region
    gc.collect()
    assert seen == ["pinned"]


def test_a_finalizer_cannot_close_a_region_its_function_pins() -> None:
    run_forked(finalizer_closes_a_region_its_function_pins)


def realloc_within_the_capacity_under_a_live_function() -> None:
    import ctypes

    import pytest

    alloc = MapAlloc()
    region = alloc.alloc(PAGE)
    region[: len(RET)] = RET
    region.make_exec()
    function = region.function(ctypes.CFUNCTYPE(None))
    alloc.realloc(region, 1)  # a smaller size within the capacity: nothing is zeroed
    with pytest.raises(BufferError, match="pinned code keeps its contents"):
        alloc.realloc(region, PAGE)  # would zero the code after byte 1
    with pytest.raises(BufferError):
        alloc.uncommit(region)
    with pytest.raises(BufferError):
        region.advise("dontneed")
    assert region.size == 1
    function()  # still the same code
    del function
    alloc.realloc(region, PAGE)
    alloc.dealloc(region)


def test_pinned_code_keeps_its_contents() -> None:
    run_forked(realloc_within_the_capacity_under_a_live_function)


def atexit_handler_registered_before_the_import() -> None:
    import subprocess
    import sys

    script = (
        "import atexit, ctypes\n"
        "state = {}\n"
        "def late():\n"
        "    region = state['region']\n"
        "    try:\n"
        "        region.close()\n"
        "    except BufferError:\n"
        "        print('pinned')\n"
        "    state['function']()\n"
        "atexit.register(late)\n"
        "from mmap_alloc import MapAlloc\n"
        "region = MapAlloc().alloc(4096)\n"
        f"region[:{len(RET)}] = {RET!r}\n"
        "region.make_exec()\n"
        "state['region'] = region\n"
        "state['function'] = region.function(ctypes.CFUNCTYPE(None))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "pinned"


def test_an_atexit_handler_registered_before_the_import_sees_the_pin() -> None:
    atexit_handler_registered_before_the_import()
