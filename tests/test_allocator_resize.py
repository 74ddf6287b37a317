"""MapAlloc: resizing a region: realloc (in place or moved), grow_in_place and
shrink_in_place, and what the C kernel promises when it moves or grows one."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator_support import BAD_TYPES, NOT_POSITIVE, TOO_LARGE, R, W, X, allocator_for, exec_only
from mmap_alloc import AllocError, CannotReallocInPlace, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from support import (
    RESIDENCY,
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


def test_realloc_that_drops_pages_and_grows_the_size_zeroes_what_an_export_wrote(
    alloc: MapAlloc,
) -> None:
    """A region shrunk while exported keeps its capacity, and the export can
    write past the region's size; a realloc that then drops the spare pages
    and grows the size exposes those bytes: they read as zero (found by the
    model's long run)."""
    with alloc.alloc(2 * P) as region:
        with memoryview(region) as view:
            alloc.realloc(region, 10)
            view[:] = b"\1" * len(view)
        alloc.realloc(region, 20)
        assert (region.size, region.capacity) == (20, P)
        assert bytes(region) == b"\1" * 10 + bytes(10)


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
