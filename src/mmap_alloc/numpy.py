"""numpy arrays on regions (needs numpy: ``pip install 'mmap-alloc[numpy]'``).

``region.ndarray(dtype, shape)`` views a region's bytes as an array;
``empty()`` and ``zeros()`` make an array on a region of its own, e.g. backed
by huge pages: ``zeros((4096, 4096), huge="thp")``.

Every array pins its region: the region holds an export (as for a
memoryview) as long as the array or any view of it lives, so it cannot be
unmapped, moved or made unreadable under the array. The export is held by a
private object at the root of the array's ``base`` chain, not by a
memoryview there, because releasing such a memoryview would unpin the region
while the array still points into it. Arrays from ``empty()``/``zeros()`` own
their region: when the last view is gone, the memory goes back to the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from . import _args

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - numpy is an optional extra
    raise ImportError("mmap_alloc.numpy needs numpy: pip install 'mmap-alloc[numpy]'") from exc

if TYPE_CHECKING:
    from numpy.typing import DTypeLike, NDArray

    from .allocator import MapAlloc
    from .region import Region

__all__ = ["empty", "ndarray", "region_of", "zeros"]


class _Pin:
    """Holds an export of a region for as long as arrays over it live; numpy
    finds the memory through ``__array_interface__``."""

    __slots__ = ("__array_interface__", "_view")

    def __init__(self, region: Region, offset: int, nbytes: int) -> None:
        self._view = memoryview(region)  # the export: taken before the address is read
        size = len(self._view)
        if offset + nbytes > size:
            self._view.release()
            raise ValueError(
                f"{nbytes} bytes at offset {offset} do not fit in the region's {size} bytes"
            )
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (region.address + offset, self._view.readonly),
            "version": 3,
        }


def _shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints."""
    if isinstance(shape, int | np.integer):
        dims: tuple[object, ...] = (shape,)
    else:
        try:
            dims = tuple(shape)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"shape must be an int or a tuple of ints, not {type(shape).__name__}"
            ) from None
    result = tuple(_args.integer(n, "shape") for n in dims)
    if any(n < 0 for n in result):
        raise ValueError(f"shape must not have negative dimensions, got {result}")
    return result


def _dtype(dtype: DTypeLike) -> np.dtype[Any]:
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in raw memory")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has no size")
    return dt


def ndarray(region: Region, dtype: DTypeLike, shape: object, offset: int = 0) -> NDArray[Any]:
    """A C-ordered array of ``shape`` and ``dtype`` over ``region``'s bytes at ``offset``.

    ``offset`` must be a multiple of the dtype's alignment and the array must
    fit in ``region.size`` bytes. The array (and every view of it) pins the
    region; a read-only region gives a read-only array; an unreadable one
    raises BufferError.
    """
    dt = _dtype(dtype)
    dims = _shape(shape)
    start = _args.integer(offset, "offset")
    if start < 0:
        raise ValueError(f"offset must not be negative, got {start}")
    if start % dt.alignment:
        raise ValueError(
            f"offset {start} is not a multiple of the alignment {dt.alignment} of dtype {dt}"
        )
    nbytes = math.prod(dims) * dt.itemsize
    pin = _Pin(region, start, nbytes)
    return np.asarray(pin).view(dt).reshape(dims)


@functools.cache
def _allocator(**options: Any) -> MapAlloc:
    from .allocator import MapAlloc

    return MapAlloc(**options)


def empty(
    shape: object, dtype: DTypeLike = float, *, alloc: MapAlloc | None = None, **options: Any
) -> NDArray[Any]:
    """A new array on a region of its own, freed when the last view of it is gone.

    ``options`` are MapAlloc's keyword arguments (``huge="thp"``,
    ``huge_pagesize=``, ``write=False``, ``commit=True`` ...); or pass an
    allocator as ``alloc``. Fresh pages read as zero, so this is zeros() too.
    """
    dt = _dtype(dtype)
    dims = _shape(shape)
    if alloc is None:
        alloc = _allocator(**options)
    elif options:
        raise TypeError("pass either alloc or allocator options, not both")
    region = alloc.alloc(max(math.prod(dims) * dt.itemsize, 1))
    try:
        return ndarray(region, dt, dims)
    except BaseException:
        region.close()
        raise


def zeros(
    shape: object, dtype: DTypeLike = float, *, alloc: MapAlloc | None = None, **options: Any
) -> NDArray[Any]:
    """A new zero-filled array on a region of its own (see empty())."""
    return empty(shape, dtype, alloc=alloc, **options)


def region_of(array: NDArray[Any]) -> Region | None:
    """The region under ``array`` (or a view of one made here), else None."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, _Pin):
        region: Region = base._view.obj  # type: ignore[assignment]
        return region
    return None
