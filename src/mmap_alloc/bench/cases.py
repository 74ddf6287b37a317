"""The benchmark cases: mmap_alloc against the same system calls from C, and peers.

Every case has a "C limit" variant: the system calls mmap_alloc makes for
the work, made from a C loop (mmap_alloc.bench._limits). The ratio of
mmap_alloc to it is what mmap_alloc costs on top of the kernel.
"""

from __future__ import annotations

import ctypes
import mmap
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import MapAlloc
from .._platform import PAGE_SIZE, format_size
from . import _limits
from .harness import Case, Variant

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

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


def _round_trip_variants(size: int, *, populate: bool) -> tuple[Variant, ...]:
    allocator = MapAlloc(commit=populate)
    alloc, dealloc = allocator.alloc, allocator.dealloc
    flags = _MAP_POPULATE if populate else 0
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

    return (
        Variant("mmap_alloc", ours),
        Variant("C limit", lambda n: _limits.map_unmap(n, size, flags, 0)),
        Variant("stdlib mmap", stdlib),
        Variant("ctypes libc", ctypes_libc),
    )


def round_trips(scale: Scale) -> Iterator[Case]:
    """Case 1: alloc + dealloc of untouched memory."""
    for size in scale.round_trip_sizes:
        yield Case(
            f"alloc+dealloc {format_size(size)}",
            "round trip",
            scale.ops(2000),
            _round_trip_variants(size, populate=False),
            "mmap_alloc",
            "C limit",
            target=1.10,
            note="mmap + munmap",
        )


def touched_round_trips(scale: Scale) -> Iterator[Case]:
    """Case 2: alloc + dealloc with every page faulted in (commit=True, MAP_POPULATE)."""
    for size in scale.touched_sizes:
        yield Case(
            f"alloc+dealloc {format_size(size)}, every page touched",
            "round trip, touched",
            max(1, scale.ops(2000) * 4 * KiB // size * 4),
            _round_trip_variants(size, populate=True),
            "mmap_alloc",
            "C limit",
            target=1.10,
            note="mmap(MAP_POPULATE) + munmap",
        )


def growth(scale: Scale) -> Iterator[Case]:
    """Case 3: grow a filled buffer by doubling from 4 KiB, keeping its contents."""
    start, end = 4 * KiB, scale.growth_end
    allocator = MapAlloc()
    memset = ctypes.memset

    def ours(n: int) -> None:
        for _ in range(n):
            region = allocator.alloc(start)
            memset(region.address, 1, start)
            size = start
            while size < end:
                allocator.realloc(region, size * 2)
                memset(region.address + size, 1, size)
                size *= 2
            allocator.dealloc(region)

    def by_bytearray(n: int) -> None:
        for _ in range(n):
            buffer = bytearray(b"\1") * start
            while len(buffer) < end:
                buffer *= 2

    variants = [
        Variant("mmap_alloc realloc", ours),
        Variant("C limit", lambda n: _limits.grow_by_doubling(n, start, end)),
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
    yield Case(
        f"growth by doubling 4 KiB -> {format_size(end)}",
        "growth",
        1,
        tuple(variants),
        "mmap_alloc realloc",
        "C limit",
        target=1.15,
        note="mmap + memset + mremap doubling",
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
            Variant("C limit", lambda n: _limits.commit_uncommit(n, address, size)),
        ),
        "mmap_alloc",
        "C limit",
        target=1.10,
        note="madvise(MADV_POPULATE_WRITE) + madvise(MADV_DONTNEED)",
        close=region.close,
    )


def python_bytes_per_object(make: Callable[[], object], count: int) -> float:
    """Bytes of Python heap (tracemalloc) each live object of ``make()`` holds."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        objects = [make() for _ in range(count)]
        after = tracemalloc.get_traced_memory()[0]
        holder = 8 * count  # the list's own pointers
        result = (after - before - holder) / count
        del objects
        return result
    finally:
        tracemalloc.stop()


def memory_per_region(count: int = 2000) -> dict[str, float]:
    """Case 8: Python-side bytes per live Region against a stdlib mmap object."""
    allocator = MapAlloc()
    return {
        "mmap_alloc Region": python_bytes_per_object(lambda: allocator.alloc(PAGE_SIZE), count),
        "stdlib mmap.mmap": python_bytes_per_object(lambda: mmap.mmap(-1, PAGE_SIZE), count),
    }


CASE_GROUPS: tuple[Callable[[Scale], Iterator[Case]], ...] = (
    round_trips,
    touched_round_trips,
    growth,
    commit_uncommit,
)
