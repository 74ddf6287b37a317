"""MapAlloc: an allocator that takes every allocation straight from the kernel."""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING, NamedTuple, Self, cast

from . import _args, _mman, protection
from ._platform import PAGE_SIZE, alloc_error, effective_perms
from .exceptions import AllocError, CannotReallocInPlace
from .perm import Perm
from .region import Region

if TYPE_CHECKING:
    from .stats import AllocStats

_MAP_POPULATE: int = getattr(_mman, "MAP_POPULATE", 0)
_MAP_HUGETLB: int = getattr(_mman, "MAP_HUGETLB", 0)
_MAP_NORESERVE = _mman.MAP_NORESERVE
_NONE = int(Perm.NONE)
_MAYMOVE = _mman.MREMAP_MAYMOVE
_DONTNEED = _mman.MADV_DONTNEED
_POPULATE_READ: int | None = getattr(_mman, "MADV_POPULATE_READ", None)
_POPULATE_WRITE: int | None = getattr(_mman, "MADV_POPULATE_WRITE", None)
_READ = int(Perm.READ)
_WRITE = int(Perm.WRITE)
_RW = _READ | _WRITE
_NO_ACCESS_TO_COMMIT = (
    "cannot commit pages that are neither readable nor writable; protect() them first"
)


class Layout(NamedTuple):
    """Size and alignment of the objects alloc_obj() hands out."""

    size: int
    align: int


class MapAlloc(_mman.Allocator):
    """An allocator whose every allocation is its own memory mapping.

    Sizes round up to whole pages; fresh memory reads as zero; permissions,
    commit (prefaulting) and the page size are fixed when it is made. The
    regions it returns stay owned by it: give them back with dealloc() (or
    close them; a region that is garbage-collected is unmapped too).

    Huge pages: ``huge_pagesize=n`` maps hugetlb pages of n bytes;
    ``huge="hugetlb" | "thp" | "prefer"`` picks a mode (see mmap_alloc.hugepages).
    The page size is then the huge page size, and ``region.backing`` says
    what each region got.
    """

    __slots__ = (
        "__weakref__",
        "_commit",
        "_huge",
        "_obj_layout",
        "_perms",
        "_requested",
    )

    def __new__(
        cls,
        read: bool = True,
        write: bool = True,
        exec: bool = False,
        commit: bool = False,
        obj_size: int | None = None,
        obj_align: int | None = None,
        huge_pagesize: int | None = None,
        *,
        huge: str | None = None,
    ) -> Self:
        """Huge page modes (``huge=``, ``huge_pagesize=``) make a HugeMapAlloc
        (hugepages.py), so that normal allocators pay nothing for them."""
        if cls is MapAlloc and (huge is not None or huge_pagesize is not None):
            from .hugepages import HugeMapAlloc

            return cast(Self, _mman.Allocator.__new__(HugeMapAlloc))
        return super().__new__(cls)

    def __init__(
        self,
        read: bool = True,
        write: bool = True,
        exec: bool = False,
        commit: bool = False,
        obj_size: int | None = None,
        obj_align: int | None = None,
        huge_pagesize: int | None = None,
        *,
        huge: str | None = None,
    ) -> None:
        for name, flag in (("read", read), ("write", write), ("exec", exec), ("commit", commit)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        page, huge_flags, hugetlb = self._pages(huge, huge_pagesize)
        flags = huge_flags | (_MAP_POPULATE if commit else 0)
        align = page if obj_align is None else _args.power_of_two(obj_align, "obj_align")
        try:
            size = page if obj_size is None else _args.size(obj_size, page, "obj_size")
        except AllocError as exc:  # a configuration error, found at build() as all are
            raise ValueError(str(exc)) from None
        if size % page:
            raise ValueError(f"obj_size={size} must be a multiple of the page size {page}")
        if size % align:
            raise ValueError(f"obj_size={size} must be a multiple of obj_align={align}")

        self._requested = Perm.of(read=read, write=write, exec=exec)
        self._perms = effective_perms(self._requested)
        # alloc() and dealloc() are the C base's: the common case in one call
        self._configure(page, _args.MAX_SIZE + 1 - page, int(self._perms), flags, Region)
        self._commit = commit
        self._huge = hugetlb
        self._obj_layout = Layout(size, align)

    def _pages(self, huge: object, huge_pagesize: object) -> tuple[int, int, int | None]:
        """(page size, mmap flags, hugetlb page size) of the pages to map:
        normal pages here; HugeMapAlloc overrides it."""
        if huge is not None or huge_pagesize is not None:
            raise TypeError(f"{type(self).__name__} cannot use huge pages: use MapAlloc(huge=...)")
        return PAGE_SIZE, 0, None

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
    def huge(self) -> str | None:
        """The huge page mode (hugetlb, thp, prefer), or None for normal pages."""
        return None

    @property
    def obj_layout(self) -> Layout:
        """The layout of objects from alloc_obj()."""
        return self._obj_layout

    def __repr__(self) -> str:
        huge = f" huge_pagesize={self._huge}" if self._huge else ""
        return f"<MapAlloc {self._perms} commit={self._commit} page_size={self._page}{huge}>"

    # ------------------------------------------------------------ allocation

    # alloc(size, align=None) and dealloc(region) are inherited from the C base,
    # which does the common case itself and hands every other to these two.

    def _alloc(self, size: int, align: int | None = None) -> Region:
        """alloc() for what the C fast path does not take: checks, alignment, errors."""
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
        if capacity + alignment - self._page > self._max_size:
            raise alloc_error(OSError(errno.ENOMEM, "too large"), size, self._huge)
        granule = self._page if self._flags & _MAP_HUGETLB else PAGE_SIZE
        flags = self._flags & ~_MAP_POPULATE  # the excess is not to be faulted in
        try:
            region = map_aligned(self, size, capacity, alignment, self._prot, flags, granule)
        except OSError as exc:
            raise alloc_error(exc, size, self._huge) from None
        return self._prefault(region)

    def _prefault(self, region: Region) -> Region:
        """A new region, committed if this allocator commits (closed if that fails)."""
        if self._commit and self._prot & _RW:
            try:
                self._populate(region, 0, region.capacity)
            except BaseException:
                region.close()
                raise
        return region

    def _dealloc(self, region: Region) -> None:
        """dealloc() for what the C fast path does not take: other types."""
        try:
            release = region._release
        except AttributeError:
            raise TypeError(f"expected a Region, not {type(region).__name__}") from None
        release(self)

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
        if self.huge_pagesize is not None:
            raise ValueError(
                "reserve() needs an allocator of normal pages: hugetlb pages cannot be "
                "reserved without taking them from the huge page pool"
            )
        page = self._page
        n = _args.size(size, page)
        capacity = -(-n // page) * page
        alignment = page if align is None else _args.power_of_two(align, "align")
        if capacity + max(alignment - page, 0) > self._max_size:
            raise alloc_error(OSError(errno.ENOMEM, "too large"), n)
        try:
            if alignment <= page:
                return Region._map(n, capacity, _NONE, _MAP_NORESERVE, self)
            return map_aligned(self, n, capacity, alignment, _NONE, _MAP_NORESERVE, PAGE_SIZE)
        except OSError as exc:
            raise alloc_error(exc, n) from None

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
            # Partial pages are zeroed one page at a time: pages may differ in protection.
            head_end = min(end, full_start)
            if start < head_end:
                region._zero(start, head_end - start, _prot_at(region, start))
            if full_start < full_end:
                region._advise(full_start, full_end - full_start, _DONTNEED)
            tail_start = max(full_end, head_end)
            if tail_start < end:
                region._zero(tail_start, end - tail_start, _prot_at(region, tail_start))

    def _populate(self, region: Region, start: int, length: int) -> None:
        """Prefault [start, start + length) for reading or, if allowed, writing."""
        with protection.lock:
            self._populate_locked(region, start, length)

    def _populate_locked(self, region: Region, start: int, length: int) -> None:
        if region._mixed:
            accessible = False
            for offset, run, perms in region.protections():
                lo, hi = max(offset, start), min(offset + run, start + length)
                if lo < hi and perms & _RW:
                    self._populate_run(region, lo, hi - lo, int(perms))
                    accessible = True
            if not accessible:
                raise ValueError(_NO_ACCESS_TO_COMMIT)
            return
        prot = region._prot
        if not prot & _RW:
            raise ValueError(_NO_ACCESS_TO_COMMIT)
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
        target = self._map_like(region, size, capacity)
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

    def _map_like(self, region: Region, size: int, capacity: int) -> Region:
        """A new writable mapping backed like ``region``, for _move_by_copy."""
        try:
            return Region._map(size, capacity, _RW, self._flags & ~_MAP_POPULATE, self)
        except OSError as exc:
            raise alloc_error(exc, size, self._huge) from None

    # ------------------------------------------------------------ statistics

    def stats(self) -> AllocStats:
        """Live regions, bytes mapped and bytes resident, measured now.

        Costs nothing per allocation: the live regions are found through the
        garbage collector (time proportional to the objects in the process).
        """
        from .stats import alloc_stats

        return alloc_stats(self)


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
    """The protection of the page at ``offset``; -1, for the C layer to read it
    when it acts, if the region is uniform (the C fast path of protect() may
    change it at any moment without the lock)."""
    if not region._mixed:
        return -1
    for start, n, perms in region.protections():
        if start <= offset < start + n:
            return int(perms)
    return int(region._prot)


def map_aligned(
    owner: MapAlloc,
    size: int,
    capacity: int,
    alignment: int,
    prot: int,
    flags: int,
    granule: int = PAGE_SIZE,
) -> Region:
    """A new region of ``capacity`` bytes at a multiple of ``alignment``.

    ``granule`` is the alignment the kernel guarantees for such a mapping (the
    huge page size for hugetlb). Recent kernels align mappings of whole huge
    pages already, so a capacity that is a multiple of the alignment is first
    mapped as it is; otherwise ``alignment - granule`` bytes more are mapped
    and the excess on both sides unmapped. Raises OSError, leaving nothing
    mapped.
    """
    if capacity % alignment == 0:
        region = Region._map(size, capacity, prot, flags, owner)
        if not region.address & (alignment - 1):
            return region
        region.close()
    span = capacity + alignment - granule
    address = _mman.mmap(span, prot, flags)
    front = -address & (alignment - 1)
    back = span - front - capacity
    try:
        if front:
            _mman.munmap(address, front)
    except BaseException:
        _release(address, span)
        raise
    try:
        if back:
            _mman.munmap(address + front + capacity, back)
        return Region._adopt(address + front, size, capacity, prot, owner)
    except BaseException:
        _release(address + front, span - front)
        raise


def _release(address: int, length: int) -> None:
    """Unmap, or at least give the memory back when the kernel refuses to unmap."""
    try:
        _mman.munmap(address, length)
    except OSError:
        with contextlib.suppress(OSError):
            _mman.madvise(address, length, _DONTNEED)
