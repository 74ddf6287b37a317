"""MapAlloc: an allocator that takes every allocation straight from the kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from ._args import MAX_SIZE, integer, power_of_two
from ._args import size as size_argument
from ._linux import MADV_DONTNEED, MAP_NORESERVE, PAGE_SIZE, PROT_NONE, alloc_error
from ._mman import Allocator
from ._mman import Region as KernelRegion
from ._near import DEFAULT_WITHIN, check_near, map_near
from .backings import Backing, HugePages, PageSource, select
from .exceptions import CLOSED
from .perm import Perm, effective_perms
from .region import Region
from .stats import AllocStats, CacheStats, alloc_stats

R = TypeVar("R", bound=KernelRegion)

MAX_CACHE = 1 << 20
"""The most mappings ``MapAlloc(cache=...)`` keeps per class."""


class Layout(NamedTuple):
    """Size and alignment of the objects alloc_obj() hands out."""

    size: int
    """Bytes per object: a multiple of the page size."""
    align: int
    """The alignment of every object's address: a power of two."""


def _alloc_slow(
    alloc: MapAlloc,
    size: object,
    align: object = None,
    *,
    near: object = None,
    within: object = DEFAULT_WITHIN,
) -> KernelRegion:
    """alloc() for what the C fast path does not take: argument checks,
    alignment, placement near an address, and the error a refusal becomes."""
    page = alloc._page
    n = size_argument(size, page)
    capacity = (n + page - 1) & -page
    alignment = page if align is None else max(page, power_of_two(align, "align"))
    map_at = functools.partial(alloc._map, n, capacity, alignment)
    translate = alloc._pages.alloc_error
    return _place(alloc, map_at, n, capacity, alignment, near, within, "a region", translate)


_alloc_slow.__qualname__ = "MapAlloc.alloc"  # what argument errors name


def _place(
    alloc: MapAlloc,
    map_at: Callable[[int | None], R],
    n: int,
    capacity: int,
    alignment: int,
    near: object,
    within: object,
    what: str,
    translate: Callable[[OSError, int], Exception],
) -> R:
    """``map_at(address)`` at the nearest place that fits when ``near`` is
    given, else ``map_at(None)`` where the kernel chooses (refused first when
    ``capacity`` aligned could never fit); a refusal of ``n`` bytes becomes
    ``translate``'s exception. ``what`` names the mapping in placement errors."""
    if near is not None or within != DEFAULT_WITHIN:
        address, reach = check_near(near, within)
        return map_near(address, reach, capacity, alignment, map_at, what, translate)
    if capacity + alignment - alloc._page > alloc._max_size:
        raise translate(OSError(12, "too large"), n)
    try:
        return map_at(None)
    except OSError as exc:
        raise translate(exc, n) from None


class MapAlloc(Allocator):
    """An allocator whose every allocation is its own memory mapping.

    Sizes round up to whole pages; fresh memory reads as zero; permissions,
    commit (prefaulting) and the backing are fixed when it is made. The
    regions it returns stay owned by it: give them back with dealloc() (or
    close them; a region that is garbage-collected is unmapped too).

    Huge pages: ``huge_pagesize=n`` maps hugetlb pages of n bytes;
    ``huge="hugetlb" | "thp" | "prefer"`` picks a mode (see
    mmap_alloc.backings). The page size is then the huge page size, and
    ``region.backing`` says what each region got. By default (``huge=None``)
    pages are the base pages, and regions of 4 MiB and more are aligned and
    advised for transparent huge pages, as numpy does for its arrays
    (``backing`` says ``Backing.THP``); ``huge="normal"`` never advises.

    ``cache=n`` keeps up to n freed mappings of each class (capacity,
    alignment, backing) for the next allocation of that class instead of
    unmapping them: dealloc() and alloc() then cost a fraction of a system
    call pair. A reused mapping is as a fresh one would be (zeros, the
    allocator's protection, committed if it commits), but its address is
    the one a freed region had: see docs/allocator.md before using it.
    """

    __slots__ = ("__weakref__", "_commit", "_obj_layout", "_pages", "_perms", "_requested")

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
        cache: int = 0,
    ) -> None:
        for name, flag in (("read", read), ("write", write), ("exec", exec), ("commit", commit)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        kept = integer(cache, "cache")
        if not 0 <= kept <= MAX_CACHE:
            raise ValueError(f"cache must be between 0 (off) and {MAX_CACHE}, got {kept}")
        pages = select(huge, huge_pagesize)
        page = pages.page
        align = page if obj_align is None else power_of_two(obj_align, "obj_align")
        try:
            size = page if obj_size is None else size_argument(obj_size, page, "obj_size")
        except MemoryError as exc:  # a configuration error, found at build() as all are
            raise ValueError(str(exc)) from None
        if size % page:
            raise ValueError(f"obj_size={size} must be a multiple of the page size {page}")
        if size % align:
            raise ValueError(f"obj_size={size} must be a multiple of obj_align={align}")
        self._requested = Perm.of(read=read, write=write, exec=exec)
        self._perms = effective_perms(self._requested)
        self._pages = pages
        self._commit = commit
        self._obj_layout = Layout(size, align)
        attempts = tuple(attempt.spec() for attempt in pages.attempts)
        self._configure(
            page,
            MAX_SIZE + 1 - page,
            int(self._perms),
            commit,
            attempts,
            Region,
            _alloc_slow,
            kept,
        )

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
    def huge(self) -> HugePages | None:
        """The huge page mode (normal, hugetlb, thp, prefer); None for the
        default (base pages, THP advice for regions of 4 MiB and more)."""
        return self._pages.mode

    @property
    def huge_pagesize(self) -> int | None:
        """The hugetlb page size used (or, with ``prefer``, tried first); None for none."""
        return self._pages.hugetlb

    @property
    def pages(self) -> PageSource:
        """Where the pages come from: page size and mappings tried, best first."""
        return self._pages

    @property
    def cache(self) -> int:
        """Freed mappings kept per class for reuse (0: none, every dealloc unmaps)."""
        return self._cache

    @property
    def obj_layout(self) -> Layout:
        """The layout of objects from alloc_obj()."""
        return self._obj_layout

    def __repr__(self) -> str:
        mode = self._pages.mode
        huge = f" huge={mode!s}" if mode is not None else ""
        hugetlb = f" huge_pagesize={self._pages.hugetlb}" if self._pages.hugetlb else ""
        cache = f" cache={self._cache}" if self._cache else ""
        return (
            f"<MapAlloc {self._perms} commit={self._commit}{huge} page_size={self._page}"
            f"{hugetlb}{cache}>"
        )

    # ------------------------------------------------------------ allocation
    # alloc(size, align=None), dealloc(region) and trim() are the C base's.

    if TYPE_CHECKING:

        def alloc(
            self,
            size: int,
            align: int | None = None,
            *,
            near: int | None = None,
            within: int = DEFAULT_WITHIN,
        ) -> Region:
            """A new region of at least ``size`` bytes (whole pages), zero-filled,
            page-aligned (or aligned to ``align``, a power of two).

            With ``near``: every byte of the region lies less than ``within``
            bytes from ``near`` (default 2 GiB: the reach of x86-64 ``call
            rel32``), or AllocError. An existing mapping is never replaced. The
            region keeps its address; realloc() may move it out of reach
            (grow_in_place() never moves it).
            """

    def alloc_zeroed(self, size: int, align: int | None = None) -> Region:
        """As alloc(): fresh pages from the kernel are zero-filled already."""
        return self.alloc(size, align)

    def alloc_excess(self, size: int, align: int | None = None) -> Region:
        """As alloc(), with the region's size the whole capacity."""
        n = size_argument(size, self._page)
        return self.alloc((n + self._mask) & ~self._mask, align)

    def usable_size(self, size: int, align: int | None = None) -> tuple[int, int]:
        """The range of sizes whose allocation gets the same pages as ``size``:
        (rounded - page + 1, rounded)."""
        n = size_argument(size, self._page)
        if align is not None:
            power_of_two(align, "align")
        rounded = (n + self._mask) & ~self._mask
        return rounded - self._page + 1, rounded

    def reserve(
        self,
        size: int,
        align: int | None = None,
        *,
        near: int | None = None,
        within: int = DEFAULT_WITHIN,
    ) -> Region:
        """Address space only: a region of ``size`` bytes with Perm.NONE,
        nothing counted against RAM or the commit limit. Make pieces usable
        with ``region.protect()``; release them with uncommit() +
        ``protect(Perm.NONE)``. Normal-page allocators only.

        With ``near``: every byte of it lies less than ``within`` bytes from
        ``near`` (default 2 GiB), or AllocError; an existing mapping is never
        replaced."""
        if self._pages.page != PAGE_SIZE:
            raise ValueError(
                "reserve() needs an allocator of normal pages: huge pages cannot be "
                "reserved without taking them from the huge page pool"
            )
        n = size_argument(size, PAGE_SIZE)
        capacity = -(-n // PAGE_SIZE) * PAGE_SIZE
        alignment = PAGE_SIZE if align is None else max(PAGE_SIZE, power_of_two(align, "align"))

        def map_at(address: int | None) -> Region:
            return Region._map(
                n,
                capacity,
                PROT_NONE,
                MAP_NORESERVE,
                0,
                0,
                PAGE_SIZE,
                alignment,
                self,
                Backing.NORMAL,
                address,
            )

        return _place(
            self, map_at, n, capacity, alignment, near, within, "a reservation", alloc_error
        )

    # ------------------------------------------------------------ resizing

    def realloc(self, region: Region, new_size: int) -> Region:
        """Resize the region, keeping its contents; it may move.

        Returns the region (the same object, at its new address). A size that
        needs the same pages makes no system call. While a buffer is exported
        only sizes within the current capacity are allowed; while a function
        pins it, none that would move it or re-zero its bytes.
        """
        self._owned(region)
        size = size_argument(new_size, self._page, "new_size")
        try:
            region._resize(size, 0)
        except OSError as exc:
            fallback = self._pages.fallback(region._backing)
            if fallback is None:
                raise self._pages.alloc_error(exc, size) from None
            try:  # a prefer region whose huge pages ran short: the next best pages
                region._resize(size, 0, fallback.mflags, fallback.advice, fallback.backing)
            except OSError as again:
                raise self._pages.alloc_error(again, size) from None
        return region

    def grow_in_place(self, region: Region, new_size: int) -> None:
        """Grow the region without moving it; CannotReallocInPlace when the
        pages after it are taken. Allowed while buffers are exported."""
        self._owned(region)
        region._resize(size_argument(new_size, self._page, "new_size"), 1)

    def shrink_in_place(self, region: Region, new_size: int) -> None:
        """Shrink the region without moving it, unmapping the pages it no longer needs."""
        self._owned(region)
        region._resize(size_argument(new_size, self._page, "new_size"), 2)

    # ------------------------------------------------------------ commit

    def commit(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Fault in (commit) pages of the region now rather than on first touch."""
        self._owned(region)
        try:
            region._populate(offset, length)
        except OSError as exc:
            raise self._pages.alloc_error(
                exc, region.capacity if length is None else length
            ) from None

    def uncommit(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Give pages of the region back to the kernel; they read as zero afterwards.

        BufferError while a function made by region.function() pins the region."""
        self._owned(region)
        region._madvise(MADV_DONTNEED, offset, length)

    # ------------------------------------------------------------ objects

    def alloc_obj(self) -> Region:
        """A region of the object layout (obj_size bytes aligned to obj_align)."""
        size, align = self._obj_layout
        return self.alloc(size, align)

    def dealloc_obj(self, region: Region) -> None:
        """Free a region from alloc_obj()."""
        self._owned(region, closed_ok=True)
        if region.size != self._obj_layout.size:
            raise ValueError(
                f"region of {region.size} bytes is not an object of {self._obj_layout.size} bytes"
            )
        self.dealloc(region)

    # ------------------------------------------------------------ statistics

    def stats(self) -> AllocStats:
        """Live regions, bytes mapped and bytes resident, measured now, and
        what the mapping cache holds (``stats().cache``).

        Costs nothing per allocation: the live regions are found through the
        garbage collector (time proportional to the objects in the process).
        """
        return alloc_stats(self, Region, CacheStats(*self._cache_stats()))

    # ------------------------------------------------------------ helpers

    def _owned(self, region: object, *, closed_ok: bool = False) -> None:
        if not isinstance(region, KernelRegion):
            raise TypeError(f"expected a Region, not {type(region).__name__}")
        if region._owner is not self:
            raise ValueError("region was allocated by another allocator")
        if region.closed and not closed_ok:
            raise ValueError(CLOSED)
