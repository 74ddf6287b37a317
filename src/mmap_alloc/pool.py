"""ObjectPool: fixed-size objects carved from slabs of mapped memory.

The C type ``_mman.Pool`` owns the slabs (it takes the pages of fresh
regions from the pool's allocator and no Python object can reach them
afterwards), their free bitmaps, the views of objects, and the release of
empty slabs. This module holds the policy: the layout, how big a slab is,
and how many empty slabs stay.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ._args import power_of_two
from ._args import size as size_argument
from ._mman import Pool
from .allocator import MapAlloc
from .closing import ClosesOnExit
from .stats import resident_while_mapped

DEFAULT_ALIGN = 16
"""Object alignment when none is given: what malloc guarantees on 64-bit."""

MIN_SLAB_SIZE = 1 << 20
"""Slabs are at least this big (or one page of the allocator, if larger)."""

OBJECTS_PER_SLAB = 64
"""Default slabs hold this many objects (or fill MIN_SLAB_SIZE), so that the
unused tail of a slab is under 1/64 of it..."""

MAX_DEFAULT_SLAB_SIZE = 64 << 20
"""...unless that makes slabs bigger than this: then as many objects as fit
(at least one), so that pools of large objects do not map gigabytes at once."""

KEEP_EMPTY = 1
"""Empty slabs that stay in the pool as they are, so that a pool which
allocates and frees around a slab boundary makes no system calls."""

KEEP_SPARE = 2
"""Further empty slabs kept mapped but uncommitted, for reuse; the rest are unmapped."""

_MAX_PER_SLAB = (1 << 32) - 65


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of an ObjectPool's memory."""

    live: int
    """Objects handed out and not freed."""
    capacity: int
    """Objects the slabs in use can hold (live ones included)."""
    slabs: int
    """Slabs mapped: those in use and the spare ones kept for reuse."""
    mapped: int
    """Bytes mapped for the slabs."""
    resident: int
    """Bytes of the slabs in physical memory now (mincore)."""
    metadata: int
    """Bytes of the pool's own bookkeeping in C memory (free bitmaps, slab table)."""


class ObjectPool(Pool, ClosesOnExit):
    """A pool of fixed-size objects with stable addresses, carved from slabs.

    ``ObjectPool(obj_size, align=16, alloc=MapAlloc(), slab_size=None)``: each
    object is ``obj_size`` bytes at a multiple of ``align`` (a power of two no
    larger than the page size), placed at a stride of ``obj_size`` rounded up
    to ``align``. Slabs are pages of ``alloc``, so its permissions, commit
    and huge page settings apply to them; a slab is ``slab_size`` bytes
    (whole pages; by default 1 MiB or 64 objects, whichever is larger, and
    fewer objects when 64 would take more than 64 MiB). A region ``alloc``
    returns locked or advised (``region.lock()``, ``region.advise()``) is
    refused with ValueError: an empty slab's pages go back to the kernel.

    ``alloc()`` returns an object's address (an int, for ctypes or cffi),
    ``free(address)`` gives it back. Double frees, foreign addresses, and
    addresses inside an object but not at its start raise ValueError and
    change nothing; so does any use after ``close()``. ``view(address)`` is a
    memoryview of one object that keeps its slab mapped while it lives.

    Empty slabs go back to the kernel: ``KEEP_EMPTY`` stays as it is,
    ``KEEP_SPARE`` more stay mapped but uncommitted, the rest are unmapped.
    Safe to use from several threads (the kernel lock, or the GIL, is its
    lock), from signal handlers and finalizers, and in a child process after
    fork.
    """

    __slots__ = ("_align", "_allocator", "_obj_size", "_slab_size", "_stride")

    _noun = "pool"

    def __init__(
        self,
        obj_size: int,
        *,
        align: int | None = None,
        alloc: MapAlloc | None = None,
        slab_size: int | None = None,
    ) -> None:
        if alloc is None:
            alloc = MapAlloc()
        elif not isinstance(alloc, MapAlloc):
            raise TypeError(f"alloc must be a MapAlloc, not {type(alloc).__name__}")
        page = alloc.page_size
        size = size_argument(obj_size, page, "obj_size")
        alignment = DEFAULT_ALIGN if align is None else power_of_two(align, "align")
        if alignment > page:
            raise ValueError(f"align={alignment} exceeds the page size {page}")
        stride = -(-size // alignment) * alignment
        if slab_size is None:
            per_slab = min(max(MAX_DEFAULT_SLAB_SIZE // stride, 1), OBJECTS_PER_SLAB)
            slab = max(MIN_SLAB_SIZE, per_slab * stride)
        else:
            slab = size_argument(slab_size, page, "slab_size")
            if slab < stride:
                raise ValueError(
                    f"slab_size={slab} cannot hold one object of {size} bytes (stride {stride})"
                )
        slab = -(-slab // page) * page
        per_slab = slab // stride
        if per_slab > _MAX_PER_SLAB:
            raise ValueError(
                f"slab_size={slab} holds {per_slab} objects; at most {_MAX_PER_SLAB} are allowed"
            )
        # RuntimeError on a second __init__: the layout of a pool never changes
        self._configure(
            size,
            stride,
            per_slab,
            KEEP_EMPTY,
            KEEP_SPARE,
            alloc.commits,
            functools.partial(alloc.alloc, slab),
        )
        self._allocator = alloc
        self._obj_size = size
        self._align = alignment
        self._stride = stride
        self._slab_size = slab

    # ------------------------------------------------------------ layout

    @property
    def obj_size(self) -> int:
        """Bytes per object."""
        return self._obj_size

    @property
    def align(self) -> int:
        """Every object's address is a multiple of this."""
        return self._align

    @property
    def stride(self) -> int:
        """Distance between neighbouring objects: obj_size rounded up to align."""
        return self._stride

    @property
    def slab_size(self) -> int:
        """Bytes per slab (whole pages of the allocator)."""
        return self._slab_size

    @property
    def allocator(self) -> MapAlloc:
        """The MapAlloc the slabs come from."""
        return self._allocator

    # ------------------------------------------------------------ objects
    # alloc, alloc_zeroed, free, alloc_many, free_many, view, close, `in`
    # and len() are the C base's.

    def stats(self) -> PoolStats:
        """Live objects, slabs, bytes mapped and resident, bookkeeping bytes."""
        live, free, slabs, spares, mapped, metadata = self._stats()
        spans = self._spans()
        resident = sum(resident_while_mapped(address, length) or 0 for address, length in spans)
        return PoolStats(
            live=live,
            capacity=live + free,
            slabs=slabs + spares,
            mapped=mapped,
            resident=resident,
            metadata=metadata,
        )

    def __repr__(self) -> str:
        if self.closed:
            return f"<ObjectPool closed obj_size={self._obj_size}>"
        return (
            f"<ObjectPool obj_size={self._obj_size} stride={self._stride} "
            f"slab_size={self._slab_size} live={len(self)}>"
        )
