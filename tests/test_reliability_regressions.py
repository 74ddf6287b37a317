"""Regressions: bugs the reliability suite found, each pinned by the smallest case.

Other regressions live with their scenario: concurrent protect() exposing a
PROT_NONE page (test_reliability_threads), the protection lock held across
fork (test_reliability_fork), and realloc by copy of a mixed region under
RLIMIT_AS (test_reliability_faults).
"""

from __future__ import annotations

from mmap_alloc import AllocError, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from reliability_support import run_forked

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
