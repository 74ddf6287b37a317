"""ObjectPool: fixed-size objects carved from slabs of mapped memory.

The fast path (alloc, free and their batch forms, ``in``, ``len``) is the C
type ``_mman.Pool``, which keeps one free bit per object in C memory and runs
under the GIL. This module holds the policy: the layout, how big a slab is,
how many empty slabs stay, and how a slab goes back to the kernel.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from dataclasses import dataclass
from types import TracebackType

from . import _args, _mman
from ._platform import PAGE_SIZE
from .allocator import MapAlloc
from .region import Region

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
_READ = _mman.PROT_READ


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


class ObjectPool(_mman.Pool):
    """A pool of fixed-size objects with stable addresses, carved from slabs.

    ``ObjectPool(obj_size, align=16, alloc=MapAlloc(), slab_size=None)``: each
    object is ``obj_size`` bytes at a multiple of ``align`` (a power of two no
    larger than the page size), placed at a stride of ``obj_size`` rounded up
    to ``align``. Slabs are regions of ``alloc``, so its permissions, commit
    and huge page settings apply to them; a slab is ``slab_size`` bytes
    (whole pages; by default 1 MiB or 64 objects, whichever is larger, and
    fewer objects when 64 would take more than 64 MiB).

    ``alloc()`` returns an object's address (an int, for ctypes or cffi),
    ``free(address)`` gives it back. Double frees, foreign addresses, and
    addresses inside an object but not at its start raise ValueError and
    change nothing; so does any use after ``close()``. ``view(address)`` is a
    memoryview of one object that keeps its slab mapped while it lives.

    Empty slabs go back to the kernel: one stays as it is, ``KEEP_SPARE`` more
    stay mapped but uncommitted, the rest are unmapped. Safe to use from
    several threads (the fast path runs under the GIL) and in a child
    process after fork.
    """

    __slots__ = (
        "__weakref__",
        "_align",
        "_allocator",
        "_lock",
        "_obj_size",
        "_slab_size",
        "_spares",
        "_stride",
    )

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
        size = _args.size(obj_size, page, "obj_size")
        alignment = DEFAULT_ALIGN if align is None else _args.power_of_two(align, "align")
        if alignment > page:
            raise ValueError(f"align={alignment} exceeds the page size {page}")
        stride = -(-size // alignment) * alignment
        if slab_size is None:
            per_slab = min(max(MAX_DEFAULT_SLAB_SIZE // stride, 1), OBJECTS_PER_SLAB)
            slab = max(MIN_SLAB_SIZE, per_slab * stride)
        else:
            slab = _args.size(slab_size, page, "slab_size")
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
        self._configure(size, stride, per_slab, KEEP_EMPTY)  # RuntimeError on a second __init__
        self._allocator = alloc
        self._obj_size = size
        self._align = alignment
        self._stride = stride
        self._slab_size = slab
        self._spares: list[Region] = []
        self._lock = threading.RLock()
        _POOLS.add(self)

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
    # alloc, alloc_zeroed, free, alloc_many, free_many, `in` and len() are
    # the C base type's methods, called directly.

    def view(self, address: int) -> memoryview:
        """A memoryview of the live object at ``address`` (obj_size bytes).

        While it lives, its slab stays mapped (the pool cannot be closed);
        release it (``with pool.view(a) as v:``) when done. Read-only for
        memory without WRITE; BufferError for memory without READ.
        """
        region, offset = self._locate(address)
        whole = memoryview(region)
        try:
            return whole[offset : offset + self._obj_size]
        finally:
            whole.release()

    def stats(self) -> PoolStats:
        """Live objects, slabs, bytes mapped and resident, bookkeeping bytes."""
        with self._lock:  # no slab is unmapped meanwhile
            slabs = self._slabs() + self._spares
            live, free = len(self), self._free
            return PoolStats(
                live=live,
                capacity=live + free,
                slabs=len(slabs),
                mapped=sum(region.capacity for region in slabs if not region.closed),
                resident=sum(_resident(region) for region in slabs),
                metadata=self._metadata,
            )

    def close(self) -> None:
        """Unmap every slab; the addresses handed out become invalid.

        BufferError (nothing changed) while a view() of an object lives.
        Closing a closed pool does nothing.
        """
        with self._lock:
            if self.closed:
                return
            regions = self._detach_all() + self._spares
            self._spares = []
        for region in regions:
            _discard(region)

    def __enter__(self) -> ObjectPool:
        if self.closed:
            raise ValueError("pool is closed")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return f"<ObjectPool closed obj_size={self._obj_size}>"
        return (
            f"<ObjectPool obj_size={self._obj_size} stride={self._stride} "
            f"slab_size={self._slab_size} live={len(self)}>"
        )

    # ------------------------------------------------------------ slow paths
    # Called by the C layer: _grow when no slab has a free object, _release
    # when more than KEEP_EMPTY slabs are empty.

    def _grow(self) -> None:
        """Attach a slab: a spare one, or a new mapping."""
        with self._lock:
            if self.closed:
                raise ValueError("pool is closed")
            if self._free:  # another thread grew the pool meanwhile
                return
            alloc = self._allocator
            if self._spares:
                region = self._spares.pop()
                if alloc.commits and region._prot & _READ:
                    try:
                        alloc.commit(region)
                    except BaseException:
                        self._spares.append(region)
                        raise
            else:
                region = alloc.alloc(self._slab_size)
            try:
                self._attach(region, True)
            except BaseException:
                _discard(region)
                raise

    def _release(self) -> None:
        """Give empty slabs past KEEP_EMPTY back: uncommit up to KEEP_SPARE of
        them and keep them mapped, unmap the rest."""
        with self._lock:
            while (region := self._detach_empty()) is not None:
                if len(self._spares) < KEEP_SPARE:
                    try:
                        self._allocator.uncommit(region)
                    except OSError:
                        pass
                    else:
                        self._spares.append(region)
                        continue
                try:
                    region.close()
                except (OSError, BufferError):
                    # The kernel would not unmap it (vm.max_map_count) or a
                    # stray buffer pins it: keep it for reuse.
                    self._spares.append(region)


ObjectPool._specialize()


def _resident(region: Region) -> int:
    """Bytes of the region in physical memory."""
    if region.closed:
        return 0
    pages = region._mincore(0, region.capacity)
    return pages.translate(_LOW_BIT).count(1) * PAGE_SIZE


_LOW_BIT = bytes(b & 1 for b in range(256))


def _discard(region: Region) -> None:
    """Unmap a slab; one the kernel keeps is unmapped (or at least given back)
    when its last reference goes."""
    with contextlib.suppress(OSError, BufferError):
        region.close()


# ---------------------------------------------------------------- fork

_POOLS: weakref.WeakSet[ObjectPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """Give every pool a fresh lock: one held by a thread at fork time would
    never be released in the child, where that thread does not exist. The C
    state is consistent at any fork (it changes only under the GIL)."""
    for pool in list(_POOLS):
        pool._lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)
