"""numpy arrays of shared memory travel by reference inside multiprocessing.

numpy pickles an array by value: handed to a Pool, a Queue or a
ProcessPoolExecutor, an array of a SharedRegion would arrive as a copy, and
the workers' writes would be lost. Here an array made by ``ndarray()`` on a
region other processes can map (a SharedRegion; a FileRegion shared with its
file) is pickled by multiprocessing as that region (its descriptor travels:
see ``_fdshare``) and where the array lies in it; the receiver maps the
region and makes the same array over it, a plain ``numpy.ndarray``. Views of
such arrays (``a[:n]``, ``a.T``) travel the same way.

Every other array keeps numpy's way (by value), and so do arrays of regions
this process itself received through a pickle: a worker handing an array
back would close the region before the receiver could map it.

Registered with multiprocessing's pickler when the first such array is made
(``SharedRegion.ndarray``, ``FileRegion.ndarray``): until then nothing
changes, and numpy is not imported by the library.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .region import Region

_received: weakref.WeakSet[Region] = weakref.WeakSet()
_registered: list[bool] = []


def received(region: Region) -> None:
    """``region`` came through a pickle: its arrays go back by value."""
    _received.add(region)


def register() -> None:
    """Pickle arrays of shared regions by reference in multiprocessing (once)."""
    if not _registered:
        from multiprocessing import reduction

        import numpy as np

        reduction.register(np.ndarray, _reduce)
        _registered.append(True)


def _root(array: np.ndarray[Any, Any]) -> Any:
    """The object at the end of the array's ``base`` chain."""
    import numpy as np

    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def _reduce(array: np.ndarray[Any, Any]) -> Any:
    from .region import ArrayPin

    pin = _root(array)
    region = pin.region if isinstance(pin, ArrayPin) else None
    if (
        region is None
        or array.size == 0
        or not getattr(region, "_shares_arrays", False)
        or region in _received
        or region.closed
    ):
        return array.__reduce__()
    interface = array.__array_interface__
    data = interface["data"][0]
    strides = array.strides
    low = data + sum((n - 1) * s for n, s in zip(array.shape, strides, strict=True) if s < 0)
    high = data + sum((n - 1) * s for n, s in zip(array.shape, strides, strict=True) if s > 0)
    start = low - region.address
    nbytes = high + array.itemsize - low
    return _rebuild, (
        region,
        start,
        nbytes,
        data - low,
        array.shape,
        strides,
        array.dtype,
        array.flags.writeable,
    )


def _rebuild(
    region: Region,
    start: int,
    nbytes: int,
    first: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: Any,
    writeable: bool,
) -> np.ndarray[Any, Any]:
    """The array over bytes [start, start + nbytes) of ``region``, its first
    element ``first`` bytes in."""
    import numpy as np

    from .region import ArrayPin

    memory = np.asarray(ArrayPin(region, start, nbytes))
    array: np.ndarray[Any, Any] = np.ndarray(
        shape, dtype, buffer=memory, offset=first, strides=strides
    )
    if not writeable:
        array.flags.writeable = False
    return array
