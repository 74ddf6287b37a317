"""MapAlloc: allocating near an address (within 2 GiB of libc: code there calls it directly)."""

from __future__ import annotations

import ctypes
import itertools
import threading

import pytest

from allocator_support import MiB, R, W
from machine_code import CALL_REACH, call_near, needs_code
from mmap_alloc import AllocError, CannotReallocInPlace, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mappings
from support import kernel_runs

# ---------------------------------------------------------------- near an address

GiB2 = 1 << 31


def libc_labs() -> int:
    address = ctypes.cast(ctypes.CDLL(None).labs, ctypes.c_void_p).value
    assert address is not None
    return address


def within_reach(region: Region, near: int, within: int = GiB2) -> bool:
    """Every byte of the region lies less than ``within`` bytes from ``near``."""
    first, last = region.address, region.address + region.capacity - 1
    return abs(first - near) < within and abs(last - near) < within


def test_alloc_near_libc_lies_within_2_gib_of_it(alloc: MapAlloc) -> None:
    near = ctypes.cast(ctypes.CDLL(None).printf, ctypes.c_void_p).value
    assert near is not None
    with alloc.alloc(64 * P, near=near) as region:
        assert within_reach(region, near)
        assert kernel_runs(region) == [(0, 64 * P, R | W)]
        region[:5] = b"hello"  # ordinary memory: zero-filled, writable
        assert region[:6] == b"hello\0"


def test_alloc_near_honours_a_small_within_and_the_alignment(alloc: MapAlloc) -> None:
    near = libc_labs()
    with alloc.alloc(3 * P, 16 * P, near=near, within=256 * MiB) as region:
        assert within_reach(region, near, 256 * MiB)
        assert region.address % (16 * P) == 0


@needs_code
def test_code_in_a_region_near_libc_calls_it_directly() -> None:
    """Generated code reaches libc's labs with a direct call: call rel32 (a
    32-bit displacement) on x86-64, bl (26 bits of instructions) on arm64."""
    target = libc_labs()
    alloc = MapAlloc()
    region = alloc.alloc(P, near=target, within=CALL_REACH)
    assert within_reach(region, target, CALL_REACH)
    code = call_near(region.address, target)
    region[: len(code)] = code
    region.make_exec()
    labs = region.function(ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long))
    assert labs(-1234) == 1234
    del labs
    alloc.dealloc(region)


def test_reserve_near_lies_within_reach_and_is_inaccessible(alloc: MapAlloc) -> None:
    near = libc_labs()
    with alloc.reserve(1 << 30, near=near) as space:
        assert within_reach(space, near)
        assert kernel_runs(space) == [(0, 1 << 30, Perm.NONE)]


def test_a_window_that_is_all_taken_raises_alloc_error(alloc: MapAlloc) -> None:
    with alloc.alloc(16 * P) as taken:
        middle = taken.address + 8 * P  # every byte in reach lies inside `taken`
        with pytest.raises(AllocError, match="no free range of 4096 bytes lies less than") as info:
            alloc.alloc(P, near=middle, within=4 * P)
        assert info.value.size == P
        with pytest.raises(AllocError, match="no free range"):
            alloc.reserve(P, near=middle, within=4 * P)


def test_a_window_smaller_than_the_size_raises_alloc_error(alloc: MapAlloc) -> None:
    with pytest.raises(AllocError, match="no free range of 65536 bytes"):
        alloc.alloc(16 * P, near=1 << 40, within=4 * P)


def test_near_allocation_only_adds_lines_to_proc_maps() -> None:
    """Nothing mapped is replaced, moved or joined: the lines of
    /proc/self/maps before are all there after, unchanged, and each new
    region is a line of its own.

    The interpreter's own anonymous read/write memory (obmalloc arenas,
    malloc) may grow meanwhile and join its neighbours' lines, so those lines
    are left out; the regions here are read-only or inaccessible, unlike them.
    """
    near = libc_labs()
    alloc = MapAlloc(write=False)

    def lines() -> set[tuple[int, int, Perm, str]]:
        return {(m.start, m.end, m.perms, m.name) for m in mappings() if m.name or m.perms != R | W}

    before = lines()
    regions = [alloc.alloc(size, near=near) for size in (P, 5 * P, 64 * P)]
    regions.append(alloc.reserve(16 * P, near=near))
    after = lines()
    own = {(r.address, r.address + r.capacity, r.perms, "") for r in regions}
    for region in regions:
        region.close()
    assert before <= after, sorted(before - after)
    assert after - before == own


def test_threads_allocating_near_one_address_never_overlap() -> None:
    alloc = MapAlloc()
    near = libc_labs()
    results: list[list[Region]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()
            for _ in range(25):
                results[i].append(alloc.alloc(P * (1 + i % 3), near=near, within=1 << 28))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    regions = [region for found in results for region in found]
    try:
        assert not errors, errors
        assert len(regions) == 200
        spans = sorted((r.address, r.address + r.capacity) for r in regions)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
        assert all(within_reach(r, near, 1 << 28) for r in regions)
    finally:
        for region in regions:
            region.close()


def test_a_near_region_may_leave_reach_when_realloc_moves_it(alloc: MapAlloc) -> None:
    """realloc keeps no promise of reach (documented); grow_in_place never moves."""
    near = libc_labs()
    region = alloc.alloc(P, near=near, within=1 << 30)
    address = region.address
    try:
        alloc.grow_in_place(region, 2 * P)
    except CannotReallocInPlace:
        pass
    else:
        assert region.address == address
    alloc.dealloc(region)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"near": "0x1000"}, TypeError, "near must be an integer, not str"),
        ({"near": 1.5}, TypeError, "near must be an integer, not float"),
        ({"near": True}, TypeError, "near must be an integer, not bool"),
        ({"near": -1}, ValueError, "near must be an address from 0 to 2\\*\\*64 - 1, got -1"),
        ({"near": 1 << 64}, ValueError, "near must be an address"),
        ({"near": 1 << 40, "within": 0}, ValueError, "within must be positive, got 0"),
        ({"near": 1 << 40, "within": -1}, ValueError, "within must be positive, got -1"),
        ({"near": 1 << 40, "within": "1"}, TypeError, "within must be an integer, not str"),
        ({"within": 1 << 20}, TypeError, "within= needs near="),
    ],
)
def test_alloc_and_reserve_refuse_bad_placement(
    alloc: MapAlloc, kwargs: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        alloc.alloc(P, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        alloc.reserve(P, **kwargs)  # type: ignore[arg-type]


def test_alloc_near_still_checks_size_and_alignment(alloc: MapAlloc) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        alloc.alloc(0, near=1 << 40)
    with pytest.raises(ValueError, match="align must be a positive power of two"):
        alloc.alloc(P, 3, near=1 << 40)
