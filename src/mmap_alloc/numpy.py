"""numpy arrays on regions (needs numpy: ``pip install 'mmap-alloc[numpy]'``).

``region.ndarray(dtype, shape)`` views a region's bytes as an array;
``empty()`` and ``zeros()`` make an array on a region of its own, e.g. backed
by huge pages: ``zeros((4096, 4096), huge="thp")``.

Every array pins the bytes under it: a private object at the root of the
array's ``base`` chain holds a view of the region for as long as the array or
any view of it lives, so the region cannot be unmapped, moved or made
unreadable under the array. Arrays from ``empty()``/``zeros()`` own their
region: when the last view is gone, the memory goes back to the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

try:
    import numpy as np
except ImportError as exc:  # pragma: no cover - numpy is an optional extra
    raise ImportError("mmap_alloc.numpy needs numpy: pip install 'mmap-alloc[numpy]'") from exc

from .allocator import MapAlloc
from .region import ArrayPin, Region, array_dtype, array_shape

if TYPE_CHECKING:
    from numpy.typing import DTypeLike, NDArray

__all__ = ["empty", "ndarray", "region_of", "zeros"]


def ndarray(region: Region, dtype: DTypeLike, shape: object, offset: int = 0) -> NDArray[Any]:
    """``region.ndarray(dtype, shape, offset)``: see Region.ndarray."""
    return region.ndarray(dtype, shape, offset)  # type: ignore[arg-type]


@functools.cache
def _allocator(**options: Any) -> MapAlloc:
    return MapAlloc(**options)


def empty(
    shape: object,
    dtype: DTypeLike = float,
    *,
    alloc: MapAlloc | None = None,
    shared: bool = False,
    **options: Any,
) -> NDArray[Any]:
    """A new array on a region of its own, freed when the last view of it is gone.

    ``options`` are MapAlloc's keyword arguments (``huge="thp"``,
    ``huge_pagesize=``, ``write=False``, ``commit=True`` ...); or pass an
    allocator as ``alloc``. Fresh pages read as zero, so this is zeros() too.

    ``shared=True``: the region is a SharedRegion (``options`` are those of
    SharedRegion.create: ``huge=``, ``seal_shrink=``, ``name=``), which other
    processes can map: hand them ``region_of(array)`` and rebuild the array
    there with ``region.ndarray(dtype, shape)``.
    """
    dt = array_dtype(dtype)
    dims = array_shape(shape)
    nbytes = max(math.prod(dims) * dt.itemsize, 1)
    if shared:
        if alloc is not None:
            raise TypeError("a shared array has no allocator: pass alloc or shared=True, not both")
        from .shared import SharedRegion

        region: Region = SharedRegion.create(nbytes, **options)
        return region.ndarray(dt, dims)
    if alloc is None:
        alloc = _allocator(**options)
    elif options:
        raise TypeError("pass either alloc or allocator options, not both")
    region = alloc.alloc(nbytes)
    return region.ndarray(dt, dims)  # if this raises, the region is unmapped when collected


def zeros(
    shape: object,
    dtype: DTypeLike = float,
    *,
    alloc: MapAlloc | None = None,
    shared: bool = False,
    **options: Any,
) -> NDArray[Any]:
    """A new zero-filled array on a region of its own (see empty())."""
    return empty(shape, dtype, alloc=alloc, shared=shared, **options)


def region_of(array: NDArray[Any]) -> Region | None:
    """The region under ``array`` (or a view of one made by a region), else None."""
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, ArrayPin):
        region: Region = base.region
        return region
    return None
