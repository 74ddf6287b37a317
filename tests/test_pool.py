"""ObjectPool: fixed-size objects carved from mapped slabs."""

from __future__ import annotations

import concurrent.futures
import ctypes
import gc
import itertools
import os
import queue
import random
import resource
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

try:
    import numpy

    HAVE_NUMPY = True
except ImportError:  # pragma: no cover
    HAVE_NUMPY = False

from mmap_alloc import MapAlloc, ObjectPool, PoolStats, Region, _mman
from mmap_alloc import pool as pool_module
from mmap_alloc._linux import PAGE_SIZE, hugepage_pool, mapping_count
from support import RESIDENCY, RLIMIT_AS, emulated_skip, fork_child, run_forked, wait_child

MiB = 1 << 20


@pytest.fixture
def pool() -> Iterator[ObjectPool]:
    with ObjectPool(64) as p:
        yield p


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ for every seed."""
    unit = seed.to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def write(address: int, data: bytes) -> None:
    ctypes.memmove(address, data, len(data))


def read(address: int, size: int) -> bytes:
    return ctypes.string_at(address, size)


# ---------------------------------------------------------------- layout


def test_objects_are_aligned_to_16_by_default() -> None:
    with ObjectPool(24) as pool:
        assert pool.align == 16
        assert pool.stride == 32
        assert all(a % 16 == 0 for a in pool.alloc_many(100))


@pytest.mark.parametrize("align", [1, 2, 8, 64, 256, PAGE_SIZE])
def test_objects_are_aligned_to_align(align: int) -> None:
    with ObjectPool(10, align=align) as pool:
        addresses = pool.alloc_many(50)
        assert all(a % align == 0 for a in addresses)
        assert pool.stride == -(-10 // align) * align


def test_stride_is_obj_size_rounded_up_to_align() -> None:
    with ObjectPool(100, align=32) as pool:
        a, b = sorted(pool.alloc_many(2))
        assert pool.stride == 128
        assert b - a == 128


def test_slab_size_rounds_up_to_whole_pages() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE + 1) as pool:
        assert pool.slab_size == 2 * PAGE_SIZE


def test_default_slab_holds_at_least_64_objects() -> None:
    with ObjectPool(100_000) as pool:
        assert pool.slab_size // pool.stride >= 64
        assert pool.slab_size % PAGE_SIZE == 0


def test_default_slab_of_large_objects_stays_under_64_mib() -> None:
    with ObjectPool(5 * MiB) as pool:
        assert pool.slab_size // pool.stride == 12
        assert pool.slab_size - 12 * pool.stride < PAGE_SIZE
    with ObjectPool(100 * MiB) as pool:
        assert pool.slab_size == 100 * MiB


def test_objects_larger_than_a_page_work() -> None:
    with ObjectPool(3 * PAGE_SIZE + 5, slab_size=4 * PAGE_SIZE) as pool:
        a = pool.alloc()
        write(a, pattern(1, pool.obj_size))
        assert read(a, pool.obj_size) == pattern(1, pool.obj_size)
        pool.free(a)


# ---------------------------------------------------------------- alloc and free


def test_alloc_returns_distinct_live_addresses(pool: ObjectPool) -> None:
    addresses = [pool.alloc() for _ in range(1000)]
    assert len(set(addresses)) == 1000
    assert len(pool) == 1000
    assert all(a in pool for a in addresses)


def test_free_makes_the_address_not_live(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(a)
    assert a not in pool
    assert len(pool) == 0


def test_freed_object_is_reused(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(a)
    assert pool.alloc() == a


def test_objects_hold_what_is_written(pool: ObjectPool) -> None:
    addresses = pool.alloc_many(500)
    for i, a in enumerate(addresses):
        write(a, pattern(i, 64))
    assert all(read(a, 64) == pattern(i, 64) for i, a in enumerate(addresses))


def test_alloc_zeroed_zeroes_a_reused_object(pool: ObjectPool) -> None:
    a = pool.alloc()
    write(a, b"\xff" * 64)
    pool.free(a)
    b = pool.alloc_zeroed()
    assert b == a
    assert read(b, 64) == bytes(64)


def test_alloc_zeroed_of_fresh_memory_is_zero(pool: ObjectPool) -> None:
    assert all(read(a, 64) == bytes(64) for a in (pool.alloc_zeroed() for _ in range(100)))


def test_alloc_many_returns_n_live_objects_across_slabs() -> None:
    with ObjectPool(64, slab_size=16 * PAGE_SIZE) as pool:  # 1024 objects per slab
        addresses = pool.alloc_many(3000)
        assert len(pool) == 3000
        assert len(set(addresses)) == 3000
        assert pool.stats().slabs == 3


def test_alloc_many_of_zero_is_empty(pool: ObjectPool) -> None:
    assert pool.alloc_many(0) == []


def test_free_many_frees_all(pool: ObjectPool) -> None:
    addresses = pool.alloc_many(1000)
    pool.free_many(addresses[:600])
    assert len(pool) == 400
    pool.free_many(iter(addresses[600:]))
    assert len(pool) == 0


def test_objects_do_not_overlap_across_slabs() -> None:
    with ObjectPool(100, slab_size=PAGE_SIZE) as pool:
        addresses = sorted(pool.alloc_many(500))
        assert all(b - a >= 100 for a, b in itertools.pairwise(addresses))
        assert pool.stats().slabs == -(-500 // (PAGE_SIZE // 112))


class _SlabsInOrder(MapAlloc):
    """A MapAlloc whose slabs come from a list made beforehand, in its order."""

    def __init__(self, regions: list[Region]) -> None:
        super().__init__()
        self.regions = regions

    def alloc(self, size: int, *args: object, **kwargs: object) -> Region:
        return self.regions.pop(0)


def _zigzag(items: list[Region]) -> list[Region]:
    middle = len(items) // 2
    pairs = itertools.zip_longest(items[middle:], reversed(items[:middle]))
    return [item for pair in pairs for item in pair if item is not None]


@pytest.mark.parametrize("order", ["rising", "falling", "zigzag", "shuffled"])
def test_slabs_stay_sorted_in_whatever_address_order_they_are_mapped(order: str) -> None:
    """The table of slabs is sorted by address (pool_insert: a binary search,
    then the shorter side moves): every object is found again, whichever end
    or middle the new slabs go in at, and the table grows at both ends."""
    source = MapAlloc()
    regions = sorted((source.alloc(PAGE_SIZE) for _ in range(40)), key=lambda r: r.address)
    if order == "falling":
        regions.reverse()
    elif order == "zigzag":
        regions = _zigzag(regions)
    elif order == "shuffled":
        random.Random(1).shuffle(regions)
    with ObjectPool(64, alloc=_SlabsInOrder(regions), slab_size=PAGE_SIZE) as pool:
        per_slab = PAGE_SIZE // 64
        addresses = [pool.alloc() for _ in range(40 * per_slab)]
        slabs = [address for address, _ in pool._spans()]
        assert slabs == sorted(slabs) and len(slabs) == 40
        assert all(address in pool for address in addresses)
        for address in addresses:
            pool.free(address)
        assert len(pool) == 0


def test_alloc_after_frees_takes_the_lowest_slab_with_room() -> None:
    """pool_refill starts its search past the slabs it knows full: a free in a
    slab below that point (one by one, or by free_many) is found all the same."""
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        per_slab = PAGE_SIZE // 64
        addresses = sorted(pool.alloc() for _ in range(30 * per_slab))
        low, high = addresses[3 * per_slab + 5], addresses[20 * per_slab + 1]
        pool.free(high)
        pool.free(low)
        assert pool.alloc() == low  # the current slab is full: the lowest with room
        assert pool.alloc() == high
        assert pool.alloc() not in addresses  # every slab full again: a new one
        pool.alloc_many(per_slab - 1)  # fills the new slab
        pool.free_many([addresses[per_slab]])
        assert pool.alloc() == addresses[per_slab]
        pool.free(addresses[7])
        assert pool.alloc() == addresses[7]


def test_contains_is_false_for_other_things(pool: ObjectPool) -> None:
    a = pool.alloc()
    assert a + 1 not in pool
    assert a + 64 not in pool
    assert -1 not in pool
    assert 2**80 not in pool
    assert "x" not in pool
    assert None not in pool


# ---------------------------------------------------------------- bad input


def _snapshot(pool: ObjectPool, live: list[int]) -> tuple[int, PoolStats, list[bool]]:
    return len(pool), pool.stats(), [a in pool for a in live]


def test_double_free_raises_and_changes_nothing(pool: ObjectPool) -> None:
    live = pool.alloc_many(3)
    a = pool.alloc()
    pool.free(a)
    before = _snapshot(pool, live)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(a)
    assert _snapshot(pool, live) == before
    assert pool.alloc() == a


@pytest.mark.parametrize("bad", [0, 1, -1, 2**64, 2**200, 4096])
def test_free_of_a_foreign_integer_raises(pool: ObjectPool, bad: int) -> None:
    live = pool.alloc_many(3)
    before = _snapshot(pool, live)
    with pytest.raises(ValueError, match="not an object of this pool"):
        pool.free(bad)
    assert _snapshot(pool, live) == before


def test_free_of_an_address_of_another_pool_raises(pool: ObjectPool) -> None:
    with ObjectPool(64) as other:
        a = other.alloc()
        with pytest.raises(ValueError, match="not an object of this pool"):
            pool.free(a)
        assert a in other


def test_free_of_an_address_inside_an_object_raises(pool: ObjectPool) -> None:
    a = pool.alloc()
    for inside in (a + 1, a + 63):
        with pytest.raises(ValueError, match="inside an object"):
            pool.free(inside)
    assert a in pool
    assert len(pool) == 1


def test_free_of_an_address_past_the_last_object_of_a_slab_raises() -> None:
    with ObjectPool(1000, align=8, slab_size=PAGE_SIZE) as pool:  # 4 objects, 96 bytes of tail
        a = pool.alloc()
        with pytest.raises(ValueError, match="not an object of this pool"):
            pool.free(a + 4 * 1000)


@pytest.mark.parametrize("bad", ["1", 1.0, None, b"x"])
def test_free_of_a_non_integer_raises_type_error(pool: ObjectPool, bad: object) -> None:
    pool.alloc()
    with pytest.raises(TypeError, match="address must be an integer"):
        pool.free(bad)  # type: ignore[arg-type]
    assert len(pool) == 1


@pytest.mark.skipif(not HAVE_NUMPY, reason="needs numpy")
def test_free_accepts_integer_like_objects(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(numpy.uint64(a))  # type: ignore[arg-type]
    assert len(pool) == 0


def test_free_many_with_one_bad_address_frees_none(pool: ObjectPool) -> None:
    live = pool.alloc_many(10)
    for bad in (live[-1] + 1, 12345, -5):
        with pytest.raises(ValueError):
            pool.free_many([*live[:5], bad, *live[5:]])
        assert all(a in pool for a in live)
        assert len(pool) == 10


def test_free_many_with_a_duplicate_frees_none(pool: ObjectPool) -> None:
    live = pool.alloc_many(10)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free_many([*live, live[3]])
    assert all(a in pool for a in live)


def test_free_many_of_a_non_integer_frees_none(pool: ObjectPool) -> None:
    live = pool.alloc_many(3)
    with pytest.raises(TypeError):
        pool.free_many([live[0], "x"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        pool.free_many(5)  # type: ignore[arg-type]
    assert len(pool) == 3


def test_free_many_undo_keeps_emptiness_accounting(pool: ObjectPool) -> None:
    """A rolled-back free_many that emptied a slab leaves it in use."""
    live = pool.alloc_many(3)
    with pytest.raises(ValueError):
        pool.free_many([*live, 1])
    pool.free_many(live)
    assert len(pool) == 0
    assert pool.stats().slabs == 1


@pytest.mark.parametrize(("n", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_alloc_many_rejects_bad_counts(pool: ObjectPool, n: object, error: type) -> None:
    with pytest.raises(error):
        pool.alloc_many(n)  # type: ignore[arg-type]
    assert len(pool) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"obj_size": 0}, ValueError, "obj_size"),
        ({"obj_size": -8}, ValueError, "obj_size"),
        ({"obj_size": 8.0}, TypeError, "obj_size"),
        ({"obj_size": True}, TypeError, "obj_size"),
        ({"obj_size": 8, "align": 3}, ValueError, "align"),
        ({"obj_size": 8, "align": 0}, ValueError, "align"),
        ({"obj_size": 8, "align": 2 * PAGE_SIZE}, ValueError, "align"),
        ({"obj_size": 8, "alloc": "x"}, TypeError, "alloc"),
        ({"obj_size": 8, "slab_size": 0}, ValueError, "slab_size"),
        ({"obj_size": 2 * PAGE_SIZE, "slab_size": PAGE_SIZE}, ValueError, "slab_size"),
        ({"obj_size": 8, "slab_size": 1 << 40}, ValueError, "slab_size"),
    ],
)
def test_bad_construction_raises(kwargs: dict[str, object], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ObjectPool(**kwargs)  # type: ignore[arg-type]


def test_initialising_twice_raises(pool: ObjectPool) -> None:
    with pytest.raises(RuntimeError):
        pool.__init__(64)  # type: ignore[misc]


# ---------------------------------------------------------------- views


def test_view_is_the_object_bytes(pool: ObjectPool) -> None:
    a = pool.alloc()
    write(a, pattern(7, 64))
    with pool.view(a) as view:
        assert view.nbytes == 64
        assert view.tobytes() == pattern(7, 64)
        view[:4] = b"abcd"
    assert read(a, 4) == b"abcd"


def test_view_of_a_free_or_foreign_address_raises(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        pool.view(a)
    with pytest.raises(ValueError, match="not an object"):
        pool.view(12345)


def test_close_with_a_live_view_raises_and_changes_nothing(pool: ObjectPool) -> None:
    a = pool.alloc()
    view = pool.view(a)
    with pytest.raises(BufferError):
        pool.close()
    assert not pool.closed
    assert a in pool
    view.release()
    pool.close()
    assert pool.closed


def test_view_keeps_an_emptied_slab_mapped() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        per_slab = PAGE_SIZE // 64
        addresses = pool.alloc_many(per_slab * (pool_module.KEEP_EMPTY + 3))
        view = pool.view(addresses[0])
        pool.free_many(addresses)
        view[:] = pattern(3, 64)  # the slab is still mapped and writable
        assert view.tobytes() == pattern(3, 64)
        assert pool.stats().slabs >= 1
        view.release()


def test_view_of_a_read_only_pool_is_read_only() -> None:
    with ObjectPool(64, alloc=MapAlloc(write=False)) as pool:
        a = pool.alloc()
        with pool.view(a) as view:
            assert view.readonly
            assert view.tobytes() == bytes(64)
        b = pool.alloc_zeroed()
        pool.free_many([a, b])


def test_view_of_an_inaccessible_pool_raises_buffer_error() -> None:
    with ObjectPool(64, alloc=MapAlloc(read=False, write=False)) as pool:
        a = pool.alloc()
        with pytest.raises(BufferError):
            pool.view(a)
        pool.free(a)


def test_a_views_exporter_cannot_reach_the_slab(pool: ObjectPool) -> None:
    a = pool.alloc()
    with pool.view(a) as view:
        exporter = view.obj
        assert type(exporter) is _mman.View
        assert not [name for name in dir(exporter) if not name.startswith("__")]
    pool.free(a)
    assert pool.alloc_zeroed() == a
    assert read(a, 64) == bytes(64)


def test_executable_pool_hands_out_objects() -> None:
    with ObjectPool(64, alloc=MapAlloc(exec=True)) as pool:
        a = pool.alloc_zeroed()
        write(a, b"\xc3")
        assert read(a, 1) == b"\xc3"


# ---------------------------------------------------------------- close


def test_use_after_close_raises(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.close()
    for use in (
        pool.alloc,
        pool.alloc_zeroed,
        lambda: pool.free(a),
        lambda: pool.alloc_many(1),
        lambda: pool.free_many([a]),
        lambda: pool.view(a),
    ):
        with pytest.raises(ValueError, match="pool is closed"):
            use()
    with pytest.raises(ValueError, match="pool is closed"), pool:
        pass


def test_closed_pool_is_empty(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.close()
    assert len(pool) == 0
    assert a not in pool
    assert pool.stats() == PoolStats(0, 0, 0, 0, 0, 0)
    assert "closed" in repr(pool)


def test_close_is_idempotent(pool: ObjectPool) -> None:
    pool.close()
    pool.close()
    assert pool.closed


def test_close_unmaps_every_slab() -> None:
    before = _mman.mapped_bytes()
    pool = ObjectPool(64, slab_size=PAGE_SIZE)
    pool.alloc_many(10_000)
    assert _mman.mapped_bytes() - before >= 10_000 * 64
    pool.close()
    assert _mman.mapped_bytes() == before


def test_a_dropped_pool_unmaps_its_slabs() -> None:
    gc.collect()
    before = _mman.mapped_bytes()
    pool = ObjectPool(64, slab_size=PAGE_SIZE)
    pool.alloc_many(10_000)
    del pool
    gc.collect()
    assert _mman.mapped_bytes() == before


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
def test_huge_page_allocator_makes_huge_slabs() -> None:
    with ObjectPool(64, alloc=MapAlloc(huge_pagesize=2 * MiB)) as pool:
        a = pool.alloc_zeroed()
        write(a, pattern(1, 64))
        assert pool.slab_size == 2 * MiB
        assert pool.stats().mapped == 2 * MiB


# ---------------------------------------------------------------- threads and fork


THREADS = 8


def test_threads_alloc_and_free_across_threads() -> None:
    """8 threads allocate, write a pattern and pass objects on; whoever frees
    an object checks its pattern first. No address is live twice."""
    rounds, batch = 150, 20
    start = threading.Barrier(THREADS)
    handoff: queue.Queue[tuple[int, bytes]] = queue.Queue()
    live: set[int] = set()
    live_lock = threading.Lock()
    errors: list[str] = []
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)

    def worker(seed: int) -> None:
        start.wait()
        for r in range(rounds):
            got = shared.alloc_many(batch // 2) + [shared.alloc() for _ in range(batch // 2)]
            with live_lock:
                if live.intersection(got):
                    errors.append("an address was handed out twice")
                live.update(got)
            for k, a in enumerate(got):
                data = pattern(seed << 32 | r << 8 | k, 48)
                write(a, data)
                handoff.put((a, data))
            mine = []
            for _ in range(batch):
                a, data = handoff.get()
                if read(a, 48) != data:
                    errors.append(f"pattern lost at 0x{a:x}")
                with live_lock:
                    live.discard(a)
                mine.append(a)
            half = len(mine) // 2
            shared.free_many(mine[:half])
            for a in mine[half:]:
                shared.free(a)

    with (
        ObjectPool(48, slab_size=PAGE_SIZE) as shared,
        concurrent.futures.ThreadPoolExecutor(THREADS) as workers,
    ):
        try:
            list(workers.map(worker, range(THREADS), timeout=60))
        finally:
            sys.setswitchinterval(switch)
        assert errors == []
        assert len(shared) == 0
        assert shared.stats().slabs <= pool_module.KEEP_EMPTY + pool_module.KEEP_SPARE


def test_child_allocates_and_frees_from_a_pool_made_before_fork() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        parent = pool.alloc_many(100)
        for i, a in enumerate(parent):
            write(a, pattern(i, 64))

        def body() -> bool:
            ok = all(read(a, 64) == pattern(i, 64) for i, a in enumerate(parent))
            mine = pool.alloc_many(1000)  # grows the pool: the slow path
            ok &= not set(mine) & set(parent)
            for a in mine:
                write(a, b"c" * 64)
            pool.free_many(mine)
            pool.free_many(parent)
            ok &= len(pool) == 0
            pool.close()
            return ok

        assert wait_child(fork_child(body)) == 0
        assert len(pool) == 100  # the parent's pool is its own
        assert all(read(a, 64) == pattern(i, 64) for i, a in enumerate(parent))


def test_child_grows_a_pool_that_a_thread_was_growing_at_fork() -> None:
    held, release = threading.Event(), threading.Event()

    class SlowAlloc(MapAlloc):
        def alloc(
            self,
            size: int,
            align: int | None = None,
            *,
            near: int | None = None,
            within: int = 1 << 31,
        ) -> Region:
            if threading.current_thread() is not threading.main_thread():
                held.set()
                release.wait()  # inside the pool's growth, holding nothing
            return super().alloc(size, align, near=near, within=within)

    with ObjectPool(64, slab_size=PAGE_SIZE, alloc=SlowAlloc()) as pool:
        grower = threading.Thread(target=lambda: pool.free(pool.alloc()))
        grower.start()
        held.wait()
        try:
            pid = fork_child(lambda: len(pool.alloc_many(1000)) == 1000)
        finally:
            release.set()
            grower.join(timeout=60)
        assert wait_child(pid) == 0


@emulated_skip(RLIMIT_AS)
def test_alloc_many_that_cannot_map_a_slab_takes_nothing() -> None:
    """In a child whose address space is capped just above its size, a batch
    that needs new slabs fails with AllocError and the pool is unchanged."""
    with ObjectPool(64, slab_size=16 * MiB) as pool:
        live = pool.alloc_many(10)

        def body() -> bool:
            with open("/proc/self/status") as status:
                vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize"))
            limit = vm * 1024 + 24 * MiB  # room for one more slab, not two
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            per_slab = pool.slab_size // pool.stride
            try:
                pool.alloc_many(3 * per_slab)
            except MemoryError:
                pass
            else:
                return False
            return len(pool) == 10 and all(a in pool for a in live) and pool.alloc() not in live

        assert wait_child(fork_child(body)) == 0


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


# ---------------------------------------------------------------- docs

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(not README.exists(), reason="needs the source tree's README.md")
def test_readme_pool_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## Object pool", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, str(README), "exec"), {})
    assert "PoolStats(live=0" in capsys.readouterr().out


# ---------------------------------------------------------------- model


class PoolMachine(RuleBasedStateMachine):
    """The pool against a model: a dict of live address -> pattern."""

    addresses = Bundle("addresses")

    def __init__(self) -> None:
        super().__init__()
        self.pool: ObjectPool | None = None
        self.live: dict[int, bytes] = {}
        self.freed: set[int] = set()
        self.views: list[tuple[int, memoryview]] = []
        self.seed = 0
        self.closed = False

    @initialize(
        obj_size=st.integers(1, 700),
        align=st.sampled_from([1, 8, 16, 64, 4096]),
        slabs=st.integers(1, 3),
    )
    def make(self, obj_size: int, align: int, slabs: int) -> None:
        stride = -(-obj_size // align) * align
        self.pool = ObjectPool(obj_size, align=align, slab_size=max(stride, slabs * PAGE_SIZE))

    def _pool(self) -> ObjectPool:
        assert self.pool is not None
        return self.pool

    def _new(self, address: int) -> int:
        pool = self._pool()
        assert address not in self.live
        self.seed += 1
        data = pattern(self.seed, pool.obj_size)
        write(address, data)
        self.live[address] = data
        self.freed.discard(address)
        return address

    def _forget(self, address: int) -> None:
        del self.live[address]
        self.freed.add(address)

    @precondition(lambda self: not self.closed)
    @rule(target=addresses)
    def alloc(self) -> int:
        return self._new(self._pool().alloc())

    @precondition(lambda self: not self.closed)
    @rule(target=addresses)
    def alloc_zeroed(self) -> int:
        pool = self._pool()
        address = pool.alloc_zeroed()
        assert read(address, pool.obj_size) == bytes(pool.obj_size)
        return self._new(address)

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(0, 40))
    def alloc_many(self, n: int) -> None:
        for address in self._pool().alloc_many(n):
            self._new(address)

    @precondition(lambda self: not self.closed)
    @rule(address=consumes(addresses))
    def free(self, address: int) -> None:
        if address in self.live:
            self._pool().free(address)
            self._forget(address)

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data())
    def free_many(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True))
        self._pool().free_many(chosen)
        for address in chosen:
            self._forget(address)

    @precondition(lambda self: not self.closed and bool(self.freed))
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.freed)))
        with pytest.raises(ValueError):
            self._pool().free(address)

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data(), offset=st.integers(1, 4095))
    def free_inside(self, data: st.DataObject, offset: int) -> None:
        pool = self._pool()
        assume(pool.stride > 1)
        address = data.draw(st.sampled_from(sorted(self.live)))
        with pytest.raises(ValueError):
            pool.free(address + 1 + offset % (pool.stride - 1))

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data(), bad=st.sampled_from([0, -1, 1 << 70, 12345]))
    def free_many_with_a_bad_address(self, data: st.DataObject, bad: int) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True))
        with pytest.raises(ValueError):
            self._pool().free_many([*chosen, bad])

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data())
    def write_pattern(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[address]
        self._new(address)

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data())
    def view(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.live)))
        view = self._pool().view(address)
        assert view.tobytes() == self.live[address]
        self.views.append((address, view))

    @precondition(lambda self: bool(self.views))
    @rule(data=st.data())
    def release_view(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.views) - 1))
        address, view = self.views.pop(index)
        if address in self.live:
            assert view.tobytes() == self.live[address]
        view.release()

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        pool = self._pool()
        if self.views:
            with pytest.raises(BufferError):
                pool.close()
            return
        pool.close()
        self.closed = True
        self.live.clear()
        self.freed.clear()

    @precondition(lambda self: self.closed)
    @rule()
    def use_after_close(self) -> None:
        with pytest.raises(ValueError, match="closed"):
            self._pool().alloc()

    @invariant()
    def length_matches(self) -> None:
        if self.pool is not None:
            assert len(self.pool) == len(self.live)

    @invariant()
    def objects_are_aligned_disjoint_and_hold_their_patterns(self) -> None:
        if self.pool is None:
            return
        pool = self._pool()
        ordered = sorted(self.live)
        assert all(b - a >= pool.obj_size for a, b in itertools.pairwise(ordered))
        for address, data in self.live.items():
            assert address % pool.align == 0
            assert address in pool
            assert read(address, pool.obj_size) == data
        assert not any(address in pool for address in self.freed)

    def teardown(self) -> None:
        for _, view in self.views:
            view.release()
        if self.pool is not None:
            self.pool.close()


def test_pool_against_a_model() -> None:
    """The state machine runs in a forked child: hypothesis grows Python's heap
    between the slabs the pools map and unmap, which leaves the parent with
    more (smaller) mappings than it had, though none leaked."""
    run_forked(_run_pool_machine, timeout=300)


def _run_pool_machine() -> None:
    run_state_machine_as_test(  # type: ignore[no-untyped-call,unused-ignore]
        PoolMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_alloc_many_takes_any_integer_with_index(pool: ObjectPool) -> None:
    numpy = pytest.importorskip("numpy")
    addresses = pool.alloc_many(numpy.int64(3))
    assert len(addresses) == 3
    pool.free_many(addresses)


def test_addresses_stay_right_when_slabs_share_object_indices() -> None:
    # 64 objects a slab: the same index in three slabs, freed and taken again
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        first = pool.alloc_many(3 * 64)
        for address in first:
            pool.free(address)
        again = [pool.alloc() for _ in range(3 * 64)]
        assert sorted(again) == sorted(first)
        assert all(address in pool for address in again)
        for address in again:
            ctypes.memset(address, 1, 64)
            pool.free(address)
        assert pool.alloc() in first


def test_close_lets_go_of_the_address_ints_the_pool_remembers() -> None:
    pool = ObjectPool(64)
    address = pool.alloc()
    held = sys.getrefcount(address)
    pool.free(address)
    pool.close()
    assert sys.getrefcount(address) == held - 1
