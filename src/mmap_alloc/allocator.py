"""MapAlloc: an allocator that takes every allocation straight from the kernel."""

from __future__ import annotations

import contextlib
import errno
from typing import NamedTuple

from . import _args, _mman, protection
from ._platform import PAGE_SIZE, alloc_error, effective_perms, format_size, hugepage_pools
from .exceptions import CannotReallocInPlace
from .perm import Perm
from .region import Region

_MAP_POPULATE: int = getattr(_mman, "MAP_POPULATE", 0)
_MAYMOVE = _mman.MREMAP_MAYMOVE
_DONTNEED = _mman.MADV_DONTNEED
_POPULATE_READ: int | None = getattr(_mman, "MADV_POPULATE_READ", None)
_POPULATE_WRITE: int | None = getattr(_mman, "MADV_POPULATE_WRITE", None)
_READ = int(Perm.READ)
_WRITE = int(Perm.WRITE)
_RW = _READ | _WRITE


class Layout(NamedTuple):
    """Size and alignment of the objects alloc_obj() hands out."""

    size: int
    align: int


class MapAlloc:
    """An allocator whose every allocation is its own memory mapping.

    Sizes round up to whole pages; fresh memory reads as zero; permissions,
    commit (prefaulting) and the page size are fixed when it is made. The
    regions it returns stay owned by it: give them back with dealloc() (or
    close them; a region that is garbage-collected is unmapped too).
    """

    __slots__ = (
        "__weakref__",
        "_commit",
        "_flags",
        "_huge",
        "_mask",
        "_max_size",
        "_obj_layout",
        "_page",
        "_perms",
        "_prot",
        "_requested",
    )

    def __init__(
        self,
        read: bool = True,
        write: bool = True,
        exec: bool = False,
        commit: bool = False,
        obj_size: int | None = None,
        obj_align: int | None = None,
        huge_pagesize: int | None = None,
    ) -> None:
        for name, flag in (("read", read), ("write", write), ("exec", exec), ("commit", commit)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        flags = _MAP_POPULATE if commit else 0
        if huge_pagesize is None:
            page = PAGE_SIZE
        else:
            page = _args.integer(huge_pagesize, "huge_pagesize")
            supported = [pool.size for pool in hugepage_pools()]
            if page not in supported:
                names = ", ".join(format_size(size) for size in supported) or "none"
                raise ValueError(
                    f"huge_pagesize={page} is not a huge page size of this machine "
                    f"(supported: {names})"
                )
            flags |= _mman.MAP_HUGETLB | (page.bit_length() - 1) << _mman.MAP_HUGE_SHIFT
        align = page if obj_align is None else _args.power_of_two(obj_align, "obj_align")
        size = page if obj_size is None else _args.size(obj_size, page, "obj_size")
        if size % page:
            raise ValueError(f"obj_size={size} must be a multiple of the page size {page}")
        if size % align:
            raise ValueError(f"obj_size={size} must be a multiple of obj_align={align}")

        self._page = page
        self._mask = page - 1
        self._max_size = _args.MAX_SIZE + 1 - page
        self._requested = Perm.of(read=read, write=write, exec=exec)
        self._perms = effective_perms(self._requested)
        self._prot = int(self._perms)
        self._flags = flags
        self._commit = commit
        self._huge = huge_pagesize if huge_pagesize is None else page
        self._obj_layout = Layout(size, align)

    # ------------------------------------------------------------ properties

    @property
    def page_size(self) -> int:
        """The page size allocations are made of (the huge page size if set)."""
        return self._page

    @property
    def requested_perms(self) -> Perm:
        """The permissions asked for."""
        return self._requested

    @property
    def perms(self) -> Perm:
        """The permissions in force on this platform: never more restrictive."""
        return self._perms

    @property
    def commits(self) -> bool:
        """Whether alloc() returns committed (prefaulted) memory."""
        return self._commit

    @property
    def huge_pagesize(self) -> int | None:
        """The hugetlb page size, or None for normal pages."""
        return self._huge

    @property
    def obj_layout(self) -> Layout:
        """The layout of objects from alloc_obj()."""
        return self._obj_layout

    def __repr__(self) -> str:
        huge = f" huge_pagesize={self._huge}" if self._huge else ""
        return f"<MapAlloc {self._perms} commit={self._commit} page_size={self._page}{huge}>"

    # ------------------------------------------------------------ allocation

    def alloc(self, size: int, align: int | None = None) -> Region:
        """A new region of at least ``size`` bytes, zero-filled, page-aligned
        (or aligned to ``align``, a power of two)."""
        if type(size) is not int or not 0 < size <= self._max_size:
            size = _args.size(size, self._page)
        capacity = (size + self._mask) & ~self._mask
        if align is not None:
            return self._alloc_aligned(size, capacity, align)
        try:
            return Region._map(size, capacity, self._prot, self._flags, self)
        except OSError as exc:
            raise alloc_error(exc, size, self._huge) from None

    def alloc_zeroed(self, size: int, align: int | None = None) -> Region:
        """As alloc(): fresh pages from the kernel are zero-filled already."""
        return self.alloc(size, align)

    def alloc_excess(self, size: int, align: int | None = None) -> Region:
        """As alloc(), with the region's size the whole capacity."""
        size = _args.size(size, self._page)
        return self.alloc((size + self._mask) & ~self._mask, align)

    def _alloc_aligned(self, size: int, capacity: int, align: object) -> Region:
        alignment = _args.power_of_two(align, "align")
        if alignment <= self._page:
            return self.alloc(size)
        span = capacity + alignment - self._page
        if span > self._max_size:
            raise alloc_error(OSError(errno.ENOMEM, "too large"), size, self._huge)
        try:
            address = _mman.mmap(span, self._prot, self._flags & ~_MAP_POPULATE)
        except OSError as exc:
            raise alloc_error(exc, size, self._huge) from None
        front = -address & (alignment - 1)
        back = span - front - capacity
        try:
            if front:
                _mman.munmap(address, front)
        except OSError as exc:
            _release(address, span)
            raise alloc_error(exc, size, self._huge) from None
        try:
            if back:
                _mman.munmap(address + front + capacity, back)
            region = Region._adopt(address + front, size, capacity, self._prot, self)
        except BaseException as exc:
            _release(address + front, span - front)
            if isinstance(exc, OSError):
                raise alloc_error(exc, size, self._huge) from None
            raise
        if self._commit and self._prot & _READ:
            self._populate(region, 0, capacity)
        return region

    def dealloc(self, region: Region) -> None:
        """Unmap the region. BufferError while a buffer of it is exported."""
        self._owned(region)
        if region.closed:
            raise ValueError("region was already freed")
        region.close()

    # ------------------------------------------------------------ resizing

    def realloc(self, region: Region, new_size: int) -> Region:
        """Resize the region, keeping its contents; it may move.

        Returns the region (the same object, at its new address). A size that
        needs the same pages makes no system call. While a buffer is exported
        only sizes within the current capacity are allowed.
        """
        self._open(region)
        if type(new_size) is not int or not 0 < new_size <= self._max_size:
            new_size = _args.size(new_size, self._page, "new_size")
        capacity = (new_size + self._mask) & ~self._mask
        old_size, old_capacity = region.size, region.capacity
        if capacity == old_capacity or (capacity < old_capacity and region._exports):
            if new_size > old_size:
                self._zero(region, old_size, new_size)
            region._resize(new_size, old_capacity, 0)
            return region
        with protection.lock:  # the pages and their protections change
            if capacity > old_capacity:
                if region._exports:
                    raise BufferError(
                        f"cannot move the region: it has {region._exports} exported buffer(s) "
                        f"and {new_size} bytes do not fit in its capacity {old_capacity}"
                    )
                self._zero(region, old_size, old_capacity)
            try:
                region._resize(new_size, capacity, _MAYMOVE)
            except OSError as exc:
                if exc.errno not in (errno.EFAULT, errno.EINVAL):
                    raise alloc_error(exc, new_size, self._huge) from None
                # The mapping spans several kernel mappings (mixed protections) or
                # cannot be remapped (hugetlb): copy it instead.
                self._move_by_copy(region, new_size, capacity)
            else:
                if capacity < old_capacity and region._mixed:
                    _settle(region)
        return region

    def grow_in_place(self, region: Region, new_size: int) -> None:
        """Grow the region without moving it; CannotReallocInPlace when the
        pages after it are taken. Allowed while buffers are exported."""
        self._open(region)
        size = _args.size(new_size, self._page, "new_size")
        old_size, old_capacity = region.size, region.capacity
        if size < old_size:
            raise ValueError(f"new_size={size} is smaller than the region's size {old_size}")
        capacity = max((size + self._mask) & ~self._mask, old_capacity)
        with protection.lock:  # new pages take the protection of the last one
            self._zero(region, old_size, min(size, old_capacity))
            try:
                region._resize(size, capacity, 0)
            except OSError as exc:
                raise CannotReallocInPlace(
                    f"cannot grow the region at 0x{region.address:x} from {old_capacity} to "
                    f"{capacity} bytes in place: {exc.strerror}"
                ) from exc

    def shrink_in_place(self, region: Region, new_size: int) -> None:
        """Shrink the region without moving it, unmapping the pages it no longer needs."""
        self._open(region)
        size = _args.size(new_size, self._page, "new_size")
        if size > region.size:
            raise ValueError(f"new_size={size} is larger than the region's size {region.size}")
        if region._exports:
            raise BufferError(
                f"cannot shrink the region: it has {region._exports} exported buffer(s)"
            )
        capacity = (size + self._mask) & ~self._mask
        with protection.lock:
            try:
                region._resize(size, capacity, 0)
            except OSError as exc:
                raise CannotReallocInPlace(
                    f"cannot shrink the region in place: {exc.strerror}"
                ) from exc
            if region._mixed:
                _settle(region)

    def usable_size(self, size: int, align: int | None = None) -> tuple[int, int]:
        """The range of sizes whose allocation gets the same pages as ``size``:
        (rounded - page + 1, rounded)."""
        n = _args.size(size, self._page)
        if align is not None:
            _args.power_of_two(align, "align")
        rounded = (n + self._mask) & ~self._mask
        return rounded - self._page + 1, rounded

    # ------------------------------------------------------------ commit

    def commit(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Fault in (commit) pages of the region now rather than on first touch."""
        self._open(region)
        start, n = _args.page_range(offset, length, region.capacity, self._page)
        if n:
            self._populate(region, start, n)

    def uncommit(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Give pages of the region back to the kernel; they read as zero afterwards."""
        self._open(region)
        start, n = _args.page_range(offset, length, region.capacity, self._page)
        if n:
            region._advise(start, n, _DONTNEED)

    def reserve(self, size: int, align: int | None = None) -> Region:
        """Address space only: a region of ``size`` bytes with Perm.NONE,
        nothing counted against RAM or the commit limit. Make pieces usable
        with ``region.protect()``; release them with uncommit() +
        ``protect(Perm.NONE)``. Normal-page allocators only."""
        return protection.reserve(self, size, align)

    # ------------------------------------------------------------ objects

    def alloc_obj(self) -> Region:
        """A region of the object layout (obj_size bytes aligned to obj_align)."""
        size, align = self._obj_layout
        return self.alloc(size, align)

    def dealloc_obj(self, region: Region) -> None:
        """Free a region from alloc_obj()."""
        self._owned(region)
        if region.size != self._obj_layout.size:
            raise ValueError(
                f"region of {region.size} bytes is not an object of {self._obj_layout.size} bytes"
            )
        self.dealloc(region)

    # ------------------------------------------------------------ helpers

    def _owned(self, region: Region) -> None:
        try:
            owner = region._owner
        except AttributeError:
            raise TypeError(f"expected a Region, not {type(region).__name__}") from None
        if owner is not self:
            raise ValueError("region was allocated by another allocator")

    def _open(self, region: Region) -> None:
        self._owned(region)
        if region.closed:
            raise ValueError("region is closed")

    def _zero(self, region: Region, start: int, end: int) -> None:
        """Zero bytes [start, end): whole pages are given back to the kernel."""
        if start >= end:
            return
        page = self._page
        full_start = -(-start // page) * page
        full_end = end // page * page
        with protection.lock:  # the protections read here must hold until the bytes are zero
            if full_start >= full_end:  # no whole page: the ends of one or two pages
                for lo, hi in ((start, min(end, full_start)), (max(start, full_start), end)):
                    if lo < hi:
                        region._zero(lo, hi - lo, _prot_at(region, lo))
                return
            if start < full_start:
                region._zero(start, full_start - start, _prot_at(region, start))
            region._advise(full_start, full_end - full_start, _DONTNEED)
            if full_end < end:
                region._zero(full_end, end - full_end, _prot_at(region, full_end))

    def _populate(self, region: Region, start: int, length: int) -> None:
        """Prefault [start, start + length) for reading or, if allowed, writing."""
        with protection.lock:
            self._populate_locked(region, start, length)

    def _populate_locked(self, region: Region, start: int, length: int) -> None:
        if region._mixed:
            readable = False
            for offset, run, perms in region.protections():
                lo, hi = max(offset, start), min(offset + run, start + length)
                if lo < hi and perms & _READ:
                    self._populate_run(region, lo, hi - lo, int(perms))
                    readable = True
            if not readable:
                raise ValueError("cannot commit pages that are not readable; protect() them first")
            return
        prot = region._prot
        if not prot & _READ:
            raise ValueError("cannot commit pages that are not readable; protect() them first")
        self._populate_run(region, start, length, prot)

    def _populate_run(self, region: Region, start: int, length: int, prot: int) -> None:
        advice = _POPULATE_WRITE if prot & _WRITE else _POPULATE_READ
        if advice is None:  # kernel headers older than 5.14: a hint only
            region._advise(start, length, _mman.MADV_WILLNEED)
            return
        try:
            region._advise(start, length, advice)
        except OSError as exc:
            raise alloc_error(exc, length, self._huge) from None

    def _move_by_copy(self, region: Region, size: int, capacity: int) -> None:
        """Resize by copying into a new mapping, for mappings mremap cannot move."""
        runs = _clip_runs(region.protections(), capacity)
        try:
            target = Region._map(size, capacity, _RW, self._flags & ~_MAP_POPULATE, self)
        except OSError as exc:
            raise alloc_error(exc, size, self._huge) from None
        try:
            unreadable = [run for run in runs if not run[2] & _READ and run[0] < region.capacity]
            for offset, n, perms in unreadable:
                _mman.mprotect(
                    region.address + offset, min(n, region.capacity - offset), perms | _READ
                )
            try:
                target._copy_from(region, min(region.size, size))
            finally:
                for offset, n, perms in unreadable:
                    _mman.mprotect(region.address + offset, min(n, region.capacity - offset), perms)
            common = _RW | int(Perm.EXEC)
            for offset, n, perms in runs:
                _mman.mprotect(target.address + offset, n, perms)
                common &= perms
            target._protect(0, 0, 0, common, int(len(runs) > 1))
            region._swap(target)
        except OSError as exc:  # e.g. ENOMEM at vm.max_map_count: the region is as it was
            raise alloc_error(exc, size, self._huge) from None
        finally:
            # After the swap this unmaps the old pages; should the kernel refuse
            # (map count), they are given back when ``target`` is collected.
            with contextlib.suppress(OSError):
                target.close()


def _clip_runs(runs: list[tuple[int, int, Perm]], capacity: int) -> list[tuple[int, int, int]]:
    """Protection runs cut or stretched to ``capacity`` bytes; growth takes the
    last run's protection, as the kernel gives it to grown mappings."""
    clipped = [
        (offset, min(n, capacity - offset), int(perms))
        for offset, n, perms in runs
        if offset < capacity
    ]
    offset, _n, perms = clipped[-1]
    clipped[-1] = (offset, capacity - offset, perms)
    return clipped


def _settle(region: Region) -> None:
    """Recount the protection the pages share after a shrink of a mixed region
    (the pages left may all be alike again)."""
    runs = region.protections()
    common = _RW | int(Perm.EXEC)
    for _offset, _n, perms in runs:
        common &= perms
    region._protect(0, 0, 0, common, int(len(runs) > 1))


def _prot_at(region: Region, offset: int) -> int:
    """The protection of the page at ``offset``."""
    if not region._mixed:
        return int(region._prot)
    for start, n, perms in region.protections():
        if start <= offset < start + n:
            return int(perms)
    return int(region._prot)


def _release(address: int, length: int) -> None:
    """Unmap, or at least give the memory back when the kernel refuses to unmap."""
    try:
        _mman.munmap(address, length)
    except OSError:
        with contextlib.suppress(OSError):
            _mman.madvise(address, length, _DONTNEED)
