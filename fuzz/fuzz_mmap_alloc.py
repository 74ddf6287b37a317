"""Coverage-guided fuzzing of mmap_alloc's safe API with atheris.

Each input is decoded into a short program: a sequence of operations on a few
allocators and regions (alloc, realloc, grow/shrink in place, commit,
protect, make_exec, writable(), exports, functions, reads and writes with any
integers, integers whose __index__ frees the region, frees, use after free).
A finding is a crash (the fuzzer reports the signal), an exception the API
does not document, or a region whose recorded protection disagrees with the
kernel's. Every input ends by freeing everything, which must work.

    python fuzz/fuzz_mmap_alloc.py -runs=100000          # see docs/reliability.md

New features add operations by appending functions to OPS (each takes the
State and the FuzzedDataProvider); old corpora stay meaningful since an
operation's number is its place in the list.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports():
    from mmap_alloc import MapAlloc, MapAllocError, Perm, Region
    from mmap_alloc._linux import PAGE_SIZE, mappings

try:
    import numpy
except ImportError:
    numpy = None

PAGE = PAGE_SIZE
MAX_REGIONS = 6
NoArgs = ctypes.CFUNCTYPE(None)

# What the safe API may raise for bad input or state; anything else is a finding.
DOCUMENTED = (ValueError, TypeError, BufferError, IndexError, OverflowError, MapAllocError)

# Interesting integers for sizes, offsets and indexes.
SPECIAL = [
    0,
    1,
    -1,
    PAGE - 1,
    PAGE,
    PAGE + 1,
    2 * PAGE,
    3 * PAGE + 7,
    1 << 24,
    1 << 47,
    1 << 63,
    (1 << 63) - 1,
    -(1 << 63),
    1 << 64,
    1 << 100,
]


class State:
    """The allocators, live regions, their buffers and functions, and freed regions."""

    def __init__(self) -> None:
        self.allocs = [
            MapAlloc(),
            MapAlloc(write=False),
            MapAlloc(exec=True),
            MapAlloc(read=False, write=False),
            MapAlloc(commit=True),
        ]
        self.regions: list[tuple[Region, MapAlloc]] = []
        self.freed: list[tuple[Region, MapAlloc]] = []
        self.exports: list[Any] = []
        self.functions: list[Any] = []


def integer(fdp: atheris.FuzzedDataProvider, limit: int = 8 * PAGE) -> int:
    """Mostly small integers, sometimes extreme ones."""
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return SPECIAL[fdp.ConsumeIntInRange(0, len(SPECIAL) - 1)]
    return fdp.ConsumeIntInRange(0, limit)


def page_offset(fdp: atheris.FuzzedDataProvider) -> int:
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return integer(fdp)
    return fdp.ConsumeIntInRange(0, 9) * PAGE


def length(fdp: atheris.FuzzedDataProvider) -> int | None:
    return None if fdp.ConsumeBool() else integer(fdp)


def pick(state: State, fdp: atheris.FuzzedDataProvider) -> tuple[Region, MapAlloc] | None:
    if not state.regions:
        return None
    return state.regions[fdp.ConsumeIntInRange(0, len(state.regions) - 1)]


class Evil:
    """An integer whose __index__ frees, moves or protects a region first."""

    def __init__(self, value: int, action: Callable[[], object]) -> None:
        self.value, self.action, self.fired = value, action, False

    def __index__(self) -> int:
        if not self.fired:
            self.fired = True
            self.action()
        return self.value


def maybe_evil(state: State, fdp: atheris.FuzzedDataProvider, value: int) -> Any:
    """``value``, or now and then an Evil of it that acts on some region."""
    if fdp.ConsumeIntInRange(0, 15) or not state.regions:
        return value
    region, alloc = pick(state, fdp)  # type: ignore[misc]
    actions: list[Callable[[], object]] = [
        region.close,
        lambda: alloc.realloc(region, 16 * PAGE),
        lambda: alloc.realloc(region, 1),
        lambda: region.protect(Perm.NONE),
        lambda: alloc.uncommit(region),
    ]
    return Evil(value, actions[fdp.ConsumeIntInRange(0, len(actions) - 1)])


# ---------------------------------------------------------------- operations


def op_alloc(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if len(state.regions) >= MAX_REGIONS:
        return
    alloc = state.allocs[fdp.ConsumeIntInRange(0, len(state.allocs) - 1)]
    how = fdp.ConsumeIntInRange(0, 4)
    size = maybe_evil(state, fdp, integer(fdp))
    align = None if fdp.ConsumeBool() else maybe_evil(state, fdp, integer(fdp, 1 << 18))
    region = [
        alloc.alloc,
        alloc.alloc_zeroed,
        alloc.alloc_excess,
        alloc.reserve,
        lambda size, align: alloc.alloc_obj(),
    ][how](size, align)
    state.regions.append((region, alloc))


def op_realloc(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, alloc = item
        kind = fdp.ConsumeIntInRange(0, 2)
        size = maybe_evil(state, fdp, integer(fdp))
        [alloc.realloc, alloc.grow_in_place, alloc.shrink_in_place][kind](region, size)


def op_commit(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, alloc = item
        call = alloc.commit if fdp.ConsumeBool() else alloc.uncommit
        call(region, maybe_evil(state, fdp, page_offset(fdp)), length(fdp))


def op_protect(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, _ = item
        perms: Any = (
            fdp.ConsumeIntInRange(0, 8) if fdp.ConsumeBool() else Perm(fdp.ConsumeIntInRange(0, 7))
        )
        region.protect(perms, maybe_evil(state, fdp, page_offset(fdp)), length(fdp))


def op_flip(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, _ = item
        offset, n = maybe_evil(state, fdp, page_offset(fdp)), length(fdp)
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            region.make_exec(offset, n)
        elif choice == 1:
            region.make_writable(offset, n)
        elif choice == 2:
            region.flush_icache(offset, n)
        else:
            with region.writable(offset, n):
                region[integer(fdp)] = fdp.ConsumeIntInRange(0, 255)


def op_write(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, _ = item
        start = maybe_evil(state, fdp, integer(fdp))
        if fdp.ConsumeBool():
            region[start] = fdp.ConsumeIntInRange(-1, 256)
        else:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2 * PAGE))
            region[start : start + len(data)] = data


def op_read(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, _ = item
        start = maybe_evil(state, fdp, integer(fdp))
        if fdp.ConsumeBool():
            region[start]
        else:
            region[start : integer(fdp) : fdp.ConsumeIntInRange(1, 3)]


def op_export(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, _ = item
        kind = fdp.ConsumeIntInRange(0, 2)
        if kind == 0:
            state.exports.append(memoryview(region))
        elif kind == 1:
            state.exports.append((ctypes.c_char * len(region)).from_buffer(region))
        elif numpy is not None:
            state.exports.append(numpy.frombuffer(region, dtype=numpy.uint8))


def op_release(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if state.exports:
        export = state.exports.pop(fdp.ConsumeIntInRange(0, len(state.exports) - 1))
        if isinstance(export, memoryview):
            export.release()
    elif state.functions:
        state.functions.pop()


def op_function(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, _ = item
        state.functions.append(region.function(NoArgs, maybe_evil(state, fdp, integer(fdp))))


def op_free(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if (item := pick(state, fdp)) is not None:
        region, alloc = item
        how = fdp.ConsumeIntInRange(0, 3)
        if how == 0:
            alloc.dealloc(region)
        elif how == 1:
            region.close()
        elif how == 2:
            state.allocs[fdp.ConsumeIntInRange(0, len(state.allocs) - 1)].dealloc(region)
        else:
            alloc.dealloc_obj(region)


def op_use_freed(state: State, fdp: atheris.FuzzedDataProvider) -> None:
    if state.freed:
        region, alloc = state.freed[fdp.ConsumeIntInRange(0, len(state.freed) - 1)]
        [
            lambda: alloc.dealloc(region),
            lambda: bytes(region),
            lambda: region.protect(Perm.READ),
            lambda: alloc.realloc(region, PAGE),
            lambda: region[0],
            lambda: alloc.commit(region),
        ][fdp.ConsumeIntInRange(0, 5)]()


OPS: list[Callable[[State, atheris.FuzzedDataProvider], None]] = [
    op_alloc,
    op_realloc,
    op_commit,
    op_protect,
    op_flip,
    op_write,
    op_read,
    op_export,
    op_release,
    op_function,
    op_free,
    op_use_freed,
]


# ---------------------------------------------------------------- checks


def settle(state: State) -> None:
    """Move closed regions to ``freed``; read every readable region whole (a
    region that claims READ for a page it does not have crashes here)."""
    for item in list(state.regions):
        region = item[0]
        if region.closed:
            state.regions.remove(item)
            state.freed = [*state.freed[-3:], item]
        elif region._prot >= 0 and region._prot & Perm.READ:
            bytes(region)


def kernel_runs(region: Region) -> list[tuple[int, int, Perm]]:
    """The (offset, length, perms) runs of the region in /proc/self/maps."""
    start, end = region.address, region.address + region.capacity
    runs: list[tuple[int, int, Perm]] = []
    for m in mappings():
        lo, hi = max(m.start, start), min(m.end, end)
        if lo >= hi:
            continue
        if runs and runs[-1][2] == m.perms and runs[-1][0] + runs[-1][1] == lo - start:
            runs[-1] = (runs[-1][0], hi - start - runs[-1][0], m.perms)
        else:
            runs.append((lo - start, hi - lo, m.perms))
    return runs


def check_against_kernel(state: State) -> None:
    for region, _ in state.regions:
        runs = kernel_runs(region)
        assert sum(n for _, n, _ in runs) == region.capacity, "part of a region is unmapped"
        assert region.protections() == runs, (region.protections(), runs)
        assert region.mixed == (len(runs) > 1)
        assert region._prot == (-1 if region.mixed else runs[0][2]), (region._prot, runs)


def cleanup(state: State) -> None:
    """Free everything: must always work."""
    while state.exports:  # (a for loop would keep the last one alive in its variable)
        export = state.exports.pop()
        if isinstance(export, memoryview):
            export.release()
        del export
    state.functions.clear()
    for region, alloc in state.regions:
        if not region.closed:
            alloc.dealloc(region)
    state.regions.clear()


def run_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    state = State()
    try:
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            if fdp.remaining_bytes() == 0:
                break
            operation = OPS[fdp.ConsumeIntInRange(0, len(OPS) - 1)]
            with contextlib.suppress(*DOCUMENTED):
                operation(state, fdp)
            settle(state)
        check_against_kernel(state)
    finally:
        cleanup(state)


def main() -> None:
    atheris.Setup(sys.argv, run_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
