"""Threads: regions made, filled, handed over and freed by many threads stay intact.

Each scenario runs in a child interpreter, with a short GIL switch interval
so that threads interleave between any two bytecodes.
"""

from __future__ import annotations

import queue
import random
import sys
import threading
from typing import Any

import pytest

from mmap_alloc import CannotReallocInPlace, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from support import run_child

PAGE = PAGE_SIZE
R, RW = Perm.READ, Perm.READ | Perm.WRITE


def fill(region: Region, owner: int) -> bytes:
    """Write the region's cookie (its size, its writer and a counter) over all of it."""
    head = region.size.to_bytes(4, "little") + owner.to_bytes(4, "little")
    cookie = (head * (region.size // 8 + 1))[: region.size]
    region[:] = cookie
    return cookie


def handover(threads: int, regions_per_thread: int, seed: int) -> dict[str, int]:
    """Threads allocate regions of random sizes, fill them with a cookie, and
    pass them through a queue; whoever takes one checks its cookie, maybe
    reallocates or protects it, and frees it."""
    sys.setswitchinterval(1e-5)
    alloc = MapAlloc()
    handed: queue.Queue[tuple[Region, bytes] | None] = queue.Queue(maxsize=64)
    counts = {"allocated": 0, "freed": 0, "reallocated": 0, "protected": 0, "grown": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def count(name: str) -> None:
        with lock:
            counts[name] += 1

    def producer(index: int) -> None:
        rnd = random.Random(seed * 1000 + index)
        for _ in range(regions_per_thread):
            region = alloc.alloc(rnd.randrange(1, 16 * PAGE))
            count("allocated")
            handed.put((region, fill(region, index)))

    def consumer(index: int) -> None:
        rnd = random.Random(seed * 1000 + 500 + index)
        while (item := handed.get()) is not None:
            region, cookie = item
            assert bytes(region) == cookie, "cookie changed"
            choice = rnd.random()
            if choice < 0.25:
                alloc.realloc(region, rnd.randrange(1, 32 * PAGE))
                count("reallocated")
                kept = min(len(cookie), region.size)
                assert region[:kept] == cookie[:kept]
                cookie = fill(region, index)
            elif choice < 0.4:
                try:
                    alloc.grow_in_place(region, region.size + PAGE)
                    count("grown")
                    assert region[: len(cookie)] == cookie
                    assert region[len(cookie) :] == bytes(region.size - len(cookie))
                except CannotReallocInPlace:
                    pass
                cookie = fill(region, index)
            elif choice < 0.55 and region.capacity > PAGE:
                region.protect(R, PAGE, PAGE)
                count("protected")
            assert bytes(region) == cookie
            alloc.dealloc(region)
            count("freed")

    def guard(target: Any, index: int) -> None:
        try:
            target(index)
        except BaseException as exc:
            errors.append(exc)
            raise

    producers = [threading.Thread(target=guard, args=(producer, i)) for i in range(threads // 2)]
    consumers = [threading.Thread(target=guard, args=(consumer, i)) for i in range(threads // 2)]
    for thread in producers + consumers:
        thread.start()
    for thread in producers:
        thread.join()
    for _ in consumers:
        handed.put(None)
    for thread in consumers:
        thread.join()
    if errors:
        raise errors[0]
    return counts


ENOUGH = 1000
"""Protects and whole-region reads a run of threaded_protect() must reach."""


def threaded_protect(seconds: float, grow: bool) -> dict[str, int]:
    """Two threads protect pages of one region while a third reads it whole
    whenever the region says it is readable (regression: a stale common
    protection let the reader reach a PROT_NONE page)."""
    import time

    sys.setswitchinterval(1e-6)
    alloc = MapAlloc()
    region = alloc.alloc(4 * PAGE)
    # Run until each thread has done enough (or, on a very slow machine, until
    # the time is up): the test is about correctness, not throughput.
    deadline = time.monotonic() + seconds
    counts = {"protects": 0, "reads": 0, "grows": 0}

    def done() -> bool:
        return time.monotonic() > deadline or (
            counts["protects"] > ENOUGH and counts["reads"] > ENOUGH
        )

    def protector(seed: int) -> None:
        rnd = random.Random(seed)
        while not done():
            perms = rnd.choice([Perm.NONE, R, RW, RW])
            offset = rnd.randrange(region.capacity // PAGE) * PAGE
            try:
                if rnd.random() < 0.2:  # the whole region: the C fast path, which takes no lock
                    region.protect(perms)
                else:
                    region.protect(perms, offset, PAGE if rnd.random() < 0.8 else None)
                if grow and rnd.random() < 0.01:
                    alloc.realloc(region, rnd.randrange(1, 6) * PAGE)
                    counts["grows"] += 1
            except BufferError:
                pass
            except ValueError as exc:  # the other one shrank the region after offset was drawn
                if not (grow and "lies outside the region" in str(exc)):
                    raise
            counts["protects"] += 1

    def reader() -> None:
        while not done():
            try:
                bytes(region)
                counts["reads"] += 1
            except BufferError:
                pass

    errors: list[BaseException] = []

    def guard(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # a thread's error fails the run, not just the thread
            errors.append(exc)
            raise

    threads = [threading.Thread(target=guard, args=(protector, i)) for i in range(2)]
    threads.append(threading.Thread(target=guard, args=(reader,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    region.protect(RW)
    alloc.dealloc(region)
    return counts


def close_races_read(runs: int) -> dict[str, int]:
    """A close on one thread racing reads on another never crashes: the read
    gets its bytes or ValueError, the close succeeds or waits for the buffer."""
    sys.setswitchinterval(1e-6)
    alloc = MapAlloc()
    outcomes = {"runs": 0, "reads": 0, "closed reads": 0, "close refused": 0}
    for run in range(runs):
        region = alloc.alloc(64 * PAGE)
        region[:] = bytes([run % 251]) * region.size
        started = threading.Event()

        def read(
            region: Region = region, expected: int = run % 251, started: threading.Event = started
        ) -> None:
            started.set()
            while True:
                try:
                    data = bytes(region) if outcomes["reads"] % 2 else region[0:PAGE]
                    assert data[0] == expected and data[-1] == expected
                    outcomes["reads"] += 1
                    _ = region[len(region) - 1]
                    with memoryview(region) as view:
                        assert view[PAGE] == expected
                except ValueError:
                    outcomes["closed reads"] += 1
                    return

        reader = threading.Thread(target=read)
        reader.start()
        started.wait()
        while True:
            try:
                region.close()
                break
            except BufferError:  # the reader holds a buffer right now
                outcomes["close refused"] += 1
        reader.join()
        outcomes["runs"] += 1
    return outcomes


def test_sixteen_threads_hand_regions_over_and_keep_their_cookies() -> None:
    counts = run_child("test_reliability_threads", "handover", 16, 300, 1).check()
    assert counts["allocated"] == counts["freed"] == 8 * 300
    assert counts["reallocated"] > 0 and counts["protected"] > 0


@pytest.mark.stress
def test_sixteen_threads_hand_regions_over_and_keep_their_cookies_long() -> None:
    counts = run_child("test_reliability_threads", "handover", 16, 20000, 2, timeout=3600).check()
    print(counts)
    assert counts["allocated"] == counts["freed"] == 8 * 20000


def test_concurrent_protects_never_expose_an_unreadable_page() -> None:
    for grow in (False, True):
        counts = run_child("test_reliability_threads", "threaded_protect", 60, grow).check()
        assert counts["protects"] > ENOUGH and counts["reads"] > ENOUGH


def test_close_racing_read_never_crashes_fifty_of_fifty() -> None:
    outcomes = run_child("test_reliability_threads", "close_races_read", 50).check()
    assert outcomes["runs"] == 50
    assert outcomes["closed reads"] == 50


@pytest.mark.stress
def test_close_racing_read_never_crashes_long() -> None:
    outcomes = run_child("test_reliability_threads", "close_races_read", 5000, timeout=3600).check()
    print(outcomes)
    assert outcomes["runs"] == outcomes["closed reads"] == 5000


def alloc_many_beside_a_thread(n: int, switch_interval: float) -> dict[str, float]:
    """The longest time another thread waited for the GIL while this one ran
    a long alloc_many (one slab holds all n objects, so the call spends its
    time making the list), and how long the call took. A wait that lasts
    until the call returns counts too: it ends when the call does."""
    import sys
    import time

    from mmap_alloc import ObjectPool

    pool = ObjectPool(16, slab_size=-(-n * 16 // PAGE) * PAGE)
    longest = [0.0]
    last = [0.0]
    stop = threading.Event()

    def count() -> None:
        last[0] = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            longest[0] = max(longest[0], now - last[0])
            last[0] = now

    sys.setswitchinterval(switch_interval)
    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.05)
    start = time.monotonic()
    longest[0] = 0.0
    addresses = pool.alloc_many(n)
    end = time.monotonic()
    longest[0] = max(longest[0], end - max(last[0], start))
    stop.set()
    counter.join()
    assert len(addresses) == len(set(addresses)) == len(pool) == n
    pool.close()
    return {"longest_wait": longest[0], "seconds": end - start}


def test_a_long_alloc_many_lets_other_threads_run() -> None:
    result = run_child(
        "test_reliability_threads", "alloc_many_beside_a_thread", 8 * 10**6, 0.02
    ).check()
    # the other thread waits a few switch intervals at a time, not the whole
    # call: measured against the call's own time, which a loaded machine
    # stretches. A call that releases the GIL more often than the switch
    # interval (20 ms here) never lets the waiter ask for it, and starves it.
    assert result["longest_wait"] < result["seconds"] / 3, result


def collect_while_a_dealloc_waits_for_the_kernel_lock() -> dict[str, int]:
    """Thread A holds the kernel lock (an argument's ``__index__`` runs inside
    ``region.view()``) while thread B drops the last reference to a Pin, whose
    dealloc then waits for the lock; A runs the collector meanwhile. What the
    collector found unreachable (a child's body)."""
    import gc
    import time

    gc.collect()
    gc.disable()  # the one collection is A's
    region = MapAlloc().alloc(PAGE)
    flags = {"a_holds": False, "b_pinned": False, "b_drops": False, "found": -1}

    class Stall:
        def __index__(self) -> int:
            flags["a_holds"] = True
            while not flags["b_drops"]:  # busy: a wait would let the lock go
                pass
            until = time.monotonic() + 0.2  # B is in the dealloc by then
            while time.monotonic() < until:
                pass
            flags["found"] = gc.collect()
            return 0

    def drop() -> None:
        pin = region.pin()  # B's own: B's last reference deallocates it in B
        flags["b_pinned"] = True  # before A holds the lock, which pin() takes
        while not flags["a_holds"]:
            pass
        flags["b_drops"] = True
        del pin

    dropper = threading.Thread(target=drop)
    dropper.start()
    while not flags["b_pinned"]:
        pass
    region.view(Stall()).release()
    dropper.join()
    region.close()  # the pin ended once: nothing holds the region
    return {"found": flags["found"]}


@pytest.mark.skipif(
    getattr(sys, "_is_gil_enabled", lambda: True)(),
    reason="a dealloc waits for the kernel lock only on a free-threaded build without the GIL",
)
def test_a_dealloc_waiting_for_the_kernel_lock_is_not_collected_twice() -> None:
    """A dealloc untracks its object before it waits for the kernel lock: a
    collection meanwhile would take the dead object for garbage and free it a
    second time (a corrupt heap: crashes and hangs much later)."""
    result = run_child(
        "test_reliability_threads", "collect_while_a_dealloc_waits_for_the_kernel_lock", timeout=30
    )
    assert result.check() == {"found": 0}
