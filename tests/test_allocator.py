"""MapAlloc: allocation, freeing, resizing, commit and objects, as the kernel sees them."""

from __future__ import annotations

import ctypes
import errno
import itertools
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from machine_code import CALL_REACH, call_near, needs_code
from mmap_alloc import AllocError, CannotReallocInPlace, Layout, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mappings
from mmap_alloc.perm import ALL_PERMS
from support import (
    RESIDENCY,
    SIGSEGV,
    adjacent_pair,
    emulated_skip,
    is_mapped,
    kernel_runs,
    mapped_intervals,
    pattern,
    perms_at,
    rss,
    run_in_child,
    subtract,
)

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
MiB = 1 << 20

BAD_TYPES = [True, False, 1.0, 4096.0, "4096", b"1", None, [1]]
NOT_POSITIVE = [0, -1, -P]
TOO_LARGE = [2**64, 2**63, sys.maxsize, 2**47, 2**62]
BAD_ALIGNS = [0, -8, 3, 6, P + 1, 3 * P]


def allocator_for(perms: Perm, **options: object) -> MapAlloc:
    return MapAlloc(read=bool(perms & R), write=bool(perms & W), exec=bool(perms & X), **options)  # type: ignore[arg-type]


def exec_only() -> MapAlloc:
    """An allocator whose pages look like nothing Python or libc maps (--x)."""
    return MapAlloc(read=False, write=False, exec=True)


# ---------------------------------------------------------------- the allocator


def test_default_allocator_is_read_write_no_exec_no_commit(alloc: MapAlloc) -> None:
    assert alloc.requested_perms == R | W
    assert alloc.perms == R | W
    assert not alloc.commits
    assert alloc.huge_pagesize is None


def test_page_size_is_the_system_page_size(alloc: MapAlloc) -> None:
    assert alloc.page_size == P


@pytest.mark.parametrize("name", ["read", "write", "exec", "commit"])
@pytest.mark.parametrize("value", [1, 0, None, "yes"])
def test_constructor_takes_only_bools_for_flags(name: str, value: object) -> None:
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        MapAlloc(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_perms_in_force_are_the_requested_ones_on_linux(perms: Perm) -> None:
    alloc = allocator_for(perms)
    assert alloc.requested_perms == perms
    assert alloc.perms == perms


def test_huge_pagesize_must_be_a_huge_page_size_of_this_machine() -> None:
    with pytest.raises(ValueError, match="huge_pagesize=4096 is not a huge page size"):
        MapAlloc(huge_pagesize=P)
    with pytest.raises(TypeError, match="huge_pagesize must be an integer"):
        MapAlloc(huge_pagesize=2.0)  # type: ignore[arg-type]


def test_repr_shows_perms_commit_and_page_size() -> None:
    assert repr(MapAlloc(write=False, commit=True)) == f"<MapAlloc r-- commit=True page_size={P}>"


# ---------------------------------------------------------------- alloc


@pytest.mark.parametrize("size", [1, P - 1, P, P + 1, 16 * P, 16 * P + 3])
def test_alloc_gives_page_aligned_zero_filled_whole_pages(alloc: MapAlloc, size: int) -> None:
    with alloc.alloc(size) as region:
        assert region.address != 0
        assert region.address % P == 0
        assert region.size == len(region) == size
        assert region.capacity == -(-size // P) * P
        assert bytes(region) == bytes(size)


@given(size=st.integers(1, 64 * P))
@settings(max_examples=60, deadline=None)
def test_alloc_capacity_is_the_size_rounded_up_to_pages(size: int) -> None:
    with MapAlloc().alloc(size) as region:
        assert region.capacity % P == 0
        assert region.capacity - P < size <= region.capacity


def test_alloc_memory_is_readable_and_writable(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        data = pattern(3 * P)
        region[:] = data
        assert bytes(region) == data
        assert ctypes.string_at(region.address, 3 * P) == data


def test_alloc_gives_separate_regions(alloc: MapAlloc) -> None:
    regions = [alloc.alloc(P + 1) for _ in range(8)]
    try:
        spans = sorted((r.address, r.address + r.capacity) for r in regions)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    finally:
        for r in regions:
            alloc.dealloc(r)


def test_alloc_zeroed_is_zero_filled(alloc: MapAlloc) -> None:
    with alloc.alloc_zeroed(5 * P + 7) as region:
        assert bytes(region) == bytes(5 * P + 7)


@pytest.mark.parametrize("size", [1, P, P + 1])
def test_alloc_excess_makes_the_size_the_whole_capacity(alloc: MapAlloc, size: int) -> None:
    with alloc.alloc_excess(size) as region:
        assert region.size == region.capacity == -(-size // P) * P


def test_alloc_accepts_integer_like_sizes(alloc: MapAlloc) -> None:
    np = pytest.importorskip("numpy")
    with alloc.alloc(np.int64(10)) as region:
        assert region.size == 10
        assert type(region.size) is int


def test_regions_belong_to_their_allocator(alloc: MapAlloc) -> None:
    with alloc.alloc(1) as region:
        assert isinstance(region, Region)
        assert region._owner is alloc


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_each_permission_combination_reaches_the_kernel_exactly(perms: Perm) -> None:
    with allocator_for(perms).alloc(2 * P) as region:
        assert kernel_runs(region) == [(0, 2 * P, perms)]
        assert region.perms == perms


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_commit_allocator_works_with_each_permission_combination(perms: Perm) -> None:
    for align in (None, 2 * MiB):
        with allocator_for(perms, commit=True).alloc(2 * P, align) as region:
            assert kernel_runs(region) == [(0, 2 * P, perms)]


def test_a_512_mib_allocation_is_lazy_and_its_middle_page_reads_zero(alloc: MapAlloc) -> None:
    before = rss()
    with alloc.alloc(512 * MiB) as region:
        middle = region.capacity // 2
        assert region[middle : middle + P] == bytes(P)
        assert rss() - before < 64 * MiB  # nothing close to 512 MiB was faulted in


@emulated_skip(RESIDENCY)
def test_commit_allocator_prefaults_every_page() -> None:
    size = 32 * MiB
    for align in (None, 2 * MiB):
        before = rss()
        with MapAlloc(commit=True).alloc(size, align) as region:
            assert rss() - before >= size - MiB
            assert region.size == size


def test_plain_allocator_does_not_prefault(alloc: MapAlloc) -> None:
    before = rss()
    with alloc.alloc(32 * MiB):
        assert rss() - before < 16 * MiB


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("method", ["alloc", "alloc_zeroed", "alloc_excess"])
@pytest.mark.parametrize("size", NOT_POSITIVE)
def test_alloc_refuses_a_size_that_is_not_positive(alloc: MapAlloc, method: str, size: int) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        getattr(alloc, method)(size)


@pytest.mark.parametrize("method", ["alloc", "alloc_zeroed", "alloc_excess"])
@pytest.mark.parametrize("size", BAD_TYPES, ids=repr)
def test_alloc_refuses_a_size_that_is_not_an_integer(
    alloc: MapAlloc, method: str, size: object
) -> None:
    with pytest.raises(TypeError, match="size must be an integer"):
        getattr(alloc, method)(size)


@pytest.mark.parametrize("method", ["alloc", "alloc_zeroed", "alloc_excess"])
@pytest.mark.parametrize("size", TOO_LARGE)
def test_alloc_of_a_size_past_the_address_space_is_alloc_error(
    alloc: MapAlloc, method: str, size: int
) -> None:
    with pytest.raises(AllocError) as info:
        getattr(alloc, method)(size)
    assert info.value.errno == errno.ENOMEM
    assert isinstance(info.value, MemoryError)


@pytest.mark.parametrize("align", BAD_ALIGNS)
def test_alloc_refuses_an_alignment_that_is_not_a_power_of_two(alloc: MapAlloc, align: int) -> None:
    with pytest.raises(ValueError, match="align must be a positive power of two"):
        alloc.alloc(P, align)


@pytest.mark.parametrize("align", [True, 8.0, "8"], ids=repr)
def test_alloc_refuses_an_alignment_that_is_not_an_integer(alloc: MapAlloc, align: object) -> None:
    with pytest.raises(TypeError, match="align must be an integer"):
        alloc.alloc(P, align)  # type: ignore[arg-type]


@pytest.mark.parametrize("align", [2**62, 2**63, 2**64])
def test_alloc_with_an_alignment_past_the_address_space_is_alloc_error(
    alloc: MapAlloc, align: int
) -> None:
    with pytest.raises(AllocError):
        alloc.alloc(P, align)


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("align", [1, 16, P // 2, P])
def test_alignment_up_to_the_page_size_gives_a_plain_region(alloc: MapAlloc, align: int) -> None:
    with alloc.alloc(100, align) as region:
        assert region.address % P == 0
        assert region.capacity == P


@pytest.mark.parametrize("align", [2 * MiB, 32 * MiB], ids=["2MiB", "32MiB"])
@pytest.mark.parametrize("size", [1, 3 * P, 2 * MiB + 1])
def test_large_alignment_aligns_the_address(alloc: MapAlloc, align: int, size: int) -> None:
    with alloc.alloc(size, align) as region:
        assert region.address % align == 0
        assert region.capacity == -(-size // P) * P
        assert bytes(region[-P:]) == bytes(min(P, size))


@pytest.mark.parametrize("align", [2 * MiB, 32 * MiB], ids=["2MiB", "32MiB"])
def test_large_alignment_leaves_nothing_mapped_outside_the_region(align: int) -> None:
    alloc = exec_only()  # pages unlike the interpreter's own, which may map arenas meanwhile
    before = mapped_intervals(perms={X})
    region = alloc.alloc(3 * P, align)
    try:
        new = subtract(mapped_intervals(perms={X}), before)
        assert new == [(region.address, region.address + 3 * P)]
    finally:
        alloc.dealloc(region)


def test_large_alignment_keeps_the_permissions() -> None:
    with MapAlloc(write=False).alloc(P, 2 * MiB) as region:
        assert kernel_runs(region) == [(0, P, R)]


# ---------------------------------------------------------------- dealloc


def test_dealloc_unmaps_the_region() -> None:
    alloc = exec_only()
    region = alloc.alloc(3 * P)
    start = region.address
    assert perms_at(start) == X
    alloc.dealloc(region)
    assert region.closed
    assert perms_at(start) != X
    assert perms_at(start + 2 * P) != X


def test_dealloc_twice_is_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc(1)
    alloc.dealloc(region)
    with pytest.raises(ValueError, match="already freed"):
        alloc.dealloc(region)


def test_dealloc_of_a_closed_region_is_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc(1)
    region.close()
    with pytest.raises(ValueError, match="already freed"):
        alloc.dealloc(region)


def test_dealloc_of_another_allocators_region_is_value_error_and_keeps_it(
    alloc: MapAlloc,
) -> None:
    with MapAlloc().alloc(1) as region:
        with pytest.raises(ValueError, match="another allocator"):
            alloc.dealloc(region)
        assert not region.closed
        region[0] = 1


@pytest.mark.parametrize("thing", [None, b"x", bytearray(3), 42], ids=repr)
def test_dealloc_of_something_else_is_type_error(alloc: MapAlloc, thing: object) -> None:
    with pytest.raises(TypeError, match="expected a Region"):
        alloc.dealloc(thing)  # type: ignore[arg-type]


def test_a_region_that_is_garbage_collected_is_unmapped() -> None:
    region = exec_only().alloc(P)
    start = region.address
    del region
    assert perms_at(start) != X


# ---------------------------------------------------------------- realloc


@given(data=st.data())
@settings(max_examples=50, deadline=None)
def test_realloc_within_the_same_pages_keeps_the_address(data: st.DataObject) -> None:
    alloc = MapAlloc()
    pages = data.draw(st.integers(1, 8))
    with alloc.alloc(data.draw(st.integers((pages - 1) * P + 1, pages * P))) as region:
        address = region.address
        new_size = data.draw(st.integers((pages - 1) * P + 1, pages * P))
        assert alloc.realloc(region, new_size) is region
        assert (region.address, region.size, region.capacity) == (address, new_size, pages * P)


@given(
    size=st.integers(1, 6 * P),
    smaller=st.integers(1, 6 * P),
    larger=st.integers(1, 12 * P),
)
@settings(max_examples=60, deadline=None)
def test_realloc_shrink_then_grow_keeps_the_prefix_and_zero_fills(
    size: int, smaller: int, larger: int
) -> None:
    alloc = MapAlloc()
    smaller = min(size, smaller)
    larger = max(smaller, larger)
    data = pattern(size)
    with alloc.alloc(size) as region:
        region[:] = data
        alloc.realloc(region, smaller)
        assert bytes(region) == data[:smaller]
        alloc.realloc(region, larger)
        assert bytes(region) == data[:smaller] + bytes(larger - smaller)


def test_realloc_grow_within_the_capacity_zeroes_bytes_past_the_old_size(
    alloc: MapAlloc,
) -> None:
    with alloc.alloc(100) as region:
        ctypes.memset(region.address, 0xEE, P)  # bytes past the size, written from outside
        alloc.realloc(region, 3000)
        assert bytes(region[:100]) == b"\xee" * 100
        assert bytes(region[100:]) == bytes(2900)


def test_realloc_grow_past_the_capacity_zeroes_the_tail_of_the_last_page(
    alloc: MapAlloc,
) -> None:
    with alloc.alloc(100) as region:
        ctypes.memset(region.address, 0xEE, P)
        alloc.realloc(region, 3 * P)
        assert bytes(region[:100]) == b"\xee" * 100
        assert bytes(region[100:]) == bytes(3 * P - 100)


@pytest.mark.parametrize("perms", [R, R | X, X, Perm.NONE, W], ids=str)
def test_realloc_grow_zeroes_bytes_past_the_old_size_without_write_permission(
    perms: Perm,
) -> None:
    alloc = MapAlloc()
    with alloc.alloc(3 * P) as region:
        region[:] = pattern(3 * P)
        with memoryview(region):  # keeps the capacity while the size shrinks
            alloc.realloc(region, 100)
        region.protect(Perm(int(perms)), 0, region.capacity)
        alloc.realloc(region, 2 * P + 100)  # partial page, whole page, partial page
        alloc.realloc(region, 5 * P)  # and past the capacity
        assert kernel_runs(region) == [(0, 5 * P, perms)]
        region.protect(Perm(int(R)), 0, region.capacity)
        assert bytes(region) == pattern(100) + bytes(5 * P - 100)


def test_realloc_keeps_the_contents_when_it_must_move(alloc: MapAlloc) -> None:
    region, neighbour = adjacent_pair(alloc, 2 * P, P)
    try:
        region[:] = data = pattern(2 * P)
        neighbour[:] = fence = pattern(P, seed=2)
        alloc.realloc(region, 64 * P)
        assert bytes(region[: 2 * P]) == data
        assert bytes(region[2 * P :]) == bytes(62 * P)
        assert bytes(neighbour) == fence
    finally:
        alloc.dealloc(region)
        alloc.dealloc(neighbour)


@pytest.mark.parametrize("perms", [R, R | X, Perm.NONE, X, R | W | X], ids=str)
def test_realloc_keeps_the_permissions(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(P) as region:
        alloc.realloc(region, 40 * P)
        assert kernel_runs(region) == [(0, 40 * P, perms)]
        alloc.realloc(region, 2 * P)
        assert kernel_runs(region) == [(0, 2 * P, perms)]
        assert region.perms == perms


def test_realloc_shrink_unmaps_the_pages_past_the_new_capacity() -> None:
    alloc = exec_only()
    with alloc.alloc(4 * P) as region:
        start = region.address
        alloc.realloc(region, P + 1)
        assert region.address == start
        assert region.capacity == 2 * P
        assert perms_at(start + P) == X
        assert perms_at(start + 2 * P) != X
        assert perms_at(start + 3 * P) != X


def test_realloc_shrink_leaves_the_neighbour_intact(alloc: MapAlloc) -> None:
    region, neighbour = adjacent_pair(alloc, 4 * P, 2 * P)
    try:
        region[:] = data = pattern(4 * P)
        neighbour[:] = fence = pattern(2 * P, seed=3)
        alloc.realloc(region, P + 10)
        assert bytes(region) == data[: P + 10]
        assert bytes(neighbour) == fence
    finally:
        alloc.dealloc(region)
        alloc.dealloc(neighbour)


def test_realloc_while_exported_within_the_capacity_is_allowed(alloc: MapAlloc) -> None:
    with alloc.alloc(100) as region, memoryview(region) as view:
        alloc.realloc(region, P)
        assert len(view) == 100
        assert region.size == P


def test_realloc_while_exported_shrinks_the_size_and_keeps_the_capacity(
    alloc: MapAlloc,
) -> None:
    with alloc.alloc(4 * P) as region:
        region[:] = data = pattern(4 * P)
        with memoryview(region) as view:
            address = region.address
            alloc.realloc(region, 10)
            assert (region.address, region.size, region.capacity) == (address, 10, 4 * P)
            assert bytes(view) == data  # the exported bytes stay mapped
        alloc.realloc(region, 10)
        assert region.capacity == P


def test_realloc_while_exported_past_the_capacity_is_buffer_error_and_changes_nothing(
    alloc: MapAlloc,
) -> None:
    with alloc.alloc(100) as region:
        region[:] = data = pattern(100)
        with memoryview(region) as view:
            before = (region.address, region.size, region.capacity)
            with pytest.raises(BufferError, match="1 exported buffer"):
                alloc.realloc(region, P + 1)
            assert (region.address, region.size, region.capacity) == before
            assert bytes(view) == data


def test_realloc_after_the_buffer_is_released_may_move(alloc: MapAlloc) -> None:
    with alloc.alloc(100) as region:
        with memoryview(region):
            pass
        alloc.realloc(region, 100 * P)
        assert region.size == 100 * P


@pytest.mark.parametrize("size", NOT_POSITIVE)
def test_realloc_refuses_a_size_that_is_not_positive(alloc: MapAlloc, size: int) -> None:
    with alloc.alloc(1) as region:
        with pytest.raises(ValueError, match="new_size must be positive"):
            alloc.realloc(region, size)
        assert region.size == 1


@pytest.mark.parametrize("size", BAD_TYPES, ids=repr)
def test_realloc_refuses_a_size_that_is_not_an_integer(alloc: MapAlloc, size: object) -> None:
    with alloc.alloc(1) as region, pytest.raises(TypeError, match="new_size must be an integer"):
        alloc.realloc(region, size)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", TOO_LARGE)
def test_realloc_past_the_address_space_is_alloc_error_and_keeps_the_region(
    alloc: MapAlloc, size: int
) -> None:
    with alloc.alloc(10) as region:
        region[:] = data = pattern(10)
        address = region.address
        with pytest.raises(AllocError):
            alloc.realloc(region, size)
        assert (region.address, region.size, region.capacity) == (address, 10, P)
        assert bytes(region) == data


def test_realloc_of_a_closed_region_is_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc(1)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        alloc.realloc(region, 2)


def test_realloc_of_another_allocators_region_is_value_error(alloc: MapAlloc) -> None:
    with MapAlloc().alloc(1) as region:
        with pytest.raises(ValueError, match="another allocator"):
            alloc.realloc(region, 2 * P)
        assert region.size == 1


# ---- regions whose pages differ in protection (mremap cannot move them)


def test_realloc_of_a_mixed_region_copies_contents_and_protections(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = data = pattern(3 * P)
        region.protect(Perm(int(Perm.NONE)), P, P)  # an unreadable middle page
        region.protect(Perm(int(R)), 2 * P, P)
        alloc.realloc(region, 5 * P)
        assert kernel_runs(region) == [(0, P, R | W), (P, P, Perm.NONE), (2 * P, 3 * P, R)]
        assert region.protections() == kernel_runs(region)
        assert region._prot == -1 and region.mixed
        region.protect(Perm(int(R)), 0, region.capacity)
        assert bytes(region) == data + bytes(2 * P)


def test_realloc_of_a_mixed_region_leaves_no_mapping_behind() -> None:
    alloc = exec_only()
    ours = {X, Perm.NONE}
    before = mapped_intervals(perms=ours)
    with alloc.alloc(2 * P) as region:
        region.protect(Perm(int(Perm.NONE)), P, P)
        alloc.realloc(region, 8 * P)
        new = subtract(mapped_intervals(perms=ours), before)
        assert new == [(region.address, region.address + 8 * P)]


def test_realloc_within_the_capacity_of_a_mixed_region_zeroes_each_page_safely() -> None:
    def body() -> None:
        alloc = MapAlloc()
        region = alloc.alloc(3 * P)
        region[:] = pattern(3 * P)
        with memoryview(region):
            alloc.realloc(region, 100)
        region.protect(Perm(int(R)), P, P)  # a read-only page in the middle
        alloc.realloc(region, 2 * P + 100)  # used to memset the read-only page: SIGSEGV
        assert kernel_runs(region) == [(0, P, R | W), (P, P, R), (2 * P, P, R | W)]
        assert bytes(region[100:]) == bytes(2 * P)

    assert run_in_child(body) == 0


# ---------------------------------------------------------------- grow_in_place


def test_grow_in_place_keeps_the_address_and_zero_fills(alloc: MapAlloc) -> None:
    with alloc.alloc(4 * P) as region:
        region[:] = data = pattern(4 * P)
        alloc.shrink_in_place(region, P + 1)  # frees the three pages after it
        address = region.address
        alloc.grow_in_place(region, 3 * P)
        assert (region.address, region.size, region.capacity) == (address, 3 * P, 3 * P)
        assert bytes(region) == data[: P + 1] + bytes(2 * P - 1)


def test_grow_in_place_within_the_capacity_needs_no_room(alloc: MapAlloc) -> None:
    region, neighbour = adjacent_pair(alloc, P, P)
    try:
        region[:] = data = pattern(P)
        alloc.realloc(region, 10)
        alloc.grow_in_place(region, P)
        assert bytes(region) == data[:10] + bytes(P - 10)
    finally:
        alloc.dealloc(region)
        alloc.dealloc(neighbour)


def test_grow_in_place_blocked_by_a_neighbour_raises_and_keeps_the_region(
    alloc: MapAlloc,
) -> None:
    region, neighbour = adjacent_pair(alloc, P, P)
    try:
        region[:] = data = pattern(P)
        neighbour[:] = fence = pattern(P, seed=5)
        address = region.address
        with pytest.raises(CannotReallocInPlace, match="cannot grow the region"):
            alloc.grow_in_place(region, 2 * P)
        assert (region.address, region.size, region.capacity) == (address, P, P)
        assert bytes(region) == data
        assert bytes(neighbour) == fence
    finally:
        alloc.dealloc(region)
        alloc.dealloc(neighbour)


def test_grow_in_place_while_exported_is_allowed(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        alloc.shrink_in_place(region, P)
        with memoryview(region) as view:
            view[:4] = b"keep"
            alloc.grow_in_place(region, 2 * P)
            assert region.size == 2 * P
            assert bytes(view[:4]) == b"keep"


def test_grow_in_place_to_a_smaller_size_is_value_error(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        with pytest.raises(ValueError, match="smaller than the region's size"):
            alloc.grow_in_place(region, P)
        assert region.size == 2 * P


@pytest.mark.parametrize("size", [*NOT_POSITIVE, *BAD_TYPES], ids=repr)
def test_grow_in_place_refuses_bad_sizes(alloc: MapAlloc, size: object) -> None:
    with alloc.alloc(1) as region, pytest.raises((TypeError, ValueError), match="new_size"):
        alloc.grow_in_place(region, size)  # type: ignore[arg-type]


# ---------------------------------------------------------------- shrink_in_place


def test_shrink_in_place_keeps_the_address_and_the_prefix(alloc: MapAlloc) -> None:
    with alloc.alloc(5 * P) as region:
        region[:] = data = pattern(5 * P)
        address = region.address
        alloc.shrink_in_place(region, 2 * P + 1)
        assert (region.address, region.size, region.capacity) == (address, 2 * P + 1, 3 * P)
        assert bytes(region) == data[: 2 * P + 1]


def test_shrink_in_place_unmaps_the_tail_and_leaves_the_neighbour_intact(
    alloc: MapAlloc,
) -> None:
    region, neighbour = adjacent_pair(alloc, 3 * P, P)
    try:
        neighbour[:] = fence = pattern(P, seed=9)
        start = region.address
        alloc.shrink_in_place(region, P)
        assert not is_mapped(start + P, start + 3 * P) or perms_at(start + P) is None
        assert bytes(neighbour) == fence
    finally:
        alloc.dealloc(region)
        alloc.dealloc(neighbour)


def test_shrink_in_place_while_exported_is_buffer_error(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        with memoryview(region), pytest.raises(BufferError):
            alloc.shrink_in_place(region, P)
        assert (region.size, region.capacity) == (2 * P, 2 * P)


def test_shrink_in_place_to_a_larger_size_is_value_error(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region, pytest.raises(ValueError, match="larger than the region"):
        alloc.shrink_in_place(region, P + 1)


@pytest.mark.parametrize("size", [*NOT_POSITIVE, *BAD_TYPES], ids=repr)
def test_shrink_in_place_refuses_bad_sizes(alloc: MapAlloc, size: object) -> None:
    with alloc.alloc(1) as region, pytest.raises((TypeError, ValueError), match="new_size"):
        alloc.shrink_in_place(region, size)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["grow_in_place", "shrink_in_place"])
def test_resizing_in_place_a_closed_region_is_value_error(alloc: MapAlloc, method: str) -> None:
    region = alloc.alloc(P)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        getattr(alloc, method)(region, P)


# ---------------------------------------------------------------- usable_size


@given(size=st.integers(1, 2**46))
def test_usable_size_is_the_range_that_gets_the_same_pages(size: int) -> None:
    lo, hi = MapAlloc().usable_size(size)
    assert hi % P == 0
    assert lo == hi - P + 1
    assert lo <= size <= hi


@given(size=st.integers(1, 16 * P))
@settings(max_examples=30, deadline=None)
def test_usable_size_bounds_allocate_the_same_capacity(size: int) -> None:
    alloc = MapAlloc()
    lo, hi = alloc.usable_size(size)
    with alloc.alloc(lo) as a, alloc.alloc(hi) as b, alloc.alloc(size) as c:
        assert a.capacity == b.capacity == c.capacity == hi


def test_usable_size_accepts_an_alignment(alloc: MapAlloc) -> None:
    assert alloc.usable_size(1, 2 * MiB) == (1, P)


@pytest.mark.parametrize("size", [*NOT_POSITIVE, *BAD_TYPES], ids=repr)
def test_usable_size_refuses_bad_sizes(alloc: MapAlloc, size: object) -> None:
    with pytest.raises((TypeError, ValueError), match="size"):
        alloc.usable_size(size)  # type: ignore[arg-type]


@pytest.mark.parametrize("align", BAD_ALIGNS)
def test_usable_size_refuses_bad_alignments(alloc: MapAlloc, align: int) -> None:
    with pytest.raises(ValueError, match="align"):
        alloc.usable_size(1, align)


# ---------------------------------------------------------------- commit / uncommit


def test_uncommit_makes_pages_read_zero(alloc: MapAlloc) -> None:
    with alloc.alloc(4 * P) as region:
        region[:] = data = pattern(4 * P)
        alloc.uncommit(region, P, 2 * P)
        assert bytes(region) == data[:P] + bytes(2 * P) + data[3 * P :]


def test_uncommit_twice_is_fine(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        region[:] = pattern(2 * P)
        alloc.uncommit(region)
        alloc.uncommit(region)
        assert bytes(region) == bytes(2 * P)


def test_uncommit_gives_the_memory_back(alloc: MapAlloc) -> None:
    with alloc.alloc(32 * MiB) as region:
        region[:] = b"\x01" * (32 * MiB)
        before = rss()
        alloc.uncommit(region)
        assert before - rss() >= 31 * MiB


@emulated_skip(RESIDENCY)
def test_commit_faults_pages_in(alloc: MapAlloc) -> None:
    with alloc.alloc(32 * MiB) as region:
        before = rss()
        alloc.commit(region, 8 * MiB, 16 * MiB)
        assert rss() - before >= 15 * MiB
        assert bytes(region[8 * MiB : 8 * MiB + P]) == bytes(P)


def test_commit_keeps_the_contents(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = data = pattern(3 * P)
        alloc.commit(region)
        assert bytes(region) == data


@pytest.mark.parametrize("perms", [R, W, R | W, R | X, W | X, R | W | X], ids=str)
@emulated_skip(RESIDENCY)
def test_commit_works_on_readable_or_writable_regions(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(64 * P) as region:
        assert region._mincore(0, region.capacity) == bytes(64)
        alloc.commit(region)
        assert region._mincore(0, region.capacity) == b"\x01" * 64
        assert kernel_runs(region) == [(0, 64 * P, perms)]


@pytest.mark.parametrize("perms", [Perm.NONE, X], ids=str)
def test_commit_of_pages_without_read_or_write_is_value_error(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(P) as region, pytest.raises(ValueError, match="protect"):
        alloc.commit(region)


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_uncommit_works_with_every_permission_combination(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(2 * P) as region:
        alloc.uncommit(region)
        assert kernel_runs(region) == [(0, 2 * P, perms)]


def test_uncommit_while_exported_is_allowed_and_the_buffer_reads_zero(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region, memoryview(region) as view:
        view[:] = pattern(P)
        alloc.uncommit(region)
        assert bytes(view) == bytes(P)


def test_commit_and_uncommit_default_to_the_whole_capacity(alloc: MapAlloc) -> None:
    with alloc.alloc(P + 1) as region:
        ctypes.memset(region.address, 1, 2 * P)
        alloc.uncommit(region)
        assert ctypes.string_at(region.address, 2 * P) == bytes(2 * P)
        alloc.commit(region)


def test_commit_length_rounds_up_to_whole_pages(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = data = pattern(3 * P)
        alloc.uncommit(region, P, 1)
        assert bytes(region) == data[:P] + bytes(P) + data[2 * P :]


def test_commit_of_an_empty_range_does_nothing(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region:
        region[0] = 7
        alloc.uncommit(region, P)
        alloc.uncommit(region, 0, 0)
        alloc.commit(region, P, 0)
        assert region[0] == 7


@pytest.mark.parametrize("method", ["commit", "uncommit"])
@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (1, None, "offset must be a non-negative multiple of the page size"),
        (P // 2, P, "offset must be a non-negative multiple"),
        (-P, None, "offset must be a non-negative multiple"),
        (3 * P, None, "lies outside the region"),
        (0, 2 * P + 1, "lies outside the region"),
        (P, 2 * P, "lies outside the region"),
        (0, -1, "length must not be negative"),
    ],
)
def test_commit_and_uncommit_refuse_ranges_outside_the_region_or_unaligned(
    alloc: MapAlloc, method: str, offset: int, length: int | None, message: str
) -> None:
    with alloc.alloc(2 * P) as region:
        region[:] = data = pattern(2 * P)
        with pytest.raises(ValueError, match=message):
            getattr(alloc, method)(region, offset, length)
        assert bytes(region) == data


@pytest.mark.parametrize("method", ["commit", "uncommit"])
@pytest.mark.parametrize(("offset", "length"), [(0.0, None), (True, None), (0, 1.0), (0, "1")])
def test_commit_and_uncommit_refuse_offsets_and_lengths_that_are_not_integers(
    alloc: MapAlloc, method: str, offset: object, length: object
) -> None:
    with alloc.alloc(P) as region, pytest.raises(TypeError, match=r"offset|length"):
        getattr(alloc, method)(region, offset, length)


@pytest.mark.parametrize("method", ["commit", "uncommit"])
def test_commit_and_uncommit_of_a_closed_region_are_value_error(
    alloc: MapAlloc, method: str
) -> None:
    region = alloc.alloc(P)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        getattr(alloc, method)(region)


@pytest.mark.parametrize("method", ["commit", "uncommit"])
def test_commit_and_uncommit_of_another_allocators_region_are_value_error(
    alloc: MapAlloc, method: str
) -> None:
    with MapAlloc().alloc(P) as region, pytest.raises(ValueError, match="another allocator"):
        getattr(alloc, method)(region)


# ---------------------------------------------------------------- objects


def test_obj_layout_defaults_to_one_page(alloc: MapAlloc) -> None:
    assert alloc.obj_layout == Layout(P, P)
    assert alloc.obj_layout.size == P and alloc.obj_layout.align == P


def test_alloc_obj_gives_a_region_of_the_object_layout() -> None:
    alloc = MapAlloc(obj_size=4 * MiB, obj_align=2 * MiB)
    assert alloc.obj_layout == Layout(4 * MiB, 2 * MiB)
    region = alloc.alloc_obj()
    try:
        assert region.size == 4 * MiB
        assert region.address % (2 * MiB) == 0
        assert region[-1] == 0
    finally:
        alloc.dealloc_obj(region)
    assert region.closed


def test_alloc_obj_with_a_small_alignment_is_page_aligned() -> None:
    alloc = MapAlloc(obj_size=2 * P, obj_align=64)
    with alloc.alloc_obj() as region:
        assert region.address % P == 0
        assert region.size == 2 * P


def test_dealloc_obj_refuses_a_region_of_another_size(alloc: MapAlloc) -> None:
    with alloc.alloc(P + 1) as region:
        with pytest.raises(ValueError, match="not an object of"):
            alloc.dealloc_obj(region)
        assert not region.closed


def test_dealloc_obj_refuses_another_allocators_object(alloc: MapAlloc) -> None:
    with MapAlloc().alloc_obj() as region, pytest.raises(ValueError, match="another allocator"):
        alloc.dealloc_obj(region)


def test_dealloc_obj_twice_is_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc_obj()
    alloc.dealloc_obj(region)
    with pytest.raises(ValueError, match="already freed"):
        alloc.dealloc_obj(region)


def test_a_child_process_check_reports_a_crash() -> None:
    def body() -> None:
        ctypes.string_at(8, 1)

    assert run_in_child(body) == SIGSEGV


def test_alloc_takes_align_none_by_position_or_by_name(alloc: MapAlloc) -> None:
    for region in (alloc.alloc(10, None), alloc.alloc(10, align=None), alloc.alloc_zeroed(10)):
        assert (region.size, region.capacity, region.address % P) == (10, P, 0)
        alloc.dealloc(region)
    with pytest.raises(TypeError, match="alig"):
        alloc.alloc(10, alig=None)  # type: ignore[call-arg]


# ---------------------------------------------------------------- promises of the C kernel


def test_realloc_that_moves_keeps_a_large_alignment(alloc: MapAlloc) -> None:
    align = 2 << 20
    blockers = []
    try:
        for _ in range(5):
            region = alloc.alloc(P, align)
            blockers.append(alloc.alloc(P))  # probably right after it: growth must move
            alloc.realloc(region, 64 * P)
            assert region.address % align == 0
            assert region._align == align
            region.close()
    finally:
        for blocker in blockers:
            blocker.close()


@emulated_skip(RESIDENCY)
def test_grown_pages_of_a_committing_allocator_are_prefaulted() -> None:
    alloc = MapAlloc(commit=True)
    with alloc.alloc(P) as region:
        alloc.realloc(region, 64 * P)
        assert region.stats().resident_bytes == 64 * P


def test_realloc_of_a_reservation_leaves_its_closed_pages_uncommitted() -> None:
    alloc = MapAlloc()
    size = 255 * P  # below the THP size: the kernel packs such mappings together
    spares: list[Region] = []
    for _ in range(64):  # a reservation with a mapping right after it: growth must move
        blocker = alloc.alloc(P)
        space = alloc.reserve(size)
        if space.address + size == blocker.address:
            break
        spares += (space, blocker)
    else:
        pytest.skip("the kernel never placed a mapping right after a reservation")
    for spare in spares:
        spare.close()
    with blocker, space:
        space.protect(R | W, 0, P)
        space[0] = 1
        address, before = space.address, rss()
        alloc.realloc(space, 512 << 20)  # several kernel mappings: a move by copy
        assert space.address != address
        assert rss() - before < 8 << 20
        assert space[0] == 1
        assert space.stats().resident_bytes <= 2 * P
        assert space.protections() == [(0, P, R | W), (P, (512 << 20) - P, Perm.NONE)]


# ---------------------------------------------------------------- near an address

GiB2 = 1 << 31


def libc_labs() -> int:
    address = ctypes.cast(ctypes.CDLL(None).labs, ctypes.c_void_p).value
    assert address is not None
    return address


def within_reach(region: Region, near: int, within: int = GiB2) -> bool:
    """Every byte of the region lies less than ``within`` bytes from ``near``."""
    first, last = region.address, region.address + region.capacity - 1
    return abs(first - near) < within and abs(last - near) < within


def test_alloc_near_libc_lies_within_2_gib_of_it(alloc: MapAlloc) -> None:
    near = ctypes.cast(ctypes.CDLL(None).printf, ctypes.c_void_p).value
    assert near is not None
    with alloc.alloc(64 * P, near=near) as region:
        assert within_reach(region, near)
        assert kernel_runs(region) == [(0, 64 * P, R | W)]
        region[:5] = b"hello"  # ordinary memory: zero-filled, writable
        assert region[:6] == b"hello\0"


def test_alloc_near_honours_a_small_within_and_the_alignment(alloc: MapAlloc) -> None:
    near = libc_labs()
    with alloc.alloc(3 * P, 16 * P, near=near, within=256 * MiB) as region:
        assert within_reach(region, near, 256 * MiB)
        assert region.address % (16 * P) == 0


@needs_code
def test_code_in_a_region_near_libc_calls_it_directly() -> None:
    """Generated code reaches libc's labs with a direct call: call rel32 (a
    32-bit displacement) on x86-64, bl (26 bits of instructions) on arm64."""
    target = libc_labs()
    alloc = MapAlloc()
    region = alloc.alloc(P, near=target, within=CALL_REACH)
    assert within_reach(region, target, CALL_REACH)
    code = call_near(region.address, target)
    region[: len(code)] = code
    region.make_exec()
    labs = region.function(ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long))
    assert labs(-1234) == 1234
    del labs
    alloc.dealloc(region)


def test_reserve_near_lies_within_reach_and_is_inaccessible(alloc: MapAlloc) -> None:
    near = libc_labs()
    with alloc.reserve(1 << 30, near=near) as space:
        assert within_reach(space, near)
        assert kernel_runs(space) == [(0, 1 << 30, Perm.NONE)]


def test_a_window_that_is_all_taken_raises_alloc_error(alloc: MapAlloc) -> None:
    with alloc.alloc(16 * P) as taken:
        middle = taken.address + 8 * P  # every byte in reach lies inside `taken`
        with pytest.raises(AllocError, match="no free range of 4096 bytes lies less than") as info:
            alloc.alloc(P, near=middle, within=4 * P)
        assert info.value.size == P
        with pytest.raises(AllocError, match="no free range"):
            alloc.reserve(P, near=middle, within=4 * P)


def test_a_window_smaller_than_the_size_raises_alloc_error(alloc: MapAlloc) -> None:
    with pytest.raises(AllocError, match="no free range of 65536 bytes"):
        alloc.alloc(16 * P, near=1 << 40, within=4 * P)


def test_near_allocation_only_adds_lines_to_proc_maps() -> None:
    """Nothing mapped is replaced, moved or joined: the lines of
    /proc/self/maps before are all there after, unchanged, and each new
    region is a line of its own.

    The interpreter's own anonymous read/write memory (obmalloc arenas,
    malloc) may grow meanwhile and join its neighbours' lines, so those lines
    are left out; the regions here are read-only or inaccessible, unlike them.
    """
    near = libc_labs()
    alloc = MapAlloc(write=False)

    def lines() -> set[tuple[int, int, Perm, str]]:
        return {(m.start, m.end, m.perms, m.name) for m in mappings() if m.name or m.perms != R | W}

    before = lines()
    regions = [alloc.alloc(size, near=near) for size in (P, 5 * P, 64 * P)]
    regions.append(alloc.reserve(16 * P, near=near))
    after = lines()
    own = {(r.address, r.address + r.capacity, r.perms, "") for r in regions}
    for region in regions:
        region.close()
    assert before <= after, sorted(before - after)
    assert after - before == own


def test_threads_allocating_near_one_address_never_overlap() -> None:
    alloc = MapAlloc()
    near = libc_labs()
    results: list[list[Region]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(25):
                results[i].append(alloc.alloc(P * (1 + i % 3), near=near, within=1 << 28))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    regions = [region for found in results for region in found]
    try:
        assert not errors, errors
        assert len(regions) == 200
        spans = sorted((r.address, r.address + r.capacity) for r in regions)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert all(within_reach(r, near, 1 << 28) for r in regions)
    finally:
        for region in regions:
            region.close()


def test_a_near_region_may_leave_reach_when_realloc_moves_it(alloc: MapAlloc) -> None:
    """realloc keeps no promise of reach (documented); grow_in_place never moves."""
    near = libc_labs()
    region = alloc.alloc(P, near=near, within=1 << 30)
    address = region.address
    try:
        alloc.grow_in_place(region, 2 * P)
    except CannotReallocInPlace:
        pass
    else:
        assert region.address == address
    alloc.dealloc(region)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"near": "0x1000"}, TypeError, "near must be an integer, not str"),
        ({"near": 1.5}, TypeError, "near must be an integer, not float"),
        ({"near": True}, TypeError, "near must be an integer, not bool"),
        ({"near": -1}, ValueError, "near must be an address from 0 to 2\\*\\*64 - 1, got -1"),
        ({"near": 1 << 64}, ValueError, "near must be an address"),
        ({"near": 1 << 40, "within": 0}, ValueError, "within must be positive, got 0"),
        ({"near": 1 << 40, "within": -1}, ValueError, "within must be positive, got -1"),
        ({"near": 1 << 40, "within": "1"}, TypeError, "within must be an integer, not str"),
        ({"within": 1 << 20}, TypeError, "within= needs near="),
    ],
)
def test_alloc_and_reserve_refuse_bad_placement(
    alloc: MapAlloc, kwargs: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        alloc.alloc(P, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        alloc.reserve(P, **kwargs)  # type: ignore[arg-type]


def test_alloc_near_still_checks_size_and_alignment(alloc: MapAlloc) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        alloc.alloc(0, near=1 << 40)
    with pytest.raises(ValueError, match="align must be a positive power of two"):
        alloc.alloc(P, 3, near=1 << 40)
