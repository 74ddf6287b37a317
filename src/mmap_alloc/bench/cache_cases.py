"""The mapping cache and first touch against the C loop and the peers that
reuse memory (``python -m mmap_alloc bench --only cache``, ``--only "first touch"``).

The cache cases run ``MapAlloc(cache=64)`` against the same C loop as the
round trips (mmap + munmap, and a write to each page when pages are
touched): the ratio is what the cache saves, or costs, against the system
calls it replaces. ``bytearray`` and ``numpy.zeros`` are beside them: they
reuse memory malloc already holds, which is what the cache does for pages.

The first-touch case maps 64 MiB with the default allocator (transparent
huge pages for regions of 4 MiB and more, as numpy does), writes one byte
of every 4 KiB page and frees it, against ``numpy.zeros`` doing the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from .. import MapAlloc
from .._linux import PAGE_SIZE, format_size
from . import _limits
from .harness import Case, Variant

if TYPE_CHECKING:
    from .cases import Scale

KiB, MiB = 1 << 10, 1 << 20
C_LOOP = "C loop"
CACHED = "mmap_alloc cache=64"
CACHE_SIZE = 64
FIRST_TOUCH = 64 * MiB
NUMPY_TOUCHED = "numpy.zeros + touch"


def _numpy() -> object | None:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _touching(allocator: MapAlloc, size: int) -> Callable[[int], None]:
    """``run(n)``: n times, alloc ``size`` bytes, write one byte of each page, dealloc."""
    alloc, dealloc = allocator.alloc, allocator.dealloc
    ones = b"\1" * (size // PAGE_SIZE)

    def every_page(n: int) -> None:
        for _ in range(n):
            region = alloc(size)
            region[::PAGE_SIZE] = ones
            dealloc(region)

    return every_page


def _cache_variants(size: int, *, touch: bool) -> tuple[Variant, ...]:
    """alloc + (a write to each page) + dealloc: cached, not cached, the C
    loop, and the peers that reuse memory."""
    pages = size // PAGE_SIZE
    ones = b"\1" * pages
    cached, plain = MapAlloc(cache=CACHE_SIZE), MapAlloc()

    def ours(allocator: MapAlloc) -> Callable[[int], None]:
        alloc, dealloc = allocator.alloc, allocator.dealloc
        if not touch:

            def untouched(n: int) -> None:
                for _ in range(n):
                    dealloc(alloc(size))

            return untouched
        if pages == 1:

            def one_page(n: int) -> None:
                for _ in range(n):
                    region = alloc(size)
                    region[0] = 1
                    dealloc(region)

            return one_page

        return _touching(allocator, size)

    def by_bytearray(n: int) -> None:
        for _ in range(n):
            buffer = bytearray(size)
            if touch:
                buffer[::PAGE_SIZE] = ones

    variants = [
        Variant(CACHED, ours(cached)),
        Variant(C_LOOP, lambda n: _limits.map_unmap(n, size, 0, 1 if touch else 0)),
        Variant("mmap_alloc, no cache", ours(plain)),
        Variant("bytearray", by_bytearray),
    ]
    np = _numpy()
    if np is not None:
        zeros, uint8 = np.zeros, np.uint8  # type: ignore[attr-defined]

        def by_numpy(n: int) -> None:
            for _ in range(n):
                array = zeros(size, uint8)
                if touch:
                    array[::PAGE_SIZE] = 1

        variants.append(Variant("numpy.zeros", by_numpy))
    return tuple(variants)


def cache_round_trips(scale: Scale) -> Iterator[Case]:
    """alloc + dealloc with ``MapAlloc(cache=64)``: untouched, and with one
    byte written to each page (the kernel's zero-fill of it on the next
    touch is the cache's cost)."""
    targets = {(4 * KiB, False): 0.35, (4 * KiB, True): 0.70}
    for touch in (False, True):
        for size in (4 * KiB, 64 * KiB):
            what = ", one byte touched per page" if touch else ""
            yield Case(
                f"alloc+dealloc {format_size(size)}, cache=64{what}",
                "mapping cache",
                scale.ops(2000),
                _cache_variants(size, touch=touch),
                target=targets.get((size, touch)),
                note="mmap (+ a write per page) + munmap" if touch else "mmap + munmap",
            )


def first_touch(scale: Scale) -> Iterator[Case]:
    """64 MiB mapped, one byte of every page written, freed: the default
    allocator (THP advice for 4 MiB and more) against numpy.zeros."""
    np = _numpy()
    if np is None:
        return
    size = FIRST_TOUCH
    zeros, uint8 = np.zeros, np.uint8  # type: ignore[attr-defined]

    def by_numpy(n: int) -> None:
        for _ in range(n):
            array = zeros(size, uint8)
            array[::PAGE_SIZE] = 1
            del array

    yield Case(
        f"first touch of {format_size(size)}, every page",
        "first touch",
        1 if scale.quick else 3,
        (
            Variant("mmap_alloc default", _touching(MapAlloc(), size)),
            Variant(NUMPY_TOUCHED, by_numpy),
            Variant('mmap_alloc huge="normal"', _touching(MapAlloc(huge="normal"), size)),
            Variant(C_LOOP, lambda n: _limits.map_unmap(n, size, 0, 1)),
        ),
        target=1.0,
        note="map, write a byte of each 4 KiB page, free",
    )
