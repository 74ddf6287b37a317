"""The benchmark cases: mmap_alloc against the same system calls from C, and peers.

Most cases have a "C loop" variant: the system calls mmap_alloc makes for
the work, made from a C loop (mmap_alloc.bench._limits). The ratio of
mmap_alloc to it is what mmap_alloc costs on top of the kernel. It is not a
lower bound for other ways of doing the work: a peer may beat it.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import MapAlloc, ObjectPool, Perm, Region
from .._linux import (
    MADV_HUGEPAGE,
    PAGE_SIZE,
    default_hugepage_size,
    format_size,
    hugepage_pool,
    mapping_count,
)
from ..backings import THP_MIN_SIZE, thp_available
from . import _limits
from .harness import Case, Variant

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
C_LOOP = "C loop"
"""The name of the reference variant: mmap_alloc's system calls made from a C loop."""
PYTHON_FLOOR = "Python floor: a C call each"
"""The least a Python API over the same calls can cost: a Python loop that
makes them through one bare C function each (two calls and an int per op)."""
POOL_OBJ = 64
POOL_BATCH = 10_000

_MAP_POPULATE: int = getattr(mmap, "MAP_POPULATE", 0x8000)
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


@dataclass(frozen=True)
class Scale:
    """How big a run is: quick (seconds, a smoke test) or full."""

    quick: bool

    @property
    def round_trip_sizes(self) -> tuple[int, ...]:
        return (4 * KiB, 64 * KiB, 2 * MiB, 64 * MiB)

    @property
    def touched_sizes(self) -> tuple[int, ...]:
        return (
            (4 * KiB, 64 * KiB, 2 * MiB) if self.quick else (4 * KiB, 64 * KiB, 2 * MiB, 64 * MiB)
        )

    @property
    def growth_end(self) -> int:
        return 16 * MiB if self.quick else GiB

    @property
    def random_read_size(self) -> int:
        return 64 * MiB if self.quick else GiB

    @property
    def commit_size(self) -> int:
        return 8 * MiB if self.quick else 64 * MiB

    def ops(self, full: int) -> int:
        """Operations per batch: ``full`` scaled down for a quick run."""
        return max(1, full // 10) if self.quick else full


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap.restype = ctypes.c_int
    return libc


def _advice(size: int) -> int:
    """The advice the default allocator gives a region of ``size`` bytes (THP
    for 4 MiB and more, where available): the C loop gives it too."""
    return MADV_HUGEPAGE if size >= THP_MIN_SIZE and thp_available() else 0


def _round_trip_variants(size: int, *, populate: bool) -> tuple[Variant, ...]:
    allocator = MapAlloc(commit=populate)
    alloc, dealloc = allocator.alloc, allocator.dealloc
    flags = _MAP_POPULATE if populate else 0
    advice = 0 if populate else _advice(size)
    libc = _libc()
    libc_mmap, libc_munmap = libc.mmap, libc.munmap

    def ours(n: int) -> None:
        for _ in range(n):
            dealloc(alloc(size))

    def stdlib(n: int) -> None:
        for _ in range(n):
            mmap.mmap(-1, size, flags=_ANON | flags).close()

    def ctypes_libc(n: int) -> None:
        for _ in range(n):
            libc_munmap(libc_mmap(None, size, _PROT_RW, _ANON | flags, -1, 0), size)

    map_one, unmap_one = _limits.map_one, _limits.unmap_one

    def c_calls(n: int) -> None:
        for _ in range(n):
            unmap_one(map_one(size, flags, advice), size)

    return (
        Variant("mmap_alloc", ours),
        Variant(C_LOOP, lambda n: _limits.map_unmap(n, size, flags, 0, advice)),
        Variant(PYTHON_FLOOR, c_calls),
        Variant("stdlib mmap", stdlib),
        Variant("ctypes libc", ctypes_libc),
    )


def round_trips(scale: Scale) -> Iterator[Case]:
    """Case 1: alloc + dealloc of untouched memory (regions of 4 MiB and more:
    advised for THP by the default allocator, and by the C loop too)."""
    for size in scale.round_trip_sizes:
        yield Case(
            f"alloc+dealloc {format_size(size)}",
            "round trip",
            scale.ops(2000),
            _round_trip_variants(size, populate=False),
            target=1.05 if size <= 64 * KiB else 1.10,
            note="mmap + madvise(MADV_HUGEPAGE) + munmap" if _advice(size) else "mmap + munmap",
        )


def touched_round_trips(scale: Scale) -> Iterator[Case]:
    """Case 2: alloc + dealloc with every page faulted in (commit=True, MAP_POPULATE)."""
    for size in scale.touched_sizes:
        yield Case(
            f"alloc+dealloc {format_size(size)}, every page touched",
            "round trip, touched",
            max(1, scale.ops(2000) * 4 * KiB // size * 4),
            _round_trip_variants(size, populate=True),
            target=1.10,
            note="mmap(MAP_POPULATE) + munmap",
        )


def fill_by_doubling(region: Region, resize: Callable[[int], object], start: int, end: int) -> None:
    """Fill the first ``start`` bytes of ``region``, then double it with
    ``resize(new_size)`` until it is ``end`` bytes, filling each new half: the
    work of the growth cases (the region may move at each step)."""
    memset = ctypes.memset
    memset(region.address, 1, start)
    size = start
    while size < end:
        resize(size * 2)
        memset(region.address + size, 1, size)
        size *= 2


def growth(scale: Scale) -> Iterator[Case]:
    """Case 3: grow a filled buffer by doubling from 4 KiB, keeping its contents."""
    start, end = 4 * KiB, scale.growth_end
    allocator = MapAlloc()

    def by_bytearray(n: int) -> None:
        for _ in range(n):
            buffer = bytearray(b"\1") * start
            while len(buffer) < end:
                buffer *= 2

    def grow(allocator: MapAlloc) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                region = allocator.alloc(start)
                fill_by_doubling(region, functools.partial(allocator.realloc, region), start, end)
                allocator.dealloc(region)

        return run

    variants = [
        Variant("mmap_alloc realloc", grow(allocator)),
        Variant(C_LOOP, lambda n: _limits.grow_by_doubling(n, start, end)),
        Variant("bytearray *= 2", by_bytearray),
    ]
    try:
        import numpy as np
    except ImportError:
        pass
    else:

        def by_numpy(n: int) -> None:
            for _ in range(n):
                array = np.ones(start, np.uint8)
                while len(array) < end:
                    array = np.resize(array, len(array) * 2)

        variants.append(Variant("numpy.resize", by_numpy))
    if thp_available():
        variants.insert(1, Variant("mmap_alloc realloc, THP", grow(MapAlloc(huge="thp"))))
    yield Case(
        f"growth by doubling 4 KiB -> {format_size(end)}",
        "growth",
        1,
        tuple(variants),
        subject="mmap_alloc realloc",
        reference=C_LOOP,
        target=1.15,
        note="mmap + memset + mremap doubling",
    )


def protect_flips(scale: Scale) -> Iterator[Case]:
    """Case 4: flip 64 KiB between read/write and read/exec (W^X)."""
    size = 64 * KiB
    allocator = MapAlloc()
    region = allocator.alloc(size)
    address = region.address
    libc = _libc()
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    mprotect = libc.mprotect
    rx = mmap.PROT_READ | mmap.PROT_EXEC

    def flips(n: int) -> None:
        make_exec, make_writable = region.make_exec, region.make_writable
        for _ in range(n):
            make_exec()
            make_writable()

    read_exec, read_write = Perm.READ | Perm.EXEC, Perm.READ | Perm.WRITE

    def protects(n: int) -> None:
        protect = region.protect
        for _ in range(n):
            protect(read_exec)
            protect(read_write)

    def ctypes_libc(n: int) -> None:
        for _ in range(n):
            mprotect(address, size, rx)
            mprotect(address, size, _PROT_RW)

    yield Case(
        "protect flip rw- <-> r-x, 64 KiB",
        "protection",
        scale.ops(2000),
        (
            Variant("mmap_alloc make_exec+make_writable", flips),
            Variant("mmap_alloc protect x2", protects),
            Variant(C_LOOP, lambda n: _limits.protect_flip(n, address, size)),
            Variant("ctypes libc", ctypes_libc),
        ),
        subject="mmap_alloc make_exec+make_writable",
        reference=C_LOOP,
        target=1.10,
        note="mprotect r-x + mprotect rw-",
        close=region.close,
    )


def commit_uncommit(scale: Scale) -> Iterator[Case]:
    """Case 5: commit then uncommit a whole region."""
    size = scale.commit_size
    allocator = MapAlloc()
    region = allocator.alloc(size)
    address = region.address

    def ours(n: int) -> None:
        for _ in range(n):
            allocator.commit(region)
            allocator.uncommit(region)

    yield Case(
        f"commit+uncommit {format_size(size)}",
        "commit",
        2 if scale.quick else 5,
        (
            Variant("mmap_alloc", ours),
            Variant(C_LOOP, lambda n: _limits.commit_uncommit(n, address, size)),
        ),
        target=1.10,
        note="madvise(MADV_POPULATE_WRITE) + madvise(MADV_DONTNEED)",
        close=region.close,
    )


def random_reads(scale: Scale) -> Iterator[Case]:
    """Case 7: random 8-byte reads over a large buffer, huge pages against 4 KiB pages."""
    size = scale.random_read_size
    reads = 1 << 20 if scale.quick else 1 << 22
    regions = {"4 KiB pages": MapAlloc(commit=True).alloc(size)}
    if thp_available():
        regions["THP"] = MapAlloc(huge="thp", commit=True).alloc(size)
    pool = hugepage_pool(default_hugepage_size() or 0)
    if pool is not None and pool.free * pool.size >= size:
        regions["hugetlb"] = MapAlloc(huge="hugetlb", commit=True).alloc(size)
    subject = "THP" if "THP" in regions else "hugetlb" if "hugetlb" in regions else None

    def reader(name: str) -> Variant:
        region = regions[name]
        address = region.address
        return Variant(name, lambda n: _limits.random_reads(n * reads, address, size, 0x9E3779B9))

    def close() -> None:
        for region in regions.values():
            region.close()

    if subject is None:
        close()
        return
    yield Case(
        f"random 8-byte reads over {format_size(size)}",
        "huge pages",
        1,
        tuple(reader(name) for name in regions),
        subject=subject,
        reference="4 KiB pages",
        note=f"{reads:,} reads per op, from C",
        close=close,
    )


def pool_pairs(scale: Scale) -> Iterator[Case]:
    """Case 6: an ObjectPool alloc()+free() pair against the floor of any free
    list visible from Python (list.pop()+list.append()) and against peers; and
    alloc_many()+free_many() per object against the single pair."""
    pool = ObjectPool(POOL_OBJ)
    keep = pool.alloc_many(1000)  # a pool in use, not an empty one
    items = [object() for _ in range(1000)]
    libc = _libc()
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]

    def pool_pair(n: int) -> None:
        alloc, free = pool.alloc, pool.free
        for _ in range(n):
            free(alloc())

    def list_pair(n: int) -> None:
        pop, append = items.pop, items.append
        for _ in range(n):
            append(pop())

    def by_bytearray(n: int) -> None:
        for _ in range(n):
            bytearray(POOL_OBJ)

    def by_ctypes(n: int) -> None:
        create = ctypes.create_string_buffer
        for _ in range(n):
            create(POOL_OBJ)

    def by_malloc(n: int) -> None:
        malloc, free = libc.malloc, libc.free
        for _ in range(n):
            free(malloc(POOL_OBJ))

    def batch(n: int) -> None:
        alloc_many, free_many = pool.alloc_many, pool.free_many
        for _ in range(max(1, n // POOL_BATCH)):
            free_many(alloc_many(POOL_BATCH))

    def close() -> None:
        pool.free_many(keep)
        pool.close()

    pairs = scale.ops(200_000)
    yield Case(
        f"ObjectPool alloc+free, {POOL_OBJ} B",
        "pool",
        pairs,
        (
            Variant("ObjectPool", pool_pair),
            Variant("list.pop+append", list_pair),
            Variant("bytearray", by_bytearray),
            Variant("ctypes.create_string_buffer", by_ctypes),
            Variant("libc malloc+free (ctypes)", by_malloc),
        ),
        target=1.5,
        note="bound methods in locals, as in a hot loop",
    )
    yield Case(
        f"ObjectPool alloc_many+free_many({POOL_BATCH:,}), per object",
        "pool",
        max(POOL_BATCH, pairs),
        (Variant("alloc_many+free_many", batch), Variant("alloc+free pair", pool_pair)),
        target=0.5,
        note="per object",
        close=close,
    )


def resident_bytes() -> int:
    """The process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def pool_memory(scale: Scale) -> dict[str, int | float]:
    """Memory of many live 64-byte objects, every byte written (target for a
    million: at most 70 MiB resident and 200 mappings)."""
    count = 100_000 if scale.quick else 1_000_000
    gc.collect()
    maps, rss = mapping_count(), resident_bytes()
    pool = ObjectPool(POOL_OBJ)
    memset = ctypes.memset
    for _ in range(count // POOL_BATCH):
        for address in pool.alloc_many(POOL_BATCH):
            memset(address, 0xA5, POOL_OBJ)
    stats = pool.stats()
    figures: dict[str, int | float] = {
        "live objects": stats.live,
        "slabs": stats.slabs,
        "slabs resident + bookkeeping (MiB)": (stats.resident + stats.metadata) / MiB,
        "process RSS growth (MiB)": (resident_bytes() - rss) / MiB,
        "new mappings": mapping_count() - maps,
    }
    pool.close()
    return figures


def pool_overhead() -> dict[str, int | float]:
    """Per-object memory overhead in percent (mapped + bookkeeping beyond the
    objects' strides) of pools filled to 16 slabs (target: at most 2% from 64 B)."""
    figures: dict[str, int | float] = {}
    for obj_size in (64, 256, 4096):
        pool = ObjectPool(obj_size)
        pool.alloc_many(16 * (pool.slab_size // pool.stride))
        stats = pool.stats()
        used = stats.mapped + stats.metadata
        figures[f"{obj_size} B objects"] = 100 * (used / (stats.live * pool.stride) - 1)
        pool.close()
    return figures


def _python_heap() -> int:
    """Bytes tracemalloc traces in Python's own domain (not the mapped memory
    the library reports in a domain of its own)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(inclusive=True, domain=0)]
    )
    return sum(trace.size for trace in snapshot.traces)


def python_bytes_per_object(make: Callable[[], object], count: int) -> float:
    """Bytes of Python heap (tracemalloc) each live object of ``make()`` holds."""
    tracemalloc.start()
    try:
        before = _python_heap()
        objects = [make() for _ in range(count)]
        after = _python_heap()
        holder = 8 * count  # the list's own pointers
        result = (after - before - holder) / count
        del objects
        return result
    finally:
        tracemalloc.stop()


def memory_per_region(count: int = 2000) -> dict[str, int | float]:
    """Case 8: Python-side bytes per live Region against a stdlib mmap object."""
    allocator = MapAlloc()
    return {
        "mmap_alloc Region": python_bytes_per_object(lambda: allocator.alloc(PAGE_SIZE), count),
        "stdlib mmap.mmap": python_bytes_per_object(lambda: mmap.mmap(-1, PAGE_SIZE), count),
    }
