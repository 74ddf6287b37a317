"""Region as a bytes-like object against the stdlib ``mmap.mmap``, in the same run
(``python -m mmap_alloc bench --only bytes-like``).

Both objects map the same number of bytes with the same contents, and each
variant runs the same Python loop over the same operation, so the ratio is
what a Region's item, slice, find and iteration cost against mmap's. Item
and slice operations are unrolled ten to a loop turn, so the loop itself
weighs less in the ratio.
"""

from __future__ import annotations

import mmap
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .. import MapAlloc
from .._linux import format_size
from .harness import Case, Variant

if TYPE_CHECKING:
    from .cases import Scale

KiB, MiB = 1 << 10, 1 << 20
SUBJECT = "mmap_alloc Region"
REFERENCE = "stdlib mmap"
UNROLL = 10
"""Operations per turn of the timed loop."""

_GROUP = "region as bytes"


def _pair(size: int, fill: bytes | None = None) -> tuple[Any, mmap.mmap, Callable[[], None]]:
    """A region and an anonymous private mmap of ``size`` bytes, both holding
    ``fill`` (zeros when None), and a function closing both."""
    region = MapAlloc().alloc(size)
    stdlib = mmap.mmap(-1, size)
    if fill is not None:
        region[:] = fill
        stdlib[:] = fill
    else:  # fault the pages in, as a filled buffer would be
        region[:] = bytes(size)
        stdlib[:] = bytes(size)

    def close() -> None:
        region.close()
        stdlib.close()

    return region, stdlib, close


def _variants(
    make: Callable[[Any], Callable[[int], object]], region: Any, stdlib: mmap.mmap
) -> tuple[Variant, Variant]:
    return Variant(SUBJECT, make(region)), Variant(REFERENCE, make(stdlib))


def _item_get(buffer: Any) -> Callable[[int], None]:
    def run(n: int) -> None:
        b, i = buffer, 1000
        for _ in range(n // UNROLL):
            b[i]
            b[i]
            b[i]
            b[i]
            b[i]
            b[i]
            b[i]
            b[i]
            b[i]
            b[i]

    return run


def _item_set(buffer: Any) -> Callable[[int], None]:
    def run(n: int) -> None:
        b, i, v = buffer, 1000, 0x5A
        for _ in range(n // UNROLL):
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v
            b[i] = v

    return run


def _slice_get(buffer: Any) -> Callable[[int], None]:
    def run(n: int) -> None:
        b, i, j = buffer, 1000, 1064
        for _ in range(n // UNROLL):
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]
            b[i:j]

    return run


def _slice_set(buffer: Any) -> Callable[[int], None]:
    data = bytes(range(64))

    def run(n: int) -> None:
        b, i, j, d = buffer, 1000, 1064, data
        for _ in range(n // UNROLL):
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d
            b[i:j] = d

    return run


def item_and_slice_access(scale: Scale) -> Iterator[Case]:
    """r[i], r[i] = v, r[a:b] and r[a:b] = data (64 bytes) against mmap.mmap."""
    ops = scale.ops(1_000_000)
    for name, make in (
        ("bytes-like r[i]", _item_get),
        ("bytes-like r[i] = v", _item_set),
        ("bytes-like r[a:b], 64 bytes", _slice_get),
        ("bytes-like r[a:b] = data, 64 bytes", _slice_set),
    ):
        region, stdlib, close = _pair(64 * KiB)
        yield Case(
            name,
            _GROUP,
            ops,
            _variants(make, region, stdlib),
            target=1.10,
            note=f"{UNROLL} operations per loop turn",
            close=close,
        )


def find_at_the_end(scale: Scale) -> Iterator[Case]:
    """find() of a 16-byte needle that sits at the end of the buffer."""
    size = 8 * MiB if scale.quick else 64 * MiB
    rng = random.Random(12)
    needle = bytes(rng.randrange(1, 256) for _ in range(16))
    block = rng.randbytes(64 * KiB)
    fill = bytearray(block * (size // len(block)))
    fill[-len(needle) :] = needle
    if fill.find(needle) != size - len(needle):  # pragma: no cover - the seed decides
        raise AssertionError("the needle occurs before the end")
    region, stdlib, close = _pair(size, bytes(fill))
    del fill

    def make(buffer: Any) -> Callable[[int], None]:
        def run(n: int) -> None:
            find = buffer.find
            for _ in range(n):
                find(needle)

        return run

    yield Case(
        f"bytes-like find of a 16-byte needle in {format_size(size)}",
        _GROUP,
        2 if scale.quick else 5,
        _variants(make, region, stdlib),
        target=1.10,
        note="random bytes, the needle at the end",
        close=close,
    )


def iteration(scale: Scale) -> Iterator[Case]:
    """for byte in r: a whole 1 MiB region, one item at a time."""
    size = 1 * MiB
    region, stdlib, close = _pair(size)
    reference = bytearray(size)

    def make(buffer: Any) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                for _byte in buffer:
                    pass

        return run

    yield Case(
        f"bytes-like iteration over {format_size(size)}",
        _GROUP,
        1 if scale.quick else 3,
        (*_variants(make, region, stdlib), Variant("bytearray", make(reference))),
        target=1.50,
        note="mmap yields 1-byte bytes, a Region ints (as bytearray)",
        close=close,
    )


CASES = (item_and_slice_access, find_at_the_end, iteration)
"""The groups of this module, listed in suite.CASE_GROUPS."""
