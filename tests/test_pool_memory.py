"""ObjectPool: fixed-size objects carved from mapped slabs.

Memory: what stays resident and mapped as objects come and go."""

from __future__ import annotations

import ctypes
import os

import pytest

from mmap_alloc import MapAlloc, ObjectPool, Region, _linux
from mmap_alloc import pool as pool_module
from mmap_alloc._linux import PAGE_SIZE, hugepage_pool, mapping_count
from pool_support import MiB, pattern, read, write
from support import HUGETLB, RESIDENCY, emulated_skip, on_entry

# ---------------------------------------------------------------- memory


def test_stats_counts_live_objects_and_slabs() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        addresses = pool.alloc_many(100)  # 64 per slab: 2 slabs
        for a in addresses:
            write(a, b"x")
        stats = pool.stats()
        assert stats.live == 100
        assert stats.capacity == 128
        assert stats.slabs == 2
        assert stats.mapped == 2 * PAGE_SIZE
        assert stats.resident == 2 * PAGE_SIZE
        assert 0 < stats.metadata < PAGE_SIZE


def test_stats_leave_out_a_slab_unmapped_while_they_read_it() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        objects = pool.alloc_many(4 * 64)  # four slabs
        with on_entry(_linux.resident_bytes, lambda: pool.free_many(objects)):
            stats = pool.stats()  # the empty slabs go: one kept, two spare, one unmapped
        assert stats.live == 4 * 64 and stats.resident == 0


@emulated_skip(RESIDENCY)
def test_pool_of_a_committing_allocator_is_resident_at_once() -> None:
    with ObjectPool(64, alloc=MapAlloc(commit=True), slab_size=16 * PAGE_SIZE) as pool:
        pool.alloc()
        assert pool.stats().resident == 16 * PAGE_SIZE


def test_emptied_pool_gives_memory_back() -> None:
    """Fill 256 MiB, free all: at most a few slabs stay mapped, one resident."""
    with ObjectPool(64 * 1024) as pool:
        addresses = pool.alloc_many(256 * MiB // pool.obj_size)
        for a in addresses:
            ctypes.memset(a, 1, pool.obj_size)
        full = pool.stats()
        assert full.resident >= 256 * MiB
        pool.free_many(addresses)
        empty = pool.stats()
        assert empty.live == 0
        assert empty.resident <= pool_module.KEEP_EMPTY * pool.slab_size
        assert empty.slabs <= pool_module.KEEP_EMPTY + pool_module.KEEP_SPARE
        kept = pool_module.KEEP_EMPTY + pool_module.KEEP_SPARE
        pool.alloc_many(kept * pool.slab_size // pool.stride)  # the kept slabs are reused
        assert pool.stats().slabs <= pool_module.KEEP_EMPTY + pool_module.KEEP_SPARE


def test_freeing_one_by_one_gives_memory_back() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        addresses = pool.alloc_many(64 * 50)
        for a in addresses:
            ctypes.memset(a, 1, 1)
        for a in reversed(addresses):
            pool.free(a)
        stats = pool.stats()
        assert stats.slabs <= pool_module.KEEP_EMPTY + pool_module.KEEP_SPARE
        assert stats.resident <= pool_module.KEEP_EMPTY * PAGE_SIZE


def test_alloc_zeroed_from_kept_and_spare_slabs_reads_as_zero() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        addresses = pool.alloc_many(64 * 4)
        for a in addresses:
            write(a, b"\xff" * 64)
        pool.free_many(addresses)
        again = [pool.alloc_zeroed() for _ in range(64 * 4)]
        assert all(read(a, 64) == bytes(64) for a in again)


class _Preparing(MapAlloc):
    """A MapAlloc that does ``prepare`` to each region before handing it out."""

    def __init__(self, prepare: str) -> None:
        super().__init__()
        self.prepare = prepare

    def alloc(self, size: int, *args: object, **kwargs: object) -> Region:
        region = super().alloc(size)
        if self.prepare == "lock":
            region.lock()
        else:
            region.advise(self.prepare)
        return region


@pytest.mark.parametrize("prepare", ["lock", "random"])
def test_a_region_locked_or_given_lasting_advice_is_refused_as_a_slab(prepare: str) -> None:
    """The pool gives an empty slab's pages back and takes them as zero again:
    pages the kernel keeps state for (locked ones refuse to go) are no slab."""
    with ObjectPool(64, alloc=_Preparing(prepare), slab_size=PAGE_SIZE) as pool:
        with pytest.raises(ValueError, match=r"cannot be a slab: it was locked or given advice"):
            pool.alloc()
        assert pool.stats().slabs == 0


def test_alloc_zeroed_is_zero_from_slabs_whose_pages_the_kernel_kept() -> None:
    """A slab the kernel refused to take the pages of (locked behind the pool's
    back: MADV_DONTNEED fails) is unmapped, never kept as a spare taken as zero."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        addresses = pool.alloc_many(3 * 64)  # three slabs
        for a in addresses:
            write(a, b"\xab" * 64)
        spans = pool._spans()
        for address, length in spans:
            if libc.mlock(address, length) != 0:
                pytest.skip(f"mlock: {os.strerror(ctypes.get_errno())}")
        try:
            pool.free_many(addresses)  # one slab kept, two given back
            again = [pool.alloc_zeroed() for _ in range(3 * 64)]
            assert [a for a in again if read(a, 64) != bytes(64)] == []
        finally:
            for address, length in spans:
                libc.munlock(address, length)


def test_a_million_64_byte_objects_fit_in_70_mib_and_200_mappings() -> None:
    before = mapping_count()
    with ObjectPool(64, alloc=MapAlloc(commit=True)) as pool:
        for _ in range(100):
            pool.alloc_many(10_000)
        stats = pool.stats()
        assert stats.live == 1_000_000
        assert stats.resident + stats.metadata <= 70 * MiB
        assert mapping_count() - before <= 200
        overhead = stats.mapped + stats.metadata - stats.live * 64
        assert overhead / (stats.live * 64) <= 0.02


def _free_huge_pages(size: int) -> int:
    huge = hugepage_pool(size)
    return 0 if huge is None else huge.free


@pytest.mark.skipif(
    _free_huge_pages(2 * MiB) < 2,
    reason="needs two free 2 MiB huge pages (echo 8 > /proc/sys/vm/nr_hugepages)",
)
@emulated_skip(HUGETLB)
def test_huge_page_allocator_makes_huge_slabs() -> None:
    with ObjectPool(64, alloc=MapAlloc(huge_pagesize=2 * MiB)) as pool:
        a = pool.alloc_zeroed()
        write(a, pattern(1, 64))
        assert pool.slab_size == 2 * MiB
        assert pool.stats().mapped == 2 * MiB


# ---------------------------------------------------------------- stress


@pytest.mark.stress
@pytest.mark.skipif(
    not os.environ.get("MMAP_ALLOC_STRESS"), reason="long form: set MMAP_ALLOC_STRESS=1"
)
def test_emptied_1_gib_pool_holds_a_few_slabs() -> None:
    with ObjectPool(64 * 1024) as pool:
        addresses = pool.alloc_many((1 << 30) // pool.obj_size)
        for a in addresses:
            ctypes.memset(a, 1, pool.obj_size)
        pool.free_many(addresses)
        stats = pool.stats()
        assert stats.resident <= pool_module.KEEP_EMPTY * pool.slab_size
        assert stats.slabs <= pool_module.KEEP_EMPTY + pool_module.KEEP_SPARE
