"""Fork: a forked child can use and free what its parent made, and never deadlocks.

The scenarios run in a child interpreter (which then forks itself), so that
threads and forks never involve the test runner.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading

import pytest

from mmap_alloc import CannotReallocInPlace, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from support import describe_status, fork_child, run_child, wait_child

PAGE = PAGE_SIZE
R, RW = Perm.READ, Perm.READ | Perm.WRITE


def exercise(alloc: MapAlloc, rnd: random.Random, rounds: int) -> None:
    """Allocate, protect, resize, check and free a few regions."""
    for _ in range(rounds):
        region = alloc.alloc(rnd.randrange(1, 8 * PAGE))
        region[:] = b"\x5a" * region.size
        if region.capacity > PAGE:
            region.protect(R, PAGE, PAGE)
        alloc.realloc(region, rnd.randrange(1, 12 * PAGE))
        with contextlib.suppress(CannotReallocInPlace):
            alloc.grow_in_place(region, region.size + PAGE)
        assert region[0] == 0x5A
        alloc.dealloc(region)


def child_frees_what_parent_made() -> dict[str, int]:
    alloc = MapAlloc()
    made: list[tuple[Region, bytes]] = []
    for index in range(32):
        region = alloc.alloc((index + 1) * 1000)
        pattern = bytes([index]) * region.size
        region[:] = pattern
        if index % 4 == 0 and region.capacity > PAGE:
            region.protect(R, 0, PAGE)
        made.append((region, pattern))
    view = memoryview(made[1][0])

    def body() -> None:
        for region, pattern in made:
            assert bytes(region) == pattern
        view.release()
        for region, _ in made:
            alloc.dealloc(region)
        exercise(alloc, random.Random(1), 50)

    status = wait_child(fork_child(body), 60)
    assert status == 0, describe_status(
        -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    )
    # The parent's regions are untouched by what the child did.
    for region, pattern in made:
        assert bytes(region) == pattern
    view.release()
    for region, _ in made:
        alloc.dealloc(region)
    return {"regions": len(made)}


def forks_while_allocating(forks: int) -> dict[str, int]:
    """One thread allocates, protects and frees without pause; another forks
    ``forks`` times, and each child uses the allocator (regions inherited
    from the parent included) and exits. No child may hang or fail."""
    alloc = MapAlloc()
    inherited = alloc.alloc(4 * PAGE)
    inherited[:] = b"\x11" * inherited.size
    stop = threading.Event()
    counts = {"forks": 0, "parent rounds": 0, "failed": 0, "hung": 0}
    statuses: list[int] = []

    def allocate() -> None:
        rnd = random.Random(2)
        while not stop.is_set():
            exercise(alloc, rnd, 1)
            counts["parent rounds"] += 1

    def child_body() -> None:
        assert inherited[0] == 0x11
        inherited.protect(R, PAGE, PAGE)
        exercise(alloc, random.Random(os.getpid()), 5)
        alloc.dealloc(inherited)

    def fork_many() -> None:
        for _ in range(forks):
            pid = fork_child(child_body)
            counts["forks"] += 1
            statuses.append(wait_child(pid, 10))
            if statuses[-1] != 0:
                break  # one hang or failure is enough to report

    allocator = threading.Thread(target=allocate)
    forker = threading.Thread(target=fork_many)
    allocator.start()
    forker.start()
    forker.join()
    stop.set()
    allocator.join()
    for status in statuses:
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9:
            counts["hung"] += 1
        elif status != 0:
            counts["failed"] += 1
    alloc.dealloc(inherited)
    return counts


def test_child_frees_regions_made_before_fork_and_allocates_new_ones() -> None:
    assert run_child("test_reliability_fork", "child_frees_what_parent_made").check() == {
        "regions": 32
    }


def test_hundred_forks_from_a_thread_while_another_allocates() -> None:
    counts = run_child("test_reliability_fork", "forks_while_allocating", 100, timeout=300).check()
    assert counts["hung"] == 0, counts
    assert counts["failed"] == 0, counts
    assert counts["forks"] == 100
    assert counts["parent rounds"] > 0


@pytest.mark.stress
def test_thousands_of_forks_from_a_thread_while_another_allocates() -> None:
    counts = run_child(
        "test_reliability_fork", "forks_while_allocating", 3000, timeout=3600
    ).check()
    print(counts)
    assert counts["forks"] == 3000 and counts["hung"] == counts["failed"] == 0
