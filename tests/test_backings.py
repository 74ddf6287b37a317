"""Huge pages without silent fallback: modes, backing, hugetlb pools, THP."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from mmap_alloc import AllocError, CannotReallocInPlace, MapAlloc, MapAllocBuilder, Perm, Region
from mmap_alloc import backings as hp
from mmap_alloc._linux import (
    PAGE_SIZE,
    default_hugepage_size,
    hugepage_dir,
    hugepage_pool,
    mapping_count,
    mappings,
    read_int,
    smaps,
    thp_mode,
    thp_size,
)
from mmap_alloc.backings import Backing
from support import HUGETLB, THP, emulated_skip, skip_if_emulated, vm_flags

HUGE = 2 << 20
NEEDED = 8  # free 2 MiB hugetlb pages the hugetlb tests use at most at once

needs_thp = pytest.mark.skipif(
    not hp.thp_available(), reason=f"transparent huge pages unavailable (mode {thp_mode()!r})"
)


def free_pages() -> int:
    pool = hugepage_pool(HUGE)
    return pool.free if pool else 0


def mapped(address: int, length: int) -> bool:
    """Whether any byte of [address, address + length) is mapped."""
    return any(m.start < address + length and m.end > address for m in mappings())


def fill(region: Region, value: int = 1) -> None:
    """Write every byte of the region, one huge page at a time."""
    chunk = bytes([value]) * HUGE
    for offset in range(0, region.size, HUGE):
        n = min(HUGE, region.size - offset)
        region[offset : offset + n] = chunk[:n]


@pytest.fixture(scope="module")
def hugetlb() -> Iterator[int]:
    """The 2 MiB hugetlb page size, with NEEDED pages free: reserved here (as
    root) if need be, and the pool restored afterwards."""
    skip_if_emulated(HUGETLB)
    pool = hugepage_pool(HUGE)
    if pool is None:
        pytest.skip("this kernel has no 2 MiB hugetlb pages")
    if pool.free >= NEEDED:
        yield HUGE
        return
    if os.geteuid() != 0:
        pytest.skip(f"{pool.free} free 2 MiB hugetlb pages, {NEEDED} needed; not root to reserve")
    path = hugepage_dir(HUGE) / "nr_hugepages"
    path.write_text(str(pool.reserved + NEEDED - pool.free))
    try:
        if free_pages() < NEEDED:
            pytest.skip(f"the kernel could not reserve {NEEDED} 2 MiB hugetlb pages")
        yield HUGE
    finally:
        path.write_text(str(pool.reserved))


@pytest.fixture
def hugetlb_alloc(hugetlb: int) -> MapAlloc:
    return MapAlloc(huge_pagesize=hugetlb)


# ---------------------------------------------------------------- configuration


def test_normal_allocator_has_no_huge_mode_and_normal_backing(alloc: MapAlloc) -> None:
    assert alloc.huge is None
    with alloc.alloc(1) as region:
        assert region.backing == "normal"
        assert region.backing is Backing.NORMAL


def test_huge_pagesize_alone_means_hugetlb_mode() -> None:
    if hugepage_pool(HUGE) is None:
        pytest.skip("this kernel has no 2 MiB hugetlb pages")
    alloc = MapAlloc(huge_pagesize=HUGE)
    assert alloc.huge == "hugetlb"
    assert alloc.huge_pagesize == alloc.page_size == HUGE


def test_hugetlb_mode_defaults_to_the_kernels_default_huge_page_size() -> None:
    if hugepage_pool(HUGE) is None:
        pytest.skip("this kernel has no 2 MiB hugetlb pages")
    alloc = MapAlloc(huge="hugetlb")
    assert alloc.huge_pagesize == alloc.page_size == default_hugepage_size()


def test_unsupported_huge_pagesize_is_a_value_error_naming_the_sizes() -> None:
    with pytest.raises(ValueError, match=r"huge_pagesize=3145728 .*supported"):
        MapAlloc(huge_pagesize=3 << 20)


def test_unknown_huge_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="huge must be None or one of"):
        MapAlloc(huge="giant")


def test_huge_mode_must_be_a_str() -> None:
    with pytest.raises(TypeError, match="huge must be a str"):
        MapAlloc(huge=True)  # type: ignore[arg-type]


def test_builder_huge_sets_the_mode() -> None:
    alloc = MapAllocBuilder().huge("prefer").build()
    assert alloc.huge == "prefer"


def test_builder_keeps_huge_pagesize_with_a_mode() -> None:
    if hugepage_pool(HUGE) is None:
        pytest.skip("this kernel has no 2 MiB hugetlb pages")
    alloc = MapAllocBuilder().huge("prefer").huge_pagesize(HUGE).build()
    assert (alloc.huge, alloc.huge_pagesize) == ("prefer", HUGE)


def test_thp_mode_is_a_value_error_at_build_when_thp_is_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    with pytest.raises(ValueError, match="transparent huge pages are not available"):
        MapAllocBuilder().huge("thp").build()


@needs_thp
def test_thp_mode_rejects_another_huge_pagesize() -> None:
    with pytest.raises(ValueError, match="huge_pagesize must be None or"):
        MapAlloc(huge="thp", huge_pagesize=thp_size() * 2)


def test_prefer_builds_on_a_machine_without_huge_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    monkeypatch.setattr(hp, "hugepage_pools", list)
    alloc = MapAlloc(huge="prefer")
    assert (alloc.page_size, alloc.huge_pagesize) == (PAGE_SIZE, None)
    with alloc.alloc(1) as region:
        assert region.backing == Backing.NORMAL


# ---------------------------------------------------------------- the default: THP as numpy


@needs_thp
@emulated_skip(THP)
def test_the_default_allocator_advises_regions_of_4_mib_and_more() -> None:
    alloc = MapAlloc()
    assert (alloc.page_size, alloc.huge, alloc.huge_pagesize) == (PAGE_SIZE, None, None)
    with alloc.alloc(hp.THP_MIN_SIZE) as large:
        assert large.backing == Backing.THP
        assert large.address % thp_size() == 0
        assert large.capacity == hp.THP_MIN_SIZE
        assert "hg" in vm_flags(large.address)


@needs_thp
def test_the_default_allocator_leaves_regions_under_4_mib_alone() -> None:
    with MapAlloc().alloc(hp.THP_MIN_SIZE - PAGE_SIZE) as small:
        assert small.backing == Backing.NORMAL
        assert "hg" not in vm_flags(small.address)


@needs_thp
@emulated_skip(THP)
def test_a_large_region_of_the_default_allocator_is_backed_by_huge_pages_when_touched() -> None:
    with MapAlloc().alloc(16 << 20) as region:
        fill(region)
        assert region.stats().huge_bytes > 0


@needs_thp
@emulated_skip(THP)
def test_a_large_committed_region_of_the_default_allocator_is_prefaulted_on_huge_pages() -> None:
    with MapAlloc(commit=True).alloc(8 << 20) as region:
        stats = region.stats()
        assert region.backing == Backing.THP
    assert stats.resident_bytes == 8 << 20
    assert stats.huge_bytes > 0


def test_huge_normal_never_advises() -> None:
    alloc = MapAlloc(huge="normal")
    assert (alloc.page_size, alloc.huge) == (PAGE_SIZE, hp.HugePages.NORMAL)
    assert [attempt.backing for attempt in alloc.pages.attempts] == [Backing.NORMAL]
    assert "huge=normal" in repr(alloc)
    with alloc.alloc(16 << 20) as region:
        assert region.backing == Backing.NORMAL
        assert "hg" not in vm_flags(region.address)
    assert MapAllocBuilder().huge("normal").build().huge == hp.HugePages.NORMAL


def test_huge_normal_takes_no_huge_pagesize() -> None:
    with pytest.raises(ValueError, match="huge_pagesize must be None"):
        MapAlloc(huge="normal", huge_pagesize=2 << 20)


def test_without_thp_the_default_allocator_maps_normal_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hp, "thp_mode", lambda: "never")
    alloc = MapAlloc()
    assert [attempt.backing for attempt in alloc.pages.attempts] == [Backing.NORMAL]
    with alloc.alloc(16 << 20) as region:
        assert region.backing == Backing.NORMAL


@needs_thp
def test_reservations_of_the_default_allocator_are_not_advised() -> None:
    alloc = MapAlloc()
    with alloc.reserve(16 << 20) as region:
        region.protect(Perm.READ | Perm.WRITE, 0, 4 << 20)  # committed piece by piece
        assert region.backing == Backing.NORMAL
        assert "hg" not in vm_flags(region.address)
        assert "hg" not in vm_flags(region.address + (8 << 20))


@needs_thp
def test_a_small_region_grown_past_4_mib_is_not_advised() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(PAGE_SIZE)
    alloc.realloc(region, 16 << 20)
    assert region.backing == Backing.NORMAL
    assert "hg" not in vm_flags(region.address)
    alloc.dealloc(region)


@needs_thp
@emulated_skip(THP)
def test_a_large_region_keeps_its_advice_and_alignment_when_it_grows() -> None:
    alloc = MapAlloc()
    region = alloc.alloc(8 << 20)
    region[0] = 7
    alloc.realloc(region, 64 << 20)
    assert region.backing == Backing.THP
    assert region.address % thp_size() == 0
    assert "hg" in vm_flags(region.address + (60 << 20))
    assert region[0] == 7
    alloc.dealloc(region)


@needs_thp
@emulated_skip(THP)
def test_a_cached_large_region_comes_back_advised() -> None:
    alloc = MapAlloc(cache=2)
    region = alloc.alloc(8 << 20)
    address = region.address
    alloc.dealloc(region)
    again = alloc.alloc(8 << 20)
    assert (again.address, again.backing) == (address, Backing.THP)
    assert "hg" in vm_flags(address)
    alloc.dealloc(again)
    alloc.trim()


# ---------------------------------------------------------------- transparent huge pages


@needs_thp
def test_thp_regions_are_aligned_to_and_sized_in_huge_pages() -> None:
    alloc = MapAlloc(huge="thp")
    assert alloc.page_size == thp_size()
    with alloc.alloc(1) as region:
        assert region.address % thp_size() == 0
        assert region.capacity == thp_size()
        assert region.backing == Backing.THP


@needs_thp
def test_thp_regions_honour_alignments_above_the_huge_page_size() -> None:
    alloc = MapAlloc(huge="thp")
    regions = [alloc.alloc(1, align=8 << 20) for _ in range(3)]
    try:
        assert [region.address % (8 << 20) for region in regions] == [0, 0, 0]
    finally:
        for region in regions:
            region.close()


@needs_thp
@emulated_skip(THP)
def test_thp_region_touched_fully_is_backed_by_huge_pages() -> None:
    with MapAlloc(huge="thp").alloc(64 << 20) as region:
        fill(region)
        stats = region.stats()
        anon_huge = sum(
            e.sizes.get("AnonHugePages", 0) for e in smaps(region.address, region.address + 1)
        )
    assert stats.huge_bytes > 0
    assert anon_huge > 0


@needs_thp
@emulated_skip(THP)
def test_thp_commit_prefaults_huge_pages() -> None:
    with MapAlloc(huge="thp", commit=True).alloc(8 << 20) as region:
        stats = region.stats()
    assert stats.resident_bytes == 8 << 20
    assert stats.huge_bytes > 0


@needs_thp
@emulated_skip(THP)
def test_thp_uncommit_gives_whole_huge_pages_back() -> None:
    alloc = MapAlloc(huge="thp", commit=True)
    with alloc.alloc(4 << 20) as region:
        alloc.uncommit(region, thp_size())
        stats = region.stats()
    assert stats.resident_bytes == stats.huge_bytes == thp_size()


@needs_thp
def test_thp_realloc_keeps_alignment_contents_and_backing() -> None:
    alloc = MapAlloc(huge="thp")
    region = alloc.alloc(4 << 20)
    region[-1] = 7
    region = alloc.realloc(region, 64 << 20)
    try:
        assert region.address % thp_size() == 0
        assert region[(4 << 20) - 1] == 7
        assert region.backing == Backing.THP
    finally:
        alloc.dealloc(region)


# ---------------------------------------------------------------- hugetlb


def test_hugetlb_region_is_aligned_to_the_huge_page_size(hugetlb_alloc: MapAlloc) -> None:
    with hugetlb_alloc.alloc(1) as region:
        assert region.address % HUGE == 0
        assert region.capacity == HUGE
        assert region.backing == Backing.HUGETLB


def test_hugetlb_region_is_mapped_with_the_huge_page_size(hugetlb_alloc: MapAlloc) -> None:
    with hugetlb_alloc.alloc(HUGE) as region:
        region[0] = 1
        (entry,) = smaps(region.address, region.address + region.capacity)
        stats = region.stats()
    assert entry.sizes["KernelPageSize"] == HUGE
    assert entry.sizes["Private_Hugetlb"] == HUGE
    assert stats.kernel_page_size == HUGE
    assert stats.huge_bytes == stats.resident_bytes == HUGE


def test_dealloc_returns_hugetlb_pages_to_the_pool(hugetlb_alloc: MapAlloc) -> None:
    free = free_pages()
    region = hugetlb_alloc.alloc(3 * HUGE - 1)
    fill(region)
    assert free_pages() == free - 3
    hugetlb_alloc.dealloc(region)
    assert free_pages() == free


def test_dropping_a_hugetlb_region_returns_its_pages(hugetlb_alloc: MapAlloc) -> None:
    free = free_pages()
    region = hugetlb_alloc.alloc(HUGE)
    fill(region)
    del region
    assert free_pages() == free


def test_hugetlb_regions_honour_alignments_above_the_huge_page_size(
    hugetlb_alloc: MapAlloc,
) -> None:
    with hugetlb_alloc.alloc(1, align=8 * HUGE) as region:
        assert region.address % (8 * HUGE) == 0
        assert region.backing == Backing.HUGETLB


def test_dealloc_unmaps_the_whole_rounded_hugetlb_mapping(hugetlb_alloc: MapAlloc) -> None:
    region = hugetlb_alloc.alloc(PAGE_SIZE)
    address, capacity = region.address, region.capacity
    hugetlb_alloc.dealloc(region)
    assert capacity == HUGE
    assert not mapped(address, capacity)


def test_empty_hugetlb_pool_is_an_alloc_error_with_a_hint_and_maps_nothing() -> None:
    skip_if_emulated(HUGETLB)
    if hugepage_pool(HUGE) is None:
        pytest.skip("this kernel has no 2 MiB hugetlb pages")
    if read_int("/proc/sys/vm/nr_overcommit_hugepages", 0):
        pytest.skip("hugetlb overcommit is on: the pool grows on demand")
    alloc = MapAlloc(huge_pagesize=HUGE)
    before = mapping_count()
    with pytest.raises(AllocError, match=r"huge pages may be empty.*nr_hugepages") as info:
        alloc.alloc((free_pages() + 1) * HUGE)  # more pages than the pool has free
    assert info.value.errno == errno.ENOMEM
    assert mapping_count() == before


def test_hugetlb_commit_faults_in_whole_huge_pages(hugetlb_alloc: MapAlloc) -> None:
    with hugetlb_alloc.alloc(2 * HUGE) as region:
        free = free_pages()
        hugetlb_alloc.commit(region, HUGE)
        assert region.stats().resident_bytes == HUGE
        assert free_pages() == free - 1


def test_hugetlb_uncommit_gives_the_pages_back_and_they_read_as_zero(
    hugetlb_alloc: MapAlloc,
) -> None:
    with hugetlb_alloc.alloc(2 * HUGE) as region:
        fill(region)
        free = free_pages()
        hugetlb_alloc.uncommit(region)
        assert region.stats().resident_bytes == 0
        assert free_pages() == free + 2
        assert region[0] == region[-1] == 0


def test_hugetlb_uncommit_of_part_of_a_huge_page_is_refused(hugetlb_alloc: MapAlloc) -> None:
    region = hugetlb_alloc.alloc(HUGE)
    with region, pytest.raises(ValueError, match="multiple of the page size 2097152"):
        hugetlb_alloc.uncommit(region, PAGE_SIZE)


def test_hugetlb_realloc_grows_by_copying_into_hugetlb_pages(hugetlb_alloc: MapAlloc) -> None:
    free = free_pages()
    region = hugetlb_alloc.alloc(HUGE)
    region[HUGE - 1] = 9
    region = hugetlb_alloc.realloc(region, 3 * HUGE)
    try:
        assert region[HUGE - 1] == 9
        assert region[HUGE] == 0
        assert region.backing == Backing.HUGETLB
        assert region.stats().kernel_page_size == HUGE
    finally:
        hugetlb_alloc.dealloc(region)
    assert free_pages() == free


def test_hugetlb_grow_in_place_maps_the_next_huge_page_or_changes_nothing(
    hugetlb_alloc: MapAlloc,
) -> None:
    with hugetlb_alloc.alloc(HUGE) as region:
        address = region.address
        try:
            hugetlb_alloc.grow_in_place(region, 2 * HUGE)
        except CannotReallocInPlace:
            assert (region.address, region.capacity) == (address, HUGE)
        else:
            assert (region.address, region.capacity) == (address, 2 * HUGE)
            region[2 * HUGE - 1] = 1
            assert region.stats().kernel_page_size == HUGE


def test_hugetlb_shrink_in_place_returns_the_pages(hugetlb_alloc: MapAlloc) -> None:
    free = free_pages()
    with hugetlb_alloc.alloc(3 * HUGE) as region:
        fill(region)
        hugetlb_alloc.shrink_in_place(region, HUGE)
        assert region.capacity == HUGE
        assert free_pages() == free - 1


# ---------------------------------------------------------------- prefer


def test_prefer_takes_hugetlb_pages_when_the_pool_has_them(hugetlb: int) -> None:
    alloc = MapAlloc(huge="prefer", huge_pagesize=hugetlb)
    with alloc.alloc(HUGE) as region:
        assert region.backing == Backing.HUGETLB
        region[0] = 1
        assert region.stats().kernel_page_size == HUGE


def test_prefer_falls_back_when_the_pool_is_short_and_says_so() -> None:
    if hugepage_pool(HUGE) is None:
        pytest.skip("this kernel has no 2 MiB hugetlb pages")
    alloc = MapAlloc(huge="prefer", huge_pagesize=HUGE)
    expected = Backing.THP if hp.thp_available() else Backing.NORMAL
    with alloc.alloc((free_pages() + 1) * HUGE) as region:
        assert region.backing == expected
        assert region.stats().kernel_page_size == PAGE_SIZE


def test_prefer_realloc_falls_back_when_the_pool_is_short(hugetlb: int) -> None:
    alloc = MapAlloc(huge="prefer", huge_pagesize=hugetlb)
    region = alloc.alloc(HUGE)
    region[5] = 5
    region = alloc.realloc(region, (free_pages() + 2) * HUGE)
    try:
        assert region.backing in (Backing.THP, Backing.NORMAL)
        assert region.stats().kernel_page_size == PAGE_SIZE
        assert region[5] == 5
    finally:
        alloc.dealloc(region)
