"""MapAlloc: the allocator, alloc, alignment, dealloc, usable_size and objects;
bad sizes and alignments."""

from __future__ import annotations

import ctypes
import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from allocator_support import (
    BAD_ALIGNS,
    BAD_TYPES,
    NOT_POSITIVE,
    TOO_LARGE,
    MiB,
    R,
    W,
    X,
    allocator_for,
    exec_only,
)
from mmap_alloc import AllocError, Layout, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc.perm import ALL_PERMS
from support import (
    RESIDENCY,
    SIGSEGV,
    collecting,
    collects_inside_calls,
    emulated_skip,
    kernel_runs,
    mapped_intervals,
    pattern,
    perms_at,
    rss,
    run_forked,
    run_in_child,
    subtract,
)

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


def _reconfigured_by_a_collection_during_alloc() -> None:
    alloc = MapAlloc(write=False)
    held = [alloc.alloc(P) for _ in range(65)]  # every dead Region kept for reuse taken
    region = collecting(lambda: alloc.alloc(P), lambda: MapAlloc.__init__(alloc, write=True))
    assert region.perms == perms_at(region.address)  # the pages as they were mapped
    if region.perms == Perm.READ:
        with pytest.raises(TypeError):
            region[0] = 1  # read-only: a write through it would be a SIGSEGV
    else:
        region[0] = 1  # mapped after the collection, as configured then
    for each in [region, *held]:
        alloc.dealloc(each)


@collects_inside_calls
def test_a_region_keeps_the_protection_it_was_mapped_with_when_a_collection_reconfigures() -> None:
    """alloc() records the allocator's configuration as it was when it
    mapped: a collection its Region object starts may call ``__init__``
    again, and the region is still what the kernel has."""
    run_forked(_reconfigured_by_a_collection_during_alloc)
