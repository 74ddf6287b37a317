"""Faults: the library stays clean and loses nothing when the kernel says no.

Each scenario runs in a child interpreter (rlimits and map count exhaustion
must not touch the test runner): RLIMIT_AS with threads allocating until
AllocError, vm.max_map_count exhaustion with allocations, protections,
shrinks, reallocs and frees failing at the limit, and reallocs that fail.
Every failure must be AllocError, CannotReallocInPlace or OSError, with the
region untouched and still freeable.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import random
import resource
import threading
from typing import Any

import pytest

from mmap_alloc import AllocError, CannotReallocInPlace, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE, mapping_count, max_map_count
from support import (
    FILLS_THE_MAP_COUNT,
    RLIMIT_AS,
    SMALL_ALLOCATIONS_FROM_MALLOC,
    emulated_skip,
    page_perms,
    read_maps,
    run_child,
    status_kib,
)

PAGE = PAGE_SIZE
MIB = 1 << 20
R, RW = Perm.READ, Perm.READ | Perm.WRITE
CHILD_ENV = {"MALLOC_ARENA_MAX": "1"}


def cookie(region: Region, salt: int) -> bytes:
    """A pattern that differs per region and per salt."""
    word = ((region.address >> 12) * 2654435761 + salt) & 0xFFFFFFFF
    return word.to_bytes(4, "little") * (min(region.size, 256) // 4)


def snapshot(region: Region, maps: bool = True) -> tuple[Any, ...]:
    """What must not change when an operation on the region fails (the
    protections from /proc/self/maps unless ``maps`` is false: at the map
    count limit that file has 65,000 lines)."""
    return (
        region.address,
        region.size,
        region.capacity,
        region._prot,
        region.mixed,
        region.protections() if maps else None,
        ctypes.string_at(region.address, min(region.size, 256))
        if region._prot > 0 and region._prot & 1
        else None,
    )


# ---------------------------------------------------------------- RLIMIT_AS


def address_space_limit(room: int) -> int:
    """Cap the address space at ``room`` bytes more than the process has now
    (a free-threaded interpreter starts with about 1 GiB of it); the cap."""
    limit = status_kib("VmSize") * 1024 + room
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit


def exhaust_address_space(room_mib: int, threads: int, rounds: int) -> dict[str, Any]:
    """Threads allocate until the address-space limit refuses; then everything
    is freed, VmSize must return to its baseline, and allocation works again."""
    threading.stack_size(256 * 1024)
    room = room_mib * MIB
    address_space_limit(room)
    alloc = MapAlloc()
    barrier = threading.Barrier(threads + 1, timeout=120)
    held: list[list[Region]] = [[] for _ in range(threads)]
    faults = {"AllocError": 0, "MemoryError": 0}
    allocated = [0] * threads

    def fill(index: int) -> None:
        rnd = random.Random(index)
        regions = held[index]
        size = 1 * MIB
        while size >= PAGE:
            try:
                region = alloc.alloc(rnd.randrange(size // 2, size) + 1)
                region[:4] = b"\xa5\x5a\xa5\x5a"
                regions.append(region)
                allocated[index] += 1
            except AllocError:
                faults["AllocError"] += 1
                size //= 2
            except MemoryError:  # the interpreter's own allocations can be refused too
                faults["MemoryError"] += 1
                size //= 2

    def worker(index: int) -> None:
        for _ in range(rounds):
            barrier.wait()  # go
            fill(index)
            barrier.wait()  # exhausted: the main thread measures
            barrier.wait()  # free
            for region in held[index]:
                assert region[:4] == b"\xa5\x5a\xa5\x5a"
                alloc.dealloc(region)
            held[index].clear()
            barrier.wait()  # freed

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    sizes = []
    for _ in range(rounds):
        gc.collect()
        baseline = status_kib("VmSize")
        barrier.wait()
        barrier.wait()
        peak = status_kib("VmSize")
        barrier.wait()
        barrier.wait()
        gc.collect()
        sizes.append(
            {
                "baseline": baseline,
                "peak": peak,
                "after": status_kib("VmSize"),
                "regions": sum(allocated),
            }
        )
        allocated[:] = [0] * threads
    for thread in workers:
        thread.join()
    # And again, after the threads: most of the room can be taken in one piece.
    big = alloc.alloc(room // 2)
    big[len(big) - 1] = 1
    alloc.dealloc(big)
    return {"rounds": sizes, "faults": faults}


@emulated_skip(RLIMIT_AS)
def test_address_space_limit_with_eight_threads_loses_nothing() -> None:
    result = run_child(
        "test_reliability_faults", "exhaust_address_space", 256, 8, 3, env=CHILD_ENV
    ).check()
    print(result)
    rounds = result["rounds"]
    faults = result["faults"]
    assert faults["AllocError"] >= 8 * 3  # every thread, every round
    assert faults["AllocError"] + faults["MemoryError"] >= 8 * 3 * 9  # halving down to a page
    for measured in rounds:
        assert measured["peak"] - measured["baseline"] > 128 * 1024, measured
    # The first round warms the interpreter up; after that nothing may grow.
    for measured in rounds[1:]:
        assert measured["after"] <= measured["baseline"], measured
    assert rounds[-1]["after"] <= rounds[1]["baseline"]


# ---------------------------------------------------------------- vm.max_map_count


def adjacent_regions(alloc: MapAlloc, count: int, size: int) -> list[Region]:
    """``count`` regions of ``size`` bytes, each right below the one before: one
    kernel mapping. Plain allocations are not enough: the kernel puts a new
    mapping in the highest hole that fits, and holes the interpreter left
    (where depends on the environment, the imports) broke the run in two
    places, whose victims at the edges then freed without a split, one after
    another, until none was left in the middle (the long form's failure)."""
    for _ in range(16):
        space = alloc.reserve(count * size)  # a free range of the whole length
        top = space.address + space.capacity
        space.close()
        made: list[Region] = []
        try:
            for index in range(1, count + 1):
                made.append(alloc.alloc(size, near=top - index * size, within=size))
            return made
        except AllocError:  # the interpreter mapped something there meanwhile
            for region in made:
                region.close()
    raise AssertionError(f"no free range of {count * size} bytes stayed free for long enough")


def exhaust_map_count(attempts: int) -> dict[str, Any]:
    """Fill vm.max_map_count, then make every operation that needs a new kernel
    mapping fail at the limit: each failure clean, each region still freeable."""
    rw, ro = MapAlloc(), MapAlloc(write=False)
    start_count = mapping_count()
    # Victims: adjacent 4-page regions of one allocator, merged into one kernel
    # mapping, so that touching one in the middle needs a split.
    victims = adjacent_regions(rw, 64, 4 * PAGE)
    cookies = {}
    for index, region in enumerate(victims):
        cookies[id(region)] = cookie(region, index)
        region[: len(cookies[id(region)])] = cookies[id(region)]
    fillers: list[Region] = []
    faults: dict[str, int] = {}
    rnd = random.Random(7)  # made before the limit: at it, the heap cannot grow
    try:
        while True:  # alternate protections so that neighbours never merge
            fillers.append((rw if len(fillers) % 2 else ro).alloc(PAGE))
    except AllocError:
        faults["alloc"] = 1
    middle = victims[1:-1]

    def attempt(
        name: str, call: Any, region: Region, errors: tuple[type[BaseException], ...]
    ) -> None:
        before = snapshot(region, maps=False)
        try:
            call()
        except errors:
            faults[name] = faults.get(name, 0) + 1
            assert not region.closed, name
            assert snapshot(region, maps=False) == before, name
        else:  # it found room after all (e.g. a neighbour merged): fine, if consistent
            faults[name + " (succeeded)"] = faults.get(name + " (succeeded)", 0) + 1

    def refill() -> None:
        """Take any room an operation that succeeded made (a merge, a move),
        until the kernel refuses a mapping or the heap an object."""
        try:
            while True:
                fillers.append((rw if len(fillers) % 2 else ro).alloc(PAGE))
        except MemoryError:  # AllocError, or the interpreter's own
            pass

    for _ in range(attempts):
        victim = rnd.choice(middle)
        refill()
        try:
            rw.alloc(PAGE)
            raise AssertionError("alloc succeeded at the map count limit")
        except AllocError:
            faults["alloc"] += 1
        attempt("protect", lambda v=victim: v.protect(R, PAGE, PAGE), victim, (AllocError,))
        attempt("make_exec", lambda v=victim: v.make_exec(PAGE, PAGE), victim, (AllocError,))
        if victim.capacity == 4 * PAGE:
            attempt(
                "shrink_in_place",
                lambda v=victim: rw.shrink_in_place(v, PAGE),
                victim,
                (CannotReallocInPlace,),
            )
            attempt("realloc smaller", lambda v=victim: rw.realloc(v, PAGE), victim, (AllocError,))
            attempt(
                "realloc larger", lambda v=victim: rw.realloc(v, 64 * PAGE), victim, (AllocError,)
            )
        attempt("dealloc", lambda v=victim: rw.dealloc(v), victim, (AllocError,))
        if victim.closed:
            middle.remove(victim)
            victims.remove(victim)
    at_limit = mapping_count()
    for region in fillers[-50:]:  # room for the buffers that read /proc/self/maps
        region.close()
    vmas = read_maps()
    for region in victims:  # no failed protect left a page changed
        if not region.mixed:
            assert set(page_perms(vmas, region.address, region.capacity, PAGE)) == {RW}
    # Everything is still freeable: the fillers first (each its own mapping), then the rest.
    for region in fillers:
        region.close()
    for region in victims:
        assert not region.closed
        expected = cookies[id(region)]
        if region.mixed:  # a protect found room: the first page is still readable
            assert ctypes.string_at(region.address, len(expected)) == expected
        else:
            assert region[: len(expected)] == expected
        rw.dealloc(region)
    gc.collect()
    return {
        "faults": faults,
        "fillers": len(fillers),
        "at_limit": at_limit,
        "start": start_count,
        "end": mapping_count(),
    }


def map_count_exhaustion(attempts: int) -> None:
    limit = max_map_count()
    if limit <= 0 or limit > 1_000_000:
        pytest.skip(f"vm.max_map_count is {limit}: too large to exhaust in a test")
    result = run_child(
        "test_reliability_faults",
        "exhaust_map_count",
        attempts,
        env=SMALL_ALLOCATIONS_FROM_MALLOC,
        timeout=1800,
    ).check()
    print(result)
    faults = result["faults"]
    assert result["fillers"] > limit - 2000
    assert result["at_limit"] >= limit - 10
    for name in (
        "alloc",
        "protect",
        "make_exec",
        "shrink_in_place",
        "realloc larger",
        "dealloc",
    ):
        assert faults.get(name, 0) >= 1, (name, faults)
    assert result["end"] <= result["start"] + 5


@FILLS_THE_MAP_COUNT
def test_map_count_exhaustion_fails_cleanly_and_frees_everything() -> None:
    map_count_exhaustion(attempts=10)


@pytest.mark.stress
@FILLS_THE_MAP_COUNT
def test_map_count_exhaustion_fails_cleanly_and_frees_everything_long() -> None:
    map_count_exhaustion(attempts=2000)


# ---------------------------------------------------------------- failing realloc


def failing_realloc(room_mib: int) -> dict[str, int]:
    """Reallocs that the address-space limit refuses leave the region as it was."""
    limit = address_space_limit(room_mib * MIB)
    alloc = MapAlloc(huge="normal")  # the budget below has no room for THP alignment
    failures = 0
    for mixed in (False, True):
        region = alloc.alloc(32 * MIB)
        pattern = cookie(region, 1)
        region[: len(pattern)] = pattern
        region[len(region) - 4 :] = b"tail"
        if mixed:  # several kernel mappings: realloc copies instead of mremap
            region.protect(R, 16 * MIB, PAGE)
        before = snapshot(region)
        for new_size in (limit, 4 * limit, 1 << 46):
            try:
                alloc.realloc(region, new_size)
                raise AssertionError(f"realloc to {new_size} succeeded under RLIMIT_AS")
            except AllocError:
                failures += 1
            assert snapshot(region) == before
            assert region[len(region) - 4 :] == b"tail"
        try:
            alloc.grow_in_place(region, limit)
            raise AssertionError("grow_in_place succeeded under RLIMIT_AS")
        except CannotReallocInPlace:
            failures += 1
        assert snapshot(region) == before
        # Still usable: write, shrink, grow within the limit, free.
        region.protect(RW)
        region[:4] = b"used"
        alloc.realloc(region, 8 * MIB)
        assert region[:4] == b"used" and region[4 : len(pattern)] == pattern[4:]
        alloc.realloc(region, 48 * MIB)
        assert region[len(region) - 1] == 0
        alloc.dealloc(region)
    return {"failures": failures}


@emulated_skip(RLIMIT_AS)
def test_failed_realloc_leaves_region_intact_and_usable() -> None:
    result = run_child("test_reliability_faults", "failing_realloc", 128, env=CHILD_ENV).check()
    assert result["failures"] == 8


# ---------------------------------------------------------------- alloc_many bounded up front


def huge_alloc_many(obj_size: int, n: int, room_mib: int) -> dict[str, Any]:
    """alloc_many(n) of an ObjectPool that cannot hold n objects: the error,
    how long it took, and whether anything changed."""
    import time

    from mmap_alloc import ObjectPool, _mman

    if room_mib:
        address_space_limit(room_mib * MIB)
    pool = ObjectPool(obj_size)
    kept = pool.alloc_many(3)
    before = (len(pool), pool.stats(), _mman.mapped_bytes())
    start = time.monotonic()
    try:
        pool.alloc_many(n)
    except AllocError as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = "none"
    seconds = time.monotonic() - start
    after = (len(pool), pool.stats(), _mman.mapped_bytes())
    same = after == before and all(address in pool for address in kept)
    pool.close()
    return {"error": error, "seconds": seconds, "unchanged": same}


USER_ADDRESS_SPACE = 1 << (47 if platform.machine() == "x86_64" else 48)
"""The user address space the kernel assumes (4-level page tables)."""


@pytest.mark.parametrize(
    ("obj_size", "n", "words"),
    [
        (16, 1 << 40, "memory and swap"),  # 44 TB of addresses, 16 TiB of slabs
        (1 << 20, 1 << 28, "address space"),  # 256 TiB of slabs, 10 GiB of addresses
        # slabs of exactly the whole address space: the process's own mappings
        # already take part of it (on arm64 the case above is this one)
        (1 << 20, USER_ADDRESS_SPACE >> 20, "address space"),
    ],
)
def test_alloc_many_of_more_than_the_machine_holds_fails_at_once(
    obj_size: int, n: int, words: str
) -> None:
    result = run_child("test_reliability_faults", "huge_alloc_many", obj_size, n, 0, timeout=60)
    value = result.check()
    assert value["error"].startswith("AllocError: alloc_many"), value
    assert words in value["error"], value
    assert value["seconds"] < 1.0, value
    assert value["unchanged"], value


@emulated_skip(RLIMIT_AS)
def test_alloc_many_past_the_address_space_limit_fails_at_once() -> None:
    value = run_child(
        "test_reliability_faults", "huge_alloc_many", 1 << 16, 1 << 16, 256, timeout=60
    ).check()  # 4 GiB of slabs with room for 256 MiB under RLIMIT_AS
    assert value["error"].startswith("AllocError: alloc_many"), value
    assert "RLIMIT_AS" in value["error"], value
    assert value["seconds"] < 1.0, value
    assert value["unchanged"], value
