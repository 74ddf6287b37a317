"""Huge pages without silent fallback: the modes, and what backs each region.

``MapAlloc(huge=...)`` (or ``MapAllocBuilder().huge(...)``) picks a mode:

- ``"hugetlb"``: pages from the kernel's hugetlb pool, of ``huge_pagesize``
  bytes (default: the kernel's default huge page size). An empty pool is an
  AllocError that says how to reserve pages. ``MapAlloc(huge_pagesize=n)``
  alone means this mode too.
- ``"thp"``: transparent huge pages: mappings aligned to the THP size and
  advised with MADV_HUGEPAGE. The kernel backs them with huge pages when it
  can; ``region.stats().huge_bytes`` says how much it did. Unavailable (a
  ValueError when the allocator is made) when THP is ``never``.
- ``"prefer"``: hugetlb if the pool can supply it, else THP if available,
  else normal pages; each region records what it got (``region.backing``).

In every mode the allocator's page size is the huge page size: sizes round up
to it, regions are aligned to it, and commit/uncommit work on whole huge pages
(the kernel rounds a partial hugetlb MADV_DONTNEED down to nothing and reports
success, so smaller ranges are refused instead).
"""

from __future__ import annotations

import errno
import weakref
from dataclasses import dataclass
from enum import StrEnum

from . import _args, _mman
from ._platform import (
    PAGE_SIZE,
    alloc_error,
    default_hugepage_size,
    format_size,
    hugepage_pools,
    thp_mode,
    thp_size,
)
from .allocator import MapAlloc, map_aligned
from .exceptions import CannotReallocInPlace
from .region import Region

_MADV_HUGEPAGE: int | None = getattr(_mman, "MADV_HUGEPAGE", None)
_MAP_HUGETLB: int | None = getattr(_mman, "MAP_HUGETLB", None)
_HAS_POPULATE = hasattr(_mman, "MADV_POPULATE_WRITE")
_RW = 3


class Backing(StrEnum):
    """What backs a region's memory."""

    NORMAL = "normal"
    """The kernel's base pages."""
    THP = "thp"
    """Aligned and advised for transparent huge pages: the kernel may use huge
    pages (``stats().huge_bytes`` says how much it did)."""
    HUGETLB = "hugetlb"
    """Pages from the hugetlb pool."""


class HugePages(StrEnum):
    """The huge page modes of ``MapAlloc(huge=...)``."""

    HUGETLB = "hugetlb"
    THP = "thp"
    PREFER = "prefer"


@dataclass(frozen=True)
class HugeConfig:
    """A resolved huge page mode: what the allocator will try, in order."""

    mode: HugePages
    page: int
    """The allocation granularity (sizes round up to it; regions align to it)."""
    hugetlb: int | None
    """The hugetlb page size to use (or try first), None for none."""
    thp: int | None
    """The THP size if THP is to be used (or tried), else None."""

    @property
    def hugetlb_flags(self) -> int:
        """MAP_HUGETLB with the page size encoded, or 0."""
        if self.hugetlb is None or _MAP_HUGETLB is None:
            return 0
        return _MAP_HUGETLB | (self.hugetlb.bit_length() - 1) << _mman.MAP_HUGE_SHIFT


def thp_available() -> bool:
    """Whether MADV_HUGEPAGE can give transparent huge pages here (THP not ``never``)."""
    return _MADV_HUGEPAGE is not None and thp_mode() in ("always", "madvise")


def configure(huge: object, huge_pagesize: object) -> HugeConfig:
    """Check a ``huge=`` / ``huge_pagesize=`` pair; ValueError or TypeError if it cannot work."""
    if huge is None:
        mode = HugePages.HUGETLB
    elif isinstance(huge, str):
        try:
            mode = HugePages(huge)
        except ValueError:
            choices = ", ".join(repr(str(m)) for m in HugePages)
            raise ValueError(f"huge must be None or one of {choices}, got {huge!r}") from None
    else:
        raise TypeError(f"huge must be a str or None, not {type(huge).__name__}")
    size = None if huge_pagesize is None else _args.integer(huge_pagesize, "huge_pagesize")

    if mode is HugePages.THP:
        page = _thp_page(huge_pagesize=size)
        return HugeConfig(mode, page, None, page)
    if mode is HugePages.HUGETLB:
        page = _hugetlb_size(size)
        return HugeConfig(mode, page, page, None)
    # prefer: whatever this machine has, best first; never an error for lack of it
    hugetlb = _hugetlb_size(size) if size is not None else _default_hugetlb()
    thp = thp_size() if thp_available() else None
    return HugeConfig(mode, hugetlb or thp or PAGE_SIZE, hugetlb, thp)


def _hugetlb_size(size: int | None) -> int:
    supported = [pool.size for pool in hugepage_pools()]
    if _MAP_HUGETLB is None:
        supported = []
    if size is None:
        default = default_hugepage_size()
        if default is None or default not in supported:
            raise ValueError("huge='hugetlb': this machine has no hugetlb pages")
        return default
    if size not in supported:
        names = ", ".join(format_size(n) for n in supported) or "none"
        raise ValueError(
            f"huge_pagesize={size} is not a huge page size of this machine (supported: {names})"
        )
    return size


def _default_hugetlb() -> int | None:
    size = default_hugepage_size()
    if _MAP_HUGETLB is None or size not in [pool.size for pool in hugepage_pools()]:
        return None
    return size


def _thp_page(huge_pagesize: int | None) -> int:
    if not thp_available():
        raise ValueError(
            f"huge='thp': transparent huge pages are not available here (mode {thp_mode()!r} "
            "in /sys/kernel/mm/transparent_hugepage/enabled; 'madvise' or 'always' needed)"
        )
    size = thp_size()
    if huge_pagesize is not None and huge_pagesize != size:
        raise ValueError(
            f"huge='thp' uses the kernel's transparent huge page size {size}; "
            f"huge_pagesize must be None or {size}, got {huge_pagesize}"
        )
    return size


class HugeMapAlloc(MapAlloc):
    """A MapAlloc in a huge page mode; ``MapAlloc(huge=...)`` makes one.

    It behaves as MapAlloc, with the huge page size as its page size, and
    records per region what backs it.
    """

    __slots__ = ("_backings", "_config")

    _config: HugeConfig
    _backings: weakref.WeakKeyDictionary[Region, Backing]

    def _pages(self, huge: object, huge_pagesize: object) -> tuple[int, int, int | None]:
        config = self._config = configure(huge, huge_pagesize)
        self._backings = weakref.WeakKeyDictionary()
        if config.mode is HugePages.HUGETLB:
            return config.page, config.hugetlb_flags, config.hugetlb
        return config.page, 0, None

    # ------------------------------------------------------------ properties

    @property
    def huge(self) -> HugePages:
        """The huge page mode."""
        return self._config.mode

    @property
    def huge_pagesize(self) -> int | None:
        """The hugetlb page size used (or, with ``prefer``, tried first); None for none."""
        return self._config.hugetlb

    def __repr__(self) -> str:
        config = self._config
        hugetlb = f" huge_pagesize={config.hugetlb}" if config.hugetlb else ""
        return (
            f"<MapAlloc {self._perms} commit={self._commit} huge={config.mode!s}"
            f" page_size={self._page}{hugetlb}>"
        )

    def _backing_of(self, region: Region) -> Backing:
        backing = self._backings.get(region)
        if backing is not None:
            return backing
        # mappings made with the allocator's own flags (not through alloc())
        return Backing.HUGETLB if self._flags & (_MAP_HUGETLB or 0) else Backing.NORMAL

    # ------------------------------------------------------------ allocation

    def alloc(self, size: int, align: int | None = None) -> Region:
        """A new region of at least ``size`` bytes (whole huge pages), zero-filled,
        aligned to the huge page size (or to ``align`` if larger)."""
        config = self._config
        if config.mode is HugePages.HUGETLB:
            return super().alloc(size, align)
        size = _args.size(size, self._page)
        capacity = (size + self._mask) & ~self._mask
        alignment = self._page
        if align is not None:
            alignment = max(alignment, _args.power_of_two(align, "align"))
        region: Region | None = None
        backing = Backing.NORMAL
        if config.mode is HugePages.PREFER and config.hugetlb is not None:
            try:
                region = map_aligned(
                    self, size, capacity, alignment, self._prot, config.hugetlb_flags, self._page
                )
                backing = Backing.HUGETLB
            except OSError:
                region = None  # the pool cannot supply it: fall back
        if region is None:
            try:
                region = map_aligned(self, size, capacity, alignment, self._prot, 0)
            except OSError as exc:
                raise alloc_error(exc, size) from None
            if config.thp is not None:
                backing = self._advise_thp(region, strict=config.mode is HugePages.THP)
        if backing is not Backing.NORMAL:
            self._backings[region] = backing
        return self._prefault(region)

    def _advise_thp(self, region: Region, strict: bool) -> Backing:
        assert _MADV_HUGEPAGE is not None
        try:
            region._advise(0, region.capacity, _MADV_HUGEPAGE)
        except OSError as exc:
            if not strict:
                return Backing.NORMAL
            region.close()
            raise OSError(
                exc.errno, f"the kernel refused MADV_HUGEPAGE (transparent huge pages): {exc}"
            ) from None
        return Backing.THP

    def _map_like(self, region: Region, size: int, capacity: int) -> Region:
        """A writable mapping backed as ``region`` is, for realloc's copy.

        A ``prefer`` region whose pages cannot be had falls back as alloc()
        does, and the region's record follows.
        """
        config = self._config
        backing = self._backing_of(region)
        if backing is Backing.HUGETLB:
            try:
                return map_aligned(
                    self, size, capacity, self._page, _RW, config.hugetlb_flags, self._page
                )
            except OSError as exc:
                if config.mode is not HugePages.PREFER:
                    raise alloc_error(exc, size, config.hugetlb) from None
        try:
            target = map_aligned(self, size, capacity, self._page, _RW, 0)
        except OSError as exc:
            raise alloc_error(exc, size) from None
        new = Backing.NORMAL
        if backing is not Backing.NORMAL and config.thp is not None:
            new = self._advise_thp(target, strict=config.mode is HugePages.THP)
        if new is not backing:
            self._backings[region] = new
        return target

    # ------------------------------------------------------------ resizing

    def realloc(self, region: Region, new_size: int) -> Region:
        """As MapAlloc.realloc(); the region keeps its backing (hugetlb regions,
        which mremap cannot grow, are copied into new hugetlb pages; a
        ``prefer`` region falls back when the pool is short, and says so)."""
        self._open(region)
        before = self._backings.get(region)
        try:
            region = super().realloc(region, new_size)
            thp = self._config.thp
            if thp and region.address & (thp - 1) and self._backing_of(region) is Backing.THP:
                # an older kernel moved it off a huge page boundary: no huge pages there
                self._move_by_copy(region, region.size, region.capacity)
        except BaseException:
            if before is not None:
                self._backings[region] = before
            else:
                self._backings.pop(region, None)
            raise
        return region

    def grow_in_place(self, region: Region, new_size: int) -> None:
        """As MapAlloc.grow_in_place(); hugetlb regions grow only within their capacity."""
        try:
            super().grow_in_place(region, new_size)
        except CannotReallocInPlace as exc:
            if self._backing_of(region) is not Backing.HUGETLB:
                raise
            raise CannotReallocInPlace(
                f"cannot grow a hugetlb region in place beyond its capacity {region.capacity}: "
                "the kernel does not extend hugetlb mappings (realloc() copies instead)"
            ) from exc

    # ------------------------------------------------------------ commit

    def commit(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Fault in whole huge pages of the region now; an error if the kernel cannot."""
        if not _HAS_POPULATE and self._backing_of(region) is Backing.HUGETLB:
            raise OSError(
                errno.EOPNOTSUPP,
                "cannot commit hugetlb pages: mmap_alloc was built without "
                "MADV_POPULATE_WRITE (Linux 5.14 headers), and MADV_WILLNEED does nothing "
                "on hugetlb mappings",
            )
        try:
            super().commit(region, offset, length)
        except OSError as exc:
            if exc.errno != errno.EINVAL or self._backing_of(region) is not Backing.HUGETLB:
                raise
            raise OSError(
                exc.errno, "this kernel cannot prefault hugetlb pages (MADV_POPULATE_*)"
            ) from exc

    def uncommit(self, region: Region, offset: int = 0, length: int | None = None) -> None:
        """Give whole huge pages of the region back to the kernel (they read as zero)."""
        try:
            super().uncommit(region, offset, length)
        except OSError as exc:
            if exc.errno != errno.EINVAL or self._backing_of(region) is not Backing.HUGETLB:
                raise
            raise OSError(
                exc.errno,
                "this kernel cannot give hugetlb pages back (MADV_DONTNEED on hugetlb "
                "mappings needs Linux 5.18)",
            ) from exc


def backing_of(region: Region) -> Backing:
    """What backs ``region`` (as recorded when it was mapped)."""
    owner = region._owner
    if isinstance(owner, HugeMapAlloc):
        return owner._backing_of(region)
    return Backing.NORMAL
