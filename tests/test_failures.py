"""Failures the kernel causes, provoked in child processes: the address-space
limit (RLIMIT_AS) and the mapping-count limit (vm.max_map_count).

Each test runs a fresh interpreter, so that the limit hurts only the child and
the child's address space is small (the test runner's, with numpy's threads,
is larger than the limit). The child asserts; the test checks its exit status.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from mmap_alloc._linux import max_map_count
from support import FILLS_THE_MAP_COUNT, RLIMIT_AS, emulated_skip

PRELUDE = """
import ctypes, errno, resource
from mmap_alloc import AllocError, CannotReallocInPlace, MapAlloc, Perm, _mman
from mmap_alloc._linux import PAGE_SIZE as P, mapping_count
MiB = 1 << 20

def limit_address_space_growth(n):
    # n bytes more than the process has now (a free-threaded one starts with about 1 GiB)
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm * 1024 + n
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
"""


def run_child(*parts: str) -> str:
    """Run the code ``parts`` (after PRELUDE) in a fresh interpreter; return its output."""
    script = PRELUDE + "".join(textwrap.dedent(part) for part in parts)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ---------------------------------------------------------------- RLIMIT_AS


@emulated_skip(RLIMIT_AS)
def test_alloc_past_the_address_space_limit_is_alloc_error() -> None:
    run_child(
        """
        limit_address_space_growth(256 * MiB)
        alloc = MapAlloc()
        before = _mman.mapped_bytes()
        try:
            alloc.alloc(512 * MiB)
        except AllocError as exc:
            assert exc.errno == errno.ENOMEM and exc.size == 512 * MiB, exc
            assert isinstance(exc, MemoryError)
        else:
            raise AssertionError("512 MiB were mapped with 256 MiB of room")
        assert _mman.mapped_bytes() == before
        with alloc.alloc(MiB) as region:  # smaller allocations still work
            region[-1] = 1
        """
    )


@emulated_skip(RLIMIT_AS)
def test_aligned_alloc_past_the_address_space_limit_is_alloc_error_and_maps_nothing() -> None:
    run_child(
        """
        limit_address_space_growth(256 * MiB)
        alloc = MapAlloc()
        maps, before = mapping_count(), _mman.mapped_bytes()
        for size, align in ((512 * MiB, 2 * MiB), (P, 512 * MiB)):
            try:
                alloc.alloc(size, align)
            except AllocError:
                pass
            else:
                raise AssertionError(f"alloc({size}, {align}) fit under the limit")
        assert _mman.mapped_bytes() == before
        assert mapping_count() <= maps
        """
    )


@emulated_skip(RLIMIT_AS)
def test_failing_realloc_past_the_address_space_limit_leaves_the_region_intact() -> None:
    run_child(
        """
        limit_address_space_growth(256 * MiB)
        alloc = MapAlloc()
        region = alloc.alloc(3 * P + 5)
        data = bytes(range(256)) * ((3 * P + 5) // 256) + bytes(range((3 * P + 5) % 256))
        region[:] = data
        before = (region.address, region.size, region.capacity, _mman.mapped_bytes())
        for grow in (alloc.realloc, alloc.grow_in_place):
            try:
                grow(region, 512 * MiB)
            except (AllocError, CannotReallocInPlace):
                pass
            else:
                raise AssertionError(f"{grow.__name__} grew past the limit")
            assert (region.address, region.size, region.capacity, _mman.mapped_bytes()) == before
            assert bytes(region) == data
        alloc.realloc(region, 8 * P)  # a growth within the limit still works
        assert bytes(region) == data + bytes(8 * P - len(data))
        alloc.dealloc(region)
        """
    )


@emulated_skip(RLIMIT_AS)
def test_failing_realloc_by_copy_past_the_address_space_limit_leaves_the_region_intact() -> None:
    run_child(
        """
        limit_address_space_growth(256 * MiB)
        alloc = MapAlloc()
        region = alloc.alloc(2 * P)
        region[:] = b"\\x07" * (2 * P)
        region.protect(Perm(1), P, P)  # mixed protections: mremap cannot move it
        before = (region.address, region.size, region.capacity, _mman.mapped_bytes())
        try:
            alloc.realloc(region, 512 * MiB)
        except AllocError:
            pass
        else:
            raise AssertionError("realloc grew past the limit")
        assert (region.address, region.size, region.capacity, _mman.mapped_bytes()) == before
        assert bytes(region) == b"\\x07" * (2 * P)
        assert [perms for _, _, perms in region.protections()] == [3, 1]
        alloc.dealloc(region)
        """
    )


# ---------------------------------------------------------------- vm.max_map_count

FILL_TO_THE_LIMIT = """
rw, ro = MapAlloc(), MapAlloc(write=False)
regions = []
try:
    while True:  # alternating permissions: neighbours never merge into one mapping
        regions.append(rw.alloc(P))
        regions.append(ro.alloc(P))
except AllocError as exc:
    assert exc.errno == errno.ENOMEM, exc
else:
    raise AssertionError("unreachable")
assert len(regions) > 1000, len(regions)
"""


@pytest.mark.skipif(max_map_count() > 1_000_000, reason="vm.max_map_count is too high to reach")
@FILLS_THE_MAP_COUNT
def test_alloc_at_the_map_count_limit_is_alloc_error_and_every_region_can_be_freed() -> None:
    run_child(
        FILL_TO_THE_LIMIT,
        """
        for attempt in (lambda: rw.alloc(P), lambda: ro.alloc(3 * P, 2 * MiB)):
            try:
                attempt()
            except AllocError:
                pass
            else:
                raise AssertionError("a mapping past the limit")
        for region in regions:
            region.close()
        assert _mman.mapped_bytes() == 0
        with rw.alloc(P) as region:  # and allocation works again
            region[0] = 1
        """,
    )


@pytest.mark.skipif(max_map_count() > 1_000_000, reason="vm.max_map_count is too high to reach")
@FILLS_THE_MAP_COUNT
def test_a_realloc_that_must_move_at_the_map_count_limit_fails_and_keeps_the_region() -> None:
    run_child(
        """
        mover = MapAlloc()
        region = mover.alloc(P)
        region[:] = b"\\x09" * P
        """,
        FILL_TO_THE_LIMIT,
        """
        address = region.address
        try:
            mover.realloc(region, 64 * P)
        except AllocError as exc:
            assert exc.errno == errno.ENOMEM, exc
        else:
            raise AssertionError("a mapping moved at the limit")
        assert (region.address, region.size, region.capacity) == (address, P, P)
        assert bytes(region) == b"\\x09" * P
        for _ in range(8):  # moving needs a few mappings to spare
            regions.pop().close()
        mover.realloc(region, 64 * P)  # with room again, it works
        assert bytes(region) == b"\\x09" * P + bytes(63 * P)
        for r in regions + [region]:
            r.close()
        assert _mman.mapped_bytes() == 0
        """,
    )


@pytest.mark.skipif(max_map_count() > 1_000_000, reason="vm.max_map_count is too high to reach")
@FILLS_THE_MAP_COUNT
def test_a_close_that_must_split_a_mapping_at_the_limit_fails_and_keeps_the_region() -> None:
    run_child(
        """
        # three adjacent read/write pages: the kernel merges them into one mapping
        merged = MapAlloc()
        batch = sorted((merged.alloc(P) for _ in range(64)), key=lambda r: r.address)
        trio = next(
            batch[i : i + 3]
            for i in range(62)
            if batch[i].address + P == batch[i + 1].address == batch[i + 2].address - P
        )
        for r in batch:
            if r not in trio:
                r.close()
        middle = trio[1]
        middle[:] = b"\\x05" * P
        """,
        FILL_TO_THE_LIMIT,
        """
        try:
            merged.dealloc(middle)
        except AllocError as exc:
            assert exc.errno == errno.ENOMEM, exc
        else:
            raise AssertionError("unmapping the middle of a mapping needed no new mapping")
        assert not middle.closed
        assert bytes(middle) == b"\\x05" * P
        regions.pop().close()
        regions.pop().close()
        merged.dealloc(middle)  # with room again, it works
        assert middle.closed
        for r in regions + [trio[0], trio[2]]:
            r.close()
        assert _mman.mapped_bytes() == 0
        """,
    )


# ---------------------------------------------------------------- a full mapping cache

FILL_WITH_LIBC = """
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
FAILED = ctypes.c_void_p(-1).value
fillers = []

def fill():
    # r-- and r-x alternating: never merged with each other or with rw- pages,
    # and mapped behind the library's back (its refusals would trim the caches)
    while True:
        p = libc.mmap(None, P, 1 if len(fillers) % 2 else 5, 0x22, -1, 0)
        if p in (None, FAILED):
            return
        fillers.append(p)

def room(n):
    for _ in range(n):
        libc.munmap(fillers.pop(), P)

def full_cache(n):
    # n cached mappings, each a kernel mapping of its own (live r-- neighbours)
    cache, separators = MapAlloc(cache=n), MapAlloc(write=False)
    pairs = [(cache.alloc(P), separators.alloc(P)) for _ in range(n)]
    for region, _ in pairs:
        cache.dealloc(region)
    assert cache.stats().cache.mappings == n
    return cache, [separator for _, separator in pairs]
"""


@pytest.mark.skipif(max_map_count() > 1_000_000, reason="vm.max_map_count is too high to reach")
@FILLS_THE_MAP_COUNT
def test_at_the_map_count_limit_a_full_cache_is_emptied_before_anything_fails() -> None:
    run_child(
        FILL_WITH_LIBC,
        """
        victims = MapAlloc()
        victim = victims.alloc(3 * P)  # a protection change in its middle needs 2 mappings
        batch = sorted((victims.alloc(P) for _ in range(64)), key=lambda r: r.address)
        trio = next(  # three adjacent pages: one kernel mapping, split by freeing the middle
            batch[i : i + 3]
            for i in range(62)
            if batch[i].address + P == batch[i + 1].address == batch[i + 2].address - P
        )
        for r in batch:
            if r not in trio:
                r.close()
        odd = MapAlloc(read=False, write=False, exec=True)  # --x: merges with nothing here
        made = []
        fill()
        steps = {
            "protect": lambda: victim.protect(Perm.READ, P, P),
            "alloc": lambda: made.append(odd.alloc(P)),
            "dealloc": lambda: victims.dealloc(trio[1]),
        }
        for name, step in steps.items():
            room(100)
            cache, separators = full_cache(40)
            fill()
            step()  # ENOMEM first: the caches are emptied, then it works
            assert cache.stats().cache.mappings == 0, name
            room(2 * len(separators))
            for region in separators:
                region.close()
            fill()
        assert victim.protections() == [(0, P, 3), (P, P, 1), (2 * P, P, 3)]
        assert trio[1].closed
        room(len(fillers))
        for region in [victim, trio[0], trio[2], *made]:
            region.close()
        assert _mman.mapped_bytes() == 0
        """,
    )


@pytest.mark.skipif(max_map_count() > 1_000_000, reason="vm.max_map_count is too high to reach")
@FILLS_THE_MAP_COUNT
def test_a_dealloc_the_cache_refuses_at_the_limit_runs_no_python_code_before_its_unmap() -> None:
    run_child(
        FILL_WITH_LIBC,
        """
        import sys
        cache = MapAlloc(cache=4)
        batch = [cache.alloc(P) for _ in range(64)]
        at = {r.address: r for r in batch}
        region = next(r for r in batch if r.address - P in at and r.address + P in at)
        at[region.address + P].protect(Perm.READ)
        region.protect(Perm.READ)  # one mapping with its right neighbour: read/write splits it
        at[region.address - P].protect(Perm.NONE)  # and merges it with nothing
        exports = []

        def export(frame, event, arg):
            if event == "call" and not exports and not region.closed:
                exports.append(memoryview(region))

        fill()
        sys.settrace(export)
        try:
            cache.dealloc(region)  # the cache cannot set read/write back: an unmap instead
        finally:
            sys.settrace(None)
            room(len(fillers))
        assert region.closed and not exports, exports
        assert cache.stats().cache.mappings == 0
        for r in batch:
            r.close()
        assert _mman.mapped_bytes() == 0
        """,
    )


@emulated_skip(RLIMIT_AS)
def test_under_the_address_space_limit_a_full_cache_is_emptied_before_alloc_fails() -> None:
    run_child(
        """
        limit_address_space_growth(256 * MiB)
        cache = MapAlloc(cache=8)
        regions = [cache.alloc(40 * MiB) for _ in range(4)]
        for region in regions:
            cache.dealloc(region)
        assert cache.stats().cache.bytes == 160 * MiB
        with MapAlloc().alloc(160 * MiB) as big:  # fits once the cache gave its space back
            big[-1] = 1
        assert cache.stats().cache.mappings == 0
        mover = MapAlloc()
        small = mover.alloc(P)
        small[0] = 9
        regions = [cache.alloc(40 * MiB) for _ in range(4)]
        for region in regions:
            cache.dealloc(region)
        mover.realloc(small, 160 * MiB)  # a move, the same way
        assert (small[0], small[-1]) == (9, 0)
        assert cache.stats().cache.mappings == 0
        mover.dealloc(small)
        assert _mman.mapped_bytes() == 0
        """
    )
