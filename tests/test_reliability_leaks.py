"""Leaks: thousands of alloc/free cycles leave nothing behind.

Counted in a fresh child interpreter after a warm-up: references to the
allocator (sys.getrefcount; sys.gettotalrefcount exists only in debug
builds), objects the garbage collector tracks, memory tracemalloc traces,
and the process's mappings. The cycles take every path that creates
objects: aligned and plain allocation, realloc both ways, protections,
exports, functions (with their finalizers), commit, and the error paths.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import tracemalloc
from typing import Any

import pytest

from mmap_alloc import AllocError, MapAlloc, Perm
from mmap_alloc._linux import PAGE_SIZE, mapping_count
from support import run_child

PAGE = PAGE_SIZE
NoArgs = ctypes.CFUNCTYPE(None)


def cycle(alloc: MapAlloc, index: int) -> None:
    """One round of allocation and freeing through many paths."""
    region = alloc.alloc(4 + index % (8 * PAGE), 16 * PAGE if index % 7 == 0 else None)
    region[:4] = b"leak"
    if index % 3 == 0:
        alloc.realloc(region, region.size + 3 * PAGE)
    if index % 5 == 0 and region.capacity > PAGE:
        region.protect(Perm.READ, PAGE, PAGE)
        region.protect(Perm.READ | Perm.WRITE)
    with memoryview(region) as view:
        try:
            alloc.dealloc(region)
            raise AssertionError("dealloc of an exported region succeeded")
        except BufferError:
            pass
        assert view[0] == ord("l")
    if index % 11 == 0:
        region.make_exec()
        function = region.function(NoArgs)
        del function
        region.make_writable()
    if index % 13 == 0:
        alloc.commit(region)
        alloc.uncommit(region)
        try:
            alloc.alloc(1 << 60)
            raise AssertionError("an allocation of 1 EiB succeeded")
        except AllocError:
            pass
    alloc.dealloc(region)
    try:
        alloc.dealloc(region)
        raise AssertionError("a double free succeeded")
    except ValueError:
        pass


def count_leaks(cycles: int) -> dict[str, Any]:
    alloc = MapAlloc(exec=True)
    tracemalloc.start()
    for index in range(1000):  # warm-up: caches, interned ints, function types
        cycle(alloc, index)

    def measure() -> dict[str, int]:
        gc.collect()
        return {
            "alloc refcount": sys.getrefcount(alloc),
            "gc objects": len(gc.get_objects()),
            "traced bytes": tracemalloc.get_traced_memory()[0],
            "mappings": mapping_count(),
        }

    before = measure()
    for index in range(cycles):
        cycle(alloc, index)
    after = measure()
    tracemalloc.stop()
    return {"before": before, "after": after}


def check_no_leaks(cycles: int) -> None:
    result = run_child("test_reliability_leaks", "count_leaks", cycles, timeout=3600).check()
    print(result)
    before, after = result["before"], result["after"]
    assert after["alloc refcount"] == before["alloc refcount"]
    assert after["gc objects"] <= before["gc objects"]
    assert after["mappings"] == before["mappings"]
    # A leak of anything at all per cycle is 16 bytes or more per cycle; what
    # does not grow with the cycles (free lists, arenas, measure() itself)
    # stays well under one byte per cycle.
    assert after["traced bytes"] - before["traced bytes"] < cycles


def test_ten_thousand_cycles_leak_nothing() -> None:
    check_no_leaks(10_000)


@pytest.mark.stress
def test_million_cycles_leak_nothing() -> None:
    check_no_leaks(1_000_000)
