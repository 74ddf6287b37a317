"""Introspection: what backs a region now, and what an allocator holds.

Everything here is measured when asked, from the kernel: residency from
mincore(2), huge page use from PAGEMAP_SCAN (exact, page by page; Linux 6.7)
or else /proc/self/smaps, the kernel page size from /proc/self/smaps.
Nothing is recorded per allocation, so allocators pay nothing for it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._platform import PAGE_SIZE, pagemap_huge_bytes, smaps
from .hugepages import Backing, backing_of
from .perm import Perm
from .region import Region

if TYPE_CHECKING:
    from .allocator import MapAlloc

_RESIDENT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each byte
_HUGE_FIELDS = ("AnonHugePages", "Private_Hugetlb", "Shared_Hugetlb")


@dataclass(frozen=True)
class RegionStats:
    """A region as the kernel sees it, at one moment."""

    size: int
    capacity: int
    backing: Backing
    """What was asked for and recorded (see Backing)."""
    resident_bytes: int
    """Bytes of the capacity in memory now (mincore)."""
    huge_bytes: int
    """Bytes of the capacity mapped by resident huge pages (THP or hugetlb)."""
    kernel_page_size: int
    """The page size the kernel maps the region with (KernelPageSize in smaps)."""
    protections: tuple[tuple[int, int, Perm], ...]
    """(offset, length, perms) runs covering the capacity."""


@dataclass(frozen=True)
class AllocStats:
    """What an allocator holds now."""

    regions: int
    """Live (open) regions it made."""
    mapped_bytes: int
    """Their capacities, summed: the address space it holds."""
    resident_bytes: int
    """Bytes of those regions in memory now (mincore)."""


def resident_bytes(region: Region) -> int:
    """Bytes of the region's capacity that are in memory now."""
    vector = region._mincore(0, region.capacity)
    return (len(vector) - vector.translate(_RESIDENT).count(0)) * PAGE_SIZE


def region_stats(region: Region) -> RegionStats:
    """Residency, huge page use, kernel page size and protections of ``region``."""
    if region.closed:
        raise ValueError("region is closed")
    start = region.address
    end = start + region.capacity
    resident = resident_bytes(region)
    entries = smaps(start, end)
    huge = pagemap_huge_bytes(start, end)
    if huge is None:
        # Per mapping: exact unless the kernel merged the region with a neighbour,
        # then at most the overlap.
        huge = sum(
            min(sum(e.sizes.get(f, 0) for f in _HUGE_FIELDS), min(e.end, end) - max(e.start, start))
            for e in entries
        )
    page = max((e.sizes.get("KernelPageSize", PAGE_SIZE) for e in entries), default=PAGE_SIZE)
    return RegionStats(
        size=region.size,
        capacity=region.capacity,
        backing=backing_of(region),
        resident_bytes=resident,
        huge_bytes=huge,
        kernel_page_size=page,
        protections=tuple(region.protections()),
    )


def live_regions(alloc: MapAlloc) -> list[Region]:
    """The open regions ``alloc`` made, found through the garbage collector.

    Every region refers to its allocator, and regions are tracked by the
    collector, so no bookkeeping is needed at allocation time. Regions made
    before a gc.freeze() are not seen.
    """
    return [
        obj
        for obj in gc.get_referrers(alloc)
        if isinstance(obj, Region) and obj._owner is alloc and not obj.closed
    ]


def alloc_stats(alloc: MapAlloc) -> AllocStats:
    """Live regions, bytes mapped and bytes resident of ``alloc``."""
    regions = mapped = resident = 0
    for region in live_regions(alloc):
        try:
            resident += resident_bytes(region)
        except ValueError:  # closed by another thread meanwhile
            continue
        regions += 1
        mapped += region.capacity
    return AllocStats(regions=regions, mapped_bytes=mapped, resident_bytes=resident)
