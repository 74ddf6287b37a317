"""Introspection: residency, huge page use and protections of regions; allocator totals."""

from __future__ import annotations

import dataclasses

import pytest

from mmap_alloc import MapAlloc, Perm, Region, _linux, stats
from mmap_alloc.backings import Backing, thp_available
from mmap_alloc.stats import AllocStats, RegionStats
from support import MLOCK, RESIDENCY, THP, adjacent_pair, emulated_skip, on_entry

needs_thp = pytest.mark.skipif(not thp_available(), reason="transparent huge pages unavailable")


def touch(region: Region, pages: int, page: int) -> None:
    for i in range(pages):
        region[i * page] = 1


# ---------------------------------------------------------------- regions


def test_fresh_region_has_nothing_resident(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        assert region.stats().resident_bytes == 0


def test_touching_k_pages_makes_k_pages_resident(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        touch(region, 5, page)
        assert region.stats().resident_bytes == 5 * page


def test_uncommit_makes_touched_pages_non_resident_again(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        touch(region, 5, page)
        alloc.uncommit(region)
        assert region.stats().resident_bytes == 0


@emulated_skip(RESIDENCY)
def test_commit_makes_the_range_resident(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        alloc.commit(region, 4 * page, 3 * page)
        assert region.stats().resident_bytes == 3 * page


def test_normal_region_uses_base_pages_and_no_huge_pages(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        touch(region, 16, page)
        result = region.stats()
    assert result.backing == Backing.NORMAL
    assert result.kernel_page_size == page
    assert result.huge_bytes == 0


def test_stats_describe_size_capacity_and_protections(page: int) -> None:
    alloc = MapAlloc(write=False)
    with alloc.alloc(page + 1) as region:
        result = region.stats()
    assert (result.size, result.capacity) == (page + 1, 2 * page)
    assert result.protections == ((0, 2 * page, Perm.READ),)


def test_stats_are_frozen(alloc: MapAlloc) -> None:
    with alloc.alloc(1) as region:
        result = region.stats()
    assert isinstance(result, RegionStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.resident_bytes = 0  # type: ignore[misc]


def test_stats_of_a_closed_region_is_a_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc(1)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        region.stats()


@emulated_skip(RESIDENCY)
def test_stats_of_an_inaccessible_region_still_work(page: int) -> None:
    with MapAlloc(read=False, write=False).alloc(page) as region:
        result = region.stats()
    assert result.resident_bytes == 0
    assert result.protections == ((0, page, Perm.NONE),)


@needs_thp
@emulated_skip(THP)
def test_huge_bytes_count_only_the_regions_own_pages() -> None:
    """Neighbouring regions may share one kernel mapping; the figure is per region."""
    alloc = MapAlloc(huge="thp", commit=True)
    with alloc.alloc(8 << 20) as touched, MapAlloc(huge="thp").alloc(8 << 20) as untouched:
        assert touched.stats().huge_bytes > 0
        assert untouched.stats().huge_bytes == 0


@needs_thp
@emulated_skip(THP)
def test_huge_bytes_fall_back_to_smaps_without_pagemap_scan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with MapAlloc(huge="thp", commit=True).alloc(8 << 20) as region:
        exact = region.stats().huge_bytes
        monkeypatch.setattr(stats, "pagemap_huge_bytes", lambda start, end: None)
        from_smaps = region.stats().huge_bytes
    assert 0 < from_smaps <= 8 << 20
    assert exact > 0


# ---------------------------------------------------------------- locked bytes


def test_a_fresh_region_has_nothing_locked(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        touch(region, 16, page)
        assert region.stats().locked_bytes == 0


def test_lock_locks_every_page_of_the_range_and_unlock_releases_them(
    alloc: MapAlloc, page: int
) -> None:
    with alloc.alloc(16 * page) as region:
        region.lock()
        assert region.stats().locked_bytes == 16 * page  # mlock faults every page in
        assert region.stats().resident_bytes == 16 * page
        region.unlock(0, 4 * page)
        assert region.stats().locked_bytes == 12 * page
        region.unlock()
        assert region.stats().locked_bytes == 0


@emulated_skip(MLOCK)
def test_lock_on_fault_locks_only_the_pages_touched(alloc: MapAlloc, page: int) -> None:
    with alloc.alloc(16 * page) as region:
        region.lock(on_fault=True)
        assert region.stats().locked_bytes == 0
        assert region.stats().resident_bytes == 0
        touch(region, 3, page)
        assert region.stats().locked_bytes == 3 * page
        region.unlock()
        assert region.stats().locked_bytes == 0


def test_locked_bytes_count_only_the_regions_own_pages(alloc: MapAlloc, page: int) -> None:
    """Two locked neighbours may share one kernel mapping; the figure is per region."""
    first, second = adjacent_pair(alloc, 4 * page, 4 * page)
    with first, second:
        first.lock(on_fault=True)
        second.lock(on_fault=True)
        touch(first, 1, page)
        touch(second, 4, page)
        assert first.stats().locked_bytes == page
        assert second.stats().locked_bytes == 4 * page
        first.unlock()
        second.unlock()


# ---------------------------------------------------------------- allocators


def test_alloc_stats_count_live_regions_bytes_mapped_and_resident(page: int) -> None:
    alloc = MapAlloc()
    regions = [alloc.alloc(n * page) for n in (1, 2, 3)]
    touch(regions[2], 2, page)
    try:
        assert alloc.stats() == AllocStats(
            regions=3, mapped_bytes=6 * page, resident_bytes=2 * page
        )
    finally:
        for region in regions:
            region.close()


def test_alloc_stats_forget_freed_regions(page: int) -> None:
    alloc = MapAlloc()
    kept, freed = alloc.alloc(page), alloc.alloc(2 * page)
    alloc.dealloc(freed)
    with kept:
        assert alloc.stats() == AllocStats(regions=1, mapped_bytes=page, resident_bytes=0)


def test_alloc_stats_ignore_other_allocators_regions(page: int) -> None:
    mine, other = MapAlloc(), MapAlloc()
    with mine.alloc(page), other.alloc(4 * page):
        assert mine.stats().mapped_bytes == page


def test_alloc_stats_of_a_new_allocator_are_zero() -> None:
    assert MapAlloc().stats() == AllocStats(regions=0, mapped_bytes=0, resident_bytes=0)


def test_alloc_stats_leave_out_a_region_closed_while_they_read_it(page: int) -> None:
    alloc = MapAlloc()
    closing = alloc.alloc(2 * page)
    with on_entry(_linux.resident_bytes, lambda: alloc.dealloc(closing)):
        assert alloc.stats() == AllocStats(regions=0, mapped_bytes=0, resident_bytes=0)
