"""Re-entrancy: an integer whose ``__index__`` frees or changes the region mid-call.

The model is CPython gh-103987 (mmap crashed when ``__index__`` closed the
map during a slice). Every public method that takes an integer is called with
an argument whose ``__index__`` closes, frees, moves, shrinks, protects or
uncommits the region first. The call may succeed or raise ValueError or
BufferError (or the library's own errors), and the region must stay
consistent; it must never crash. Each case runs in a forked child.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pytest

from mmap_alloc import MapAlloc, MapAllocError, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from support import HOST_MAPS, kernel_runs, page_perms, read_maps, run_forked, skip_if_emulated

PAGE = PAGE_SIZE
RW = Perm.READ | Perm.WRITE
NoArgs = ctypes.CFUNCTYPE(None)


class Evil:
    """An integer that runs ``action`` the first time it is converted."""

    def __init__(self, value: int, action: Callable[[], object]) -> None:
        self.value = value
        self.action = action
        self.fired = False

    def __index__(self) -> int:
        if not self.fired:
            self.fired = True
            self.action()
        return self.value


# What __index__ does to the region (alloc, region) -> None.
ACTIONS: dict[str, Callable[[MapAlloc, Region], object]] = {
    "close": lambda alloc, region: region.close(),
    "dealloc": lambda alloc, region: alloc.dealloc(region),
    "realloc-grow": lambda alloc, region: alloc.realloc(region, 64 * PAGE),
    "realloc-shrink": lambda alloc, region: alloc.realloc(region, 1),
    "shrink-in-place": lambda alloc, region: alloc.shrink_in_place(region, 1),
    "protect-none": lambda alloc, region: region.protect(Perm.NONE),
    "protect-part": lambda alloc, region: region.protect(Perm.READ, PAGE, PAGE),
    "uncommit": lambda alloc, region: alloc.uncommit(region),
}

E = Callable[[int], Any]  # makes an evil integer of the given value

# The calls: (alloc, region, evil) -> the call, with one evil integer argument.
CALLS: dict[str, Callable[[MapAlloc, Region, E], object]] = {
    "region[i]": lambda a, r, e: r[e(1)],
    "region[a:b]": lambda a, r, e: r[e(0) : 3 * PAGE],
    "region[a:b:step]": lambda a, r, e: r[0 : 3 * PAGE : e(2)],
    "region[i] = v (index)": lambda a, r, e: r.__setitem__(e(PAGE + 1), 7),
    "region[i] = v (value)": lambda a, r, e: r.__setitem__(PAGE + 1, e(7)),
    "region[a:b] = data": lambda a, r, e: r.__setitem__(slice(e(PAGE), 2 * PAGE), bytes(PAGE)),
    "realloc(new_size)": lambda a, r, e: a.realloc(r, e(3 * PAGE + 5)),
    "realloc(new_size) smaller": lambda a, r, e: a.realloc(r, e(10)),
    "grow_in_place(new_size)": lambda a, r, e: a.grow_in_place(r, e(8 * PAGE)),
    "shrink_in_place(new_size)": lambda a, r, e: a.shrink_in_place(r, e(PAGE)),
    "commit(offset)": lambda a, r, e: a.commit(r, e(PAGE)),
    "commit(length)": lambda a, r, e: a.commit(r, 0, e(3 * PAGE)),
    "uncommit(offset)": lambda a, r, e: a.uncommit(r, e(PAGE)),
    "uncommit(length)": lambda a, r, e: a.uncommit(r, 0, e(3 * PAGE)),
    "protect(perms)": lambda a, r, e: r.protect(e(int(Perm.READ))),
    "protect(offset)": lambda a, r, e: r.protect(Perm.READ, e(2 * PAGE)),
    "protect(length)": lambda a, r, e: r.protect(Perm.READ, 0, e(4 * PAGE)),
    "make_exec(offset)": lambda a, r, e: r.make_exec(e(PAGE)),
    "make_exec(length)": lambda a, r, e: r.make_exec(0, e(4 * PAGE)),
    "make_writable(offset)": lambda a, r, e: r.make_writable(e(PAGE)),
    "make_writable(length)": lambda a, r, e: r.make_writable(0, e(4 * PAGE)),
    "writable(offset)": lambda a, r, e: _enter(r.writable(e(PAGE))),
    "writable(length)": lambda a, r, e: _enter(r.writable(0, e(4 * PAGE))),
    "flush_icache(offset)": lambda a, r, e: r.flush_icache(e(PAGE)),
    "flush_icache(length)": lambda a, r, e: r.flush_icache(0, e(4 * PAGE)),
    "function(offset)": lambda a, r, e: r.function(NoArgs, e(PAGE)),
    "alloc(size)": lambda a, r, e: a.alloc(e(PAGE)).close(),
    "alloc(align)": lambda a, r, e: a.alloc(PAGE, e(16 * PAGE)).close(),
    "alloc_zeroed(size)": lambda a, r, e: a.alloc_zeroed(e(PAGE)).close(),
    "alloc_excess(size)": lambda a, r, e: a.alloc_excess(e(PAGE)).close(),
    "reserve(size)": lambda a, r, e: a.reserve(e(PAGE)).close(),
    "reserve(align)": lambda a, r, e: a.reserve(PAGE, e(16 * PAGE)).close(),
    "usable_size(size)": lambda a, r, e: a.usable_size(e(PAGE)),
}


def _enter(manager: Any) -> None:
    with manager:
        pass


def check_consistent(region: Region) -> None:
    """What the region says about itself is what the kernel has."""
    if region.closed:
        return
    pages = page_perms(read_maps(), region.address, region.capacity, PAGE)
    assert None not in pages, "part of a live region is unmapped"
    assert region.mixed == (len(set(pages)) > 1)
    common = Perm.READ | Perm.WRITE | Perm.EXEC
    for perms in pages:
        common &= perms  # type: ignore[operator]
    assert region._prot == (-1 if region.mixed else pages[0])
    assert region.protections() == kernel_runs(region)
    if common & Perm.READ:
        bytes(region)  # would crash if a page were not readable
        region[len(region) - 1]


def evil_call(call: str, action: str, code: bool) -> None:
    alloc = MapAlloc(exec=True)
    region = alloc.alloc(4 * PAGE)
    region[:] = b"\x01" * region.size
    if code:
        region.make_exec()
    evil = lambda value: Evil(value, lambda: ACTIONS[action](alloc, region))  # noqa: E731
    try:
        result = CALLS[call](alloc, region, evil)
    except (ValueError, BufferError, TypeError, IndexError, MapAllocError):
        result = None  # e.g. an index past a region the __index__ just shrank
    check_consistent(region)
    del result  # a function made by function() releases its pin here
    if not region.closed:
        region.protect(RW)
        alloc.dealloc(region)


@pytest.mark.parametrize("action", sorted(ACTIONS))
@pytest.mark.parametrize("call", list(CALLS))
def test_index_that_changes_the_region_never_crashes(call: str, action: str) -> None:
    if call.startswith(("function", "make_writable")):  # code pages, then changed
        skip_if_emulated(HOST_MAPS)
    run_forked(evil_call, call, action, call.startswith("function"))


def test_a_crash_in_the_forked_child_fails_the_test() -> None:
    with pytest.raises(AssertionError, match="SIGSEGV"):
        run_forked(ctypes.string_at, 16, 1)  # address 16: never mapped
