"""ObjectPool: fixed-size objects carved from mapped slabs.

Threads and fork."""

from __future__ import annotations

import concurrent.futures
import queue
import resource
import sys
import threading
import time

import pytest

from mmap_alloc import MapAlloc, ObjectPool, Region
from mmap_alloc import pool as pool_module
from mmap_alloc._linux import PAGE_SIZE
from pool_support import MiB, pattern, read, write
from support import RLIMIT_AS, emulated_skip, fork_child, run_child, wait_child

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


def free_many_of_a_changing_list(seconds: float) -> dict[str, int]:
    """One thread frees batches through free_many(shared) while another
    pops, appends and clears that same list (a child's body)."""
    pool = ObjectPool(64)
    shared: list[int] = []
    deadline = time.monotonic() + seconds
    counts = {"freed": 0, "refused": 0, "changes": 0}

    def change() -> None:
        while time.monotonic() < deadline:
            if shared:
                shared.pop()
            shared.append(1 << 70)  # no address: a list holding it is refused
            del shared[:]
            counts["changes"] += 1

    def free() -> None:
        while time.monotonic() < deadline:
            shared[:] = pool.alloc_many(64)
            try:
                pool.free_many(shared)
                counts["freed"] += 1
            except (ValueError, TypeError):
                counts["refused"] += 1

    threads = [threading.Thread(target=change), threading.Thread(target=free)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pool.close()
    return counts


@pytest.mark.skipif(
    getattr(sys, "_is_gil_enabled", lambda: True)(),
    reason="the race needs two threads running at once: a free-threaded build without the GIL",
)
def test_free_many_of_a_list_another_thread_changes_never_crashes() -> None:
    """Without a GIL the kernel reads a copy of the list: read in place, an
    item another thread popped meanwhile was freed memory (SIGSEGV)."""
    result = run_child("test_pool_threads", "free_many_of_a_changing_list", 2.0, timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.value["freed"] + result.value["refused"] > 100, result.value
    assert result.value["changes"] > 100, result.value


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
