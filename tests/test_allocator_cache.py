"""MapAlloc(cache=n): freed mappings kept per class and handed out again, each
as a fresh mapping would be, seen from the kernel's side (/proc/self/maps,
smaps VmFlags, mincore)."""

from __future__ import annotations

import ctypes
import gc
import os
import tracemalloc

import pytest

from mmap_alloc import CacheStats, MapAlloc, MapAllocBuilder, Perm, _mman
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc.allocator import MAX_CACHE
from mmap_alloc.backings import Backing, thp_available
from mmap_alloc.perm import ALL_PERMS
from support import (
    MLOCK,
    RESIDENCY,
    emulated_skip,
    ignored_advice,
    is_mapped,
    kernel_runs,
    pattern,
    perms_at,
    run_in_child,
    skip_if_emulated,
    vm_flags,
)

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
RW, RX = R | W, R | X


def cached(n: int = 4, **options: object) -> MapAlloc:
    return MapAlloc(cache=n, **options)  # type: ignore[arg-type]


def freed_address(alloc: MapAlloc, size: int = 3 * P) -> int:
    """The address of a region of ``size`` bytes, written all over and freed."""
    region = alloc.alloc(size)
    if region.perms & W:
        region[:] = pattern(size)
    address = region.address
    alloc.dealloc(region)
    return address


def resident(address: int, length: int) -> int:
    return sum(byte & 1 for byte in _mman.residency(address, length)) * P


# ---------------------------------------------------------------- configuration


def test_the_cache_is_off_by_default() -> None:
    alloc = MapAlloc()
    assert alloc.cache == 0
    address = freed_address(alloc)
    assert not is_mapped(address, address + 3 * P)
    assert alloc.stats().cache == CacheStats()


def test_the_builder_sets_the_cache() -> None:
    assert MapAllocBuilder().cache(8).build().cache == 8
    assert MapAllocBuilder().build().cache == 0


def test_repr_shows_the_cache() -> None:
    assert "cache=16" in repr(MapAlloc(cache=16))
    assert "cache" not in repr(MapAlloc())


@pytest.mark.parametrize("value", [1.0, "4", None, True])
def test_cache_must_be_an_integer(value: object) -> None:
    with pytest.raises(TypeError, match="cache must be an integer"):
        MapAlloc(cache=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, MAX_CACHE + 1])
def test_cache_must_be_between_zero_and_the_maximum(value: int) -> None:
    with pytest.raises(ValueError, match="cache must be between 0"):
        MapAlloc(cache=value)


# ---------------------------------------------------------------- reuse


def test_dealloc_keeps_the_mapping_and_alloc_of_its_class_takes_it_back() -> None:
    alloc = cached()
    address = freed_address(alloc)
    assert is_mapped(address, address + 3 * P)
    assert alloc.stats().cache == CacheStats(mappings=1, bytes=3 * P, hits=0, misses=1)
    region = alloc.alloc(3 * P - 5)  # the same pages: the same class
    assert region.address == address
    assert (region.size, region.capacity) == (3 * P - 5, 3 * P)
    assert alloc.stats().cache == CacheStats(mappings=0, bytes=0, hits=1, misses=1)
    alloc.dealloc(region)


def test_a_reused_mapping_reads_as_zeros_after_writes() -> None:
    alloc = cached()
    address = freed_address(alloc, 8 * P)
    region = alloc.alloc(8 * P)
    assert region.address == address
    assert bytes(region) == bytes(8 * P)
    assert ctypes.string_at(address, 8 * P) == bytes(8 * P)
    alloc.dealloc(region)


def test_the_pages_of_a_cached_mapping_are_given_back() -> None:
    alloc = cached()
    address = freed_address(alloc, 16 * P)
    assert resident(address, 16 * P) == 0
    region = alloc.alloc(16 * P)
    assert region.stats().resident_bytes == 0  # untouched, as a fresh mapping is
    alloc.dealloc(region)


@emulated_skip(RESIDENCY)
def test_a_committing_allocator_hands_out_reused_mappings_resident() -> None:
    alloc = cached(commit=True)
    address = freed_address(alloc, 16 * P)
    region = alloc.alloc(16 * P)
    assert region.address == address
    assert region.stats().resident_bytes == 16 * P
    assert bytes(region) == bytes(16 * P)
    alloc.dealloc(region)


def test_another_size_class_does_not_take_the_mapping() -> None:
    alloc = cached()
    address = freed_address(alloc, 3 * P)
    region = alloc.alloc(2 * P)
    assert region.address != address
    assert alloc.stats().cache.mappings == 1
    alloc.dealloc(region)
    alloc.trim()


def test_an_alignment_is_a_class_of_its_own() -> None:
    alloc = cached()
    align = 64 * P
    region = alloc.alloc(P, align)
    address = region.address
    alloc.dealloc(region)
    plain = alloc.alloc(P)
    assert plain.address != address
    again = alloc.alloc(P, align)
    assert again.address == address
    assert again.address % align == 0
    assert again._align == align
    for r in (plain, again):
        alloc.dealloc(r)
    alloc.trim()


def test_a_resized_region_is_kept_in_the_class_of_its_new_capacity() -> None:
    alloc = cached()
    region = alloc.alloc(P)
    alloc.realloc(region, 5 * P)
    address = region.address
    alloc.dealloc(region)
    again = alloc.alloc(5 * P)
    assert again.address == address
    assert bytes(again) == bytes(5 * P)
    alloc.dealloc(again)


def test_the_cache_keeps_at_most_n_mappings_per_class() -> None:
    alloc = cached(2)
    regions = [alloc.alloc(P) for _ in range(3)]
    addresses = [r.address for r in regions]
    for region in regions:
        alloc.dealloc(region)
    assert alloc.stats().cache.mappings == 2
    assert [is_mapped(a, a + P) for a in addresses] == [True, True, False]
    assert alloc.trim() == 2 * P


def test_mappings_are_taken_back_last_freed_first() -> None:
    alloc = cached()
    first, second = alloc.alloc(P), alloc.alloc(P)
    a, b = first.address, second.address
    alloc.dealloc(first)
    alloc.dealloc(second)
    x, y = alloc.alloc(P), alloc.alloc(P)
    assert (x.address, y.address) == (b, a)
    alloc.dealloc(x)
    alloc.dealloc(y)
    alloc.trim()


def test_a_dealloced_region_is_closed_and_its_address_unreachable_through_it() -> None:
    alloc = cached()
    region = alloc.alloc(P)
    alloc.dealloc(region)
    assert region.closed
    with pytest.raises(ValueError, match="closed"):
        region[0]
    with pytest.raises(ValueError, match="already freed"):
        alloc.dealloc(region)
    alloc.trim()


# ---------------------------------------------------------------- exactly the protection asked for


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_a_reused_mapping_has_exactly_the_allocators_permissions(perms: Perm) -> None:
    alloc = MapAlloc(read=bool(perms & R), write=bool(perms & W), exec=bool(perms & X), cache=2)
    region = alloc.alloc(2 * P)
    address = region.address
    region.protect(RW)
    region[:] = pattern(2 * P)
    region.protect(Perm.NONE, P, P)
    alloc.dealloc(region)
    again = alloc.alloc(2 * P)
    assert again.address == address
    assert again.perms == perms
    assert kernel_runs(again) == [(0, 2 * P, perms)]
    again.protect(R)
    assert bytes(again) == bytes(2 * P)
    alloc.dealloc(again)
    alloc.trim()


def test_a_read_only_allocator_reuses_a_mapping_written_through_protect() -> None:
    alloc = cached(write=False)
    region = alloc.alloc(4 * P)
    address = region.address
    region.protect(RW)
    region[:] = b"\x7f" * (4 * P)
    alloc.dealloc(region)
    again = alloc.alloc(4 * P)
    assert again.address == address
    assert again.perms == R
    assert perms_at(address) == R
    assert bytes(again) == bytes(4 * P)
    with pytest.raises(TypeError):
        again[0] = 1
    alloc.dealloc(again)
    alloc.trim()


def test_code_made_executable_is_not_executable_when_reused() -> None:
    alloc = cached()
    region = alloc.alloc(P)
    address = region.address
    region[0] = 0xC3
    region.make_exec()
    alloc.dealloc(region)
    again = alloc.alloc(P)
    assert again.address == address
    assert kernel_runs(again) == [(0, P, RW)]
    assert again[0] == 0
    alloc.dealloc(again)
    alloc.trim()


# ---------------------------------------------------------------- state the kernel keeps


@pytest.mark.parametrize(
    ("advice", "flag"),
    [
        ("random", "rr"),
        ("sequential", "sr"),
        ("dontdump", "dd"),
        ("wipeonfork", "wf"),
        ("dontfork", "dc"),
        ("nohugepage", "nh"),
    ],
)
def test_a_mapping_with_advice_the_kernel_keeps_is_unmapped_not_cached(
    advice: str, flag: str
) -> None:
    skip_if_emulated(ignored_advice(advice))
    alloc = cached()
    region = alloc.alloc(2 * P)
    address = region.address
    region.advise(advice)
    assert flag in vm_flags(address)
    alloc.dealloc(region)
    assert not is_mapped(address, address + 2 * P)
    assert alloc.stats().cache.mappings == 0
    fresh = alloc.alloc(2 * P)
    assert flag not in vm_flags(fresh.address)
    alloc.dealloc(fresh)
    alloc.trim()


@pytest.mark.parametrize("advice", ["dontneed", "willneed", "free", "cold", "populate_write"])
def test_advice_that_leaves_no_state_does_not_keep_a_mapping_out(advice: str) -> None:
    alloc = cached()
    region = alloc.alloc(2 * P)
    address = region.address
    region[:] = b"\1" * (2 * P)
    region.advise(advice)
    alloc.dealloc(region)
    again = alloc.alloc(2 * P)
    assert again.address == address
    assert bytes(again) == bytes(2 * P)
    alloc.dealloc(again)
    alloc.trim()


def test_advice_taken_back_leaves_the_mapping_reusable() -> None:
    alloc = cached()
    region = alloc.alloc(2 * P)
    address = region.address
    region.advise("dontdump")
    region.advise("dodump")
    alloc.dealloc(region)
    again = alloc.alloc(2 * P)
    assert again.address == address
    assert "dd" not in vm_flags(address)
    alloc.dealloc(again)
    alloc.trim()


@pytest.mark.parametrize("unlock", [False, True], ids=["locked", "locked then unlocked"])
def test_a_locked_mapping_is_unmapped_not_cached(unlock: bool) -> None:
    alloc = cached()
    region = alloc.alloc(2 * P)
    address = region.address
    region.lock()
    if unlock:
        region.unlock()
    alloc.dealloc(region)
    assert not is_mapped(address, address + 2 * P)
    fresh = alloc.alloc(2 * P)
    fresh[:] = b"\1" * (2 * P)
    assert fresh.stats().locked_bytes == 0
    assert "lo" not in vm_flags(fresh.address)
    alloc.dealloc(fresh)
    alloc.trim()


@emulated_skip(MLOCK)
def test_a_mapping_locked_on_fault_is_unmapped_not_cached() -> None:
    alloc = cached()
    region = alloc.alloc(2 * P)
    address = region.address
    region.lock(on_fault=True)
    alloc.dealloc(region)
    assert not is_mapped(address, address + 2 * P)


def test_a_reservation_is_never_cached() -> None:
    alloc = cached()
    region = alloc.reserve(4 * P)
    address = region.address
    alloc.dealloc(region)
    assert not is_mapped(address, address + 4 * P)
    assert alloc.stats().cache.mappings == 0


def test_close_and_collection_unmap_as_without_a_cache() -> None:
    alloc = cached()
    closed, dropped = alloc.alloc(P), alloc.alloc(P)
    a, b = closed.address, dropped.address
    closed.close()
    del dropped
    gc.collect()
    assert not is_mapped(a, a + P)
    assert not is_mapped(b, b + P)
    assert alloc.stats().cache.mappings == 0


def test_dealloc_while_exported_is_buffer_error_and_caches_nothing() -> None:
    alloc = cached()
    region = alloc.alloc(P)
    view = memoryview(region)
    with pytest.raises(BufferError):
        alloc.dealloc(region)
    assert not region.closed
    assert alloc.stats().cache.mappings == 0
    view.release()
    alloc.dealloc(region)
    alloc.trim()


# ---------------------------------------------------------------- trim, stats, the end


def test_trim_unmaps_every_cached_mapping_and_says_how_many_bytes() -> None:
    alloc = cached()
    start = _mman.mapped_bytes()
    sizes = (P, 2 * P, 3 * P)
    addresses = [freed_address(alloc, size) for size in sizes]
    assert _mman.mapped_bytes() == start + 6 * P  # cached mappings are still mapped
    assert alloc.stats().cache == CacheStats(mappings=3, bytes=6 * P, hits=0, misses=3)
    assert alloc.trim() == 6 * P
    assert not any(is_mapped(a, a + n) for a, n in zip(addresses, sizes, strict=True))
    assert _mman.mapped_bytes() == start
    assert alloc.stats().cache.mappings == 0
    assert alloc.trim() == 0


def test_stats_count_hits_and_misses() -> None:
    alloc = cached()
    for _ in range(5):
        alloc.dealloc(alloc.alloc(P))
    assert alloc.stats().cache == CacheStats(mappings=1, bytes=P, hits=4, misses=1)
    alloc.trim()


def test_stats_regions_do_not_count_cached_mappings() -> None:
    alloc = cached()
    live = alloc.alloc(P)
    freed_address(alloc, 2 * P)
    stats = alloc.stats()
    assert (stats.regions, stats.mapped_bytes) == (1, P)
    alloc.dealloc(live)
    alloc.trim()


def test_the_allocators_end_unmaps_its_cache() -> None:
    start = _mman.mapped_bytes()
    alloc = cached()
    address = freed_address(alloc, 4 * P)
    del alloc
    gc.collect()
    assert not is_mapped(address, address + 4 * P)
    assert _mman.mapped_bytes() == start


# ---------------------------------------------------------------- fork


def test_a_forked_child_reuses_a_cached_mapping_as_zeros_and_the_parent_keeps_its_own() -> None:
    alloc = cached()
    live = alloc.alloc(2 * P)
    live[:] = b"\x5a" * (2 * P)
    address = freed_address(alloc, 2 * P)

    def child() -> None:
        again = alloc.alloc(2 * P)
        assert again.address == address
        assert bytes(again) == bytes(2 * P)
        again[:] = b"\x33" * (2 * P)
        live_address = live.address
        alloc.dealloc(live)  # the child's copy of a live region goes to its cache
        other = alloc.alloc(2 * P)
        assert other.address == live_address
        assert bytes(other) == bytes(2 * P)

    assert run_in_child(child) == 0
    assert bytes(live) == b"\x5a" * (2 * P)  # the child gave back its pages, not ours
    again = alloc.alloc(2 * P)
    assert again.address == address
    assert bytes(again) == bytes(2 * P)
    for region in (again, live):
        alloc.dealloc(region)
    alloc.trim()


def test_a_mapping_freed_in_the_parent_after_fork_is_not_shared_with_the_child() -> None:
    alloc = cached()
    region = alloc.alloc(P)
    address = region.address
    region[:] = b"\x44" * P
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(write_end)
            os.read(read_end, 1)  # until the parent freed and reused it
            status = 0 if bytes(region) == b"\x44" * P else 2
        finally:
            os._exit(status)
    os.close(read_end)
    alloc.dealloc(region)
    again = alloc.alloc(P)
    assert again.address == address
    again[:] = b"\x99" * P  # a fresh page of the parent's: the child keeps its own
    os.write(write_end, b"x")
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    alloc.dealloc(again)
    alloc.trim()


def test_tracemalloc_sees_a_cached_mapping_only_while_it_is_a_region() -> None:
    def traced() -> int:
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.DomainFilter(inclusive=True, domain=_mman.TRACE_DOMAIN)]
        )
        return sum(trace.size for trace in snapshot.traces)

    alloc = cached()
    tracemalloc.start()
    try:
        region = alloc.alloc(16 * P)
        assert traced() == 16 * P
        alloc.dealloc(region)
        assert traced() == 0  # kept, but its pages are the kernel's
        region = alloc.alloc(16 * P)
        assert traced() == 16 * P
        alloc.dealloc(region)
        alloc.trim()
        assert traced() == 0
    finally:
        tracemalloc.stop()


@pytest.mark.skipif(not thp_available(), reason="transparent huge pages unavailable")
def test_only_what_a_fresh_mapping_of_the_class_would_be_is_kept() -> None:
    alloc = cached()  # regions of 4 MiB and more are advised for THP when fresh
    grown = alloc.alloc(P)
    alloc.realloc(grown, 8 << 20)  # grown past 4 MiB: base pages, not advised
    address = grown.address
    alloc.dealloc(grown)
    assert alloc.stats().cache.mappings == 0
    assert not is_mapped(address, address + (8 << 20))
    fresh = alloc.alloc(8 << 20)
    assert fresh.backing == Backing.THP
    fresh_address = fresh.address
    alloc.dealloc(fresh)
    again = alloc.alloc(8 << 20)
    assert (again.address, again.backing) == (fresh_address, Backing.THP)
    alloc.dealloc(again)
    alloc.trim()
