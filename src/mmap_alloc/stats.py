"""Introspection: what backs a region now, and what an allocator holds.

Everything here is measured when asked, from the kernel: residency from
mincore(2), huge page use from PAGEMAP_SCAN (exact, page by page; Linux 6.7)
or else /proc/self/smaps, locked bytes and the kernel page size from
/proc/self/smaps. Nothing is recorded per allocation, so allocators pay
nothing for it. Regions are taken by what they offer (address, capacity,
protections()), so this module imports none of the classes it describes.
"""

from __future__ import annotations

import errno
import gc
from dataclasses import dataclass
from typing import Any

from ._linux import PAGE_SIZE, SmapsEntry, pagemap_huge_bytes, resident_bytes, smaps
from ._mman import Region as KernelRegion
from .exceptions import CLOSED
from .perm import Perm

_HUGE_FIELDS = ("AnonHugePages", "ShmemPmdMapped", "Private_Hugetlb", "Shared_Hugetlb")


@dataclass(frozen=True)
class RegionStats:
    """A region as the kernel sees it, at one moment."""

    size: int
    capacity: int
    backing: str
    """What was asked for and recorded (see Backing)."""
    resident_bytes: int
    """Bytes of the capacity in memory now (mincore)."""
    huge_bytes: int
    """Bytes of the capacity mapped by resident huge pages (THP or hugetlb)."""
    locked_bytes: int
    """Bytes of the capacity locked in memory (region.lock(), mlock): smaps
    ``Locked:``, resident pages only (``lock(on_fault=True)`` locks pages as
    they are touched)."""
    kernel_page_size: int
    """The page size the kernel maps the region with (KernelPageSize in smaps)."""
    protections: tuple[tuple[int, int, Perm], ...]
    """(offset, length, perms) runs covering the capacity."""


@dataclass(frozen=True)
class CacheStats:
    """What an allocator's mapping cache (``MapAlloc(cache=n)``) holds and did."""

    mappings: int = 0
    """Freed mappings kept for reuse now."""
    bytes: int = 0
    """Their address space, summed (their pages were given back to the kernel)."""
    hits: int = 0
    """Allocations served from the cache so far."""
    misses: int = 0
    """Allocations that found no mapping of their class there (and mapped one)."""


@dataclass(frozen=True)
class AllocStats:
    """What an allocator holds now."""

    regions: int
    """Live (open) regions it made."""
    mapped_bytes: int
    """Their capacities, summed: the address space of its live regions (the
    cache's mappings are counted in ``cache``)."""
    resident_bytes: int
    """Bytes of those regions in memory now (mincore)."""
    cache: CacheStats = CacheStats()
    """The mapping cache: mappings and bytes held, hits and misses."""


def _overlap(entry_start: int, entry_end: int, start: int, end: int) -> int:
    return max(0, min(entry_end, end) - max(entry_start, start))


def _locked_bytes(entry: SmapsEntry, start: int, end: int) -> int:
    """Locked bytes of [start, end) in one smaps entry. smaps counts them per
    mapping (``Locked:``, the mapping's resident pages when it is locked);
    when the kernel merged the region with a locked neighbour, the mapping
    reaches past the region, and the locked bytes inside are its resident
    ones there (mincore): every resident page of a locked mapping is locked."""
    locked: int = entry.sizes.get("Locked", 0)
    if not locked or (start <= entry.start and entry.end <= end):
        return locked
    lo, hi = max(entry.start, start), min(entry.end, end)
    return resident_bytes(lo, hi - lo) if lo < hi else 0


def region_stats(region: Any) -> RegionStats:
    """Residency, huge page and locked bytes, kernel page size and protections."""
    if region.closed:
        raise ValueError(CLOSED)
    start = region.address
    end = start + region.capacity
    entries = smaps(start, end)
    huge = pagemap_huge_bytes(start, end)
    if huge is None:
        # Per mapping: exact unless the kernel merged the region with a neighbour,
        # then at most the overlap.
        huge = sum(
            min(sum(e.sizes.get(f, 0) for f in _HUGE_FIELDS), _overlap(e.start, e.end, start, end))
            for e in entries
        )
    locked = sum(_locked_bytes(e, start, end) for e in entries)
    page = max((e.sizes.get("KernelPageSize", PAGE_SIZE) for e in entries), default=PAGE_SIZE)
    return RegionStats(
        size=region.size,
        capacity=region.capacity,
        backing=region.backing,
        resident_bytes=resident_bytes(start, region.capacity),
        huge_bytes=huge,
        locked_bytes=locked,
        kernel_page_size=page,
        protections=tuple(region.protections()),
    )


def resident_while_mapped(address: int, length: int) -> int | None:
    """resident_bytes, or None when the range was unmapped after it was listed
    (its region closed meanwhile, by another thread, a signal handler or a
    finalizer)."""
    try:
        return resident_bytes(address, length)
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # mincore: a page in the range is not mapped
            return None
        raise


def live_regions(owner: object, region_type: type[KernelRegion]) -> list[KernelRegion]:
    """The open regions of ``region_type`` that ``owner`` made, found through
    the garbage collector: every region refers to its allocator and is tracked
    by the collector, so no bookkeeping is needed at allocation time. Regions
    made before a gc.freeze() are not seen."""
    return [
        obj
        for obj in gc.get_referrers(owner)
        if isinstance(obj, region_type) and obj._owner is owner and not obj.closed
    ]


def alloc_stats(
    owner: object, region_type: type[KernelRegion], cache: CacheStats | None = None
) -> AllocStats:
    """Live regions, bytes mapped and bytes resident of an allocator, and its cache."""
    regions = mapped = resident = 0
    for region in live_regions(owner, region_type):
        try:
            now = resident_while_mapped(region.address, region.capacity)
        except ValueError:  # closed meanwhile, before its address was read
            continue
        if now is None:
            continue
        resident += now
        regions += 1
        mapped += region.capacity
    return AllocStats(
        regions=regions,
        mapped_bytes=mapped,
        resident_bytes=resident,
        cache=cache if cache is not None else CacheStats(),
    )
