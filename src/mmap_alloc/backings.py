"""Backings: where an allocator's pages come from, with no silent fallback.

A backing is a strategy object that a MapAlloc holds (``MapAlloc(huge=...)``
picks one): its page size, and the mappings to try for each allocation, best
first. Every region records what it got (``region.backing``).

- the default (``huge=None``): the kernel's base pages, and for regions of
  ``THP_MIN_SIZE`` (4 MiB) and more, where transparent huge pages are
  available, a mapping aligned to the THP size and advised with
  MADV_HUGEPAGE (as numpy advises its large arrays): ``backing`` says
  ``Backing.THP``. The page size stays the base page;
- ``"normal"``: the kernel's base pages only, never advised;
- ``"hugetlb"``: pages from the kernel's hugetlb pool, of ``huge_pagesize``
  bytes (default: the kernel's default huge page size). An empty pool is an
  AllocError that says how to reserve pages. ``MapAlloc(huge_pagesize=n)``
  alone means this mode too;
- ``"thp"``: transparent huge pages: mappings aligned to the THP size and
  advised with MADV_HUGEPAGE; the kernel backs them with huge pages when it
  can (``region.stats().huge_bytes`` says how much it did). A ValueError when
  the allocator is made if THP is ``never``;
- ``"prefer"``: hugetlb if the pool can supply it, else THP if available,
  else normal pages.

In every huge page mode the allocator's page size is the huge page size:
sizes round up to it, regions are aligned to it, and commit/uncommit work on
whole huge pages (the kernel rounds a partial hugetlb MADV_DONTNEED down to
nothing and reports success, so smaller ranges are refused instead).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

from ._args import integer
from ._linux import (
    MADV_HUGEPAGE,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    PAGE_SIZE,
    alloc_error,
    default_hugepage_size,
    format_size,
    hugepage_pools,
    thp_mode,
    thp_size,
)


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

    NORMAL = "normal"
    """Base pages only: no THP advice, even for large regions."""
    HUGETLB = "hugetlb"
    THP = "thp"
    PREFER = "prefer"


@dataclass(frozen=True)
class Attempt:
    """One way to map pages: mmap flags, advice for the new pages, the
    alignment to map at, the backing it gives, and the smallest capacity it
    is tried for (0: every one)."""

    mflags: int
    advice: int
    align: int
    backing: Backing
    min_size: int = 0

    def spec(self) -> tuple[int, int, int, Backing, int]:
        """As the C layer takes it."""
        return (self.mflags, self.advice, self.align, self.backing, self.min_size)


@dataclass(frozen=True)
class PageSource:
    """How an allocator obtains pages: their size and the attempts, best first."""

    page: int
    """The allocation granularity: sizes round up to it, regions align to it."""
    attempts: tuple[Attempt, ...]
    mode: HugePages | None = None
    hugetlb: int | None = None
    """The hugetlb page size used (or, with ``prefer``, tried first)."""

    def alloc_error(self, exc: OSError, size: int) -> Exception:
        """The exception a refused mapping of ``size`` bytes becomes: ENOMEM
        (and EAGAIN) an AllocError, with how to reserve hugetlb pages when the
        pool was the only source; anything else stays the OSError it was."""
        if self.mode is HugePages.THP and exc.errno == errno.EINVAL:
            return OSError(
                exc.errno, f"the kernel refused MADV_HUGEPAGE (transparent huge pages): {exc}"
            )
        hint = self.hugetlb if self.mode is HugePages.HUGETLB else None
        return alloc_error(exc, size, hint)

    def fallback(self, backing: object) -> Attempt | None:
        """For a ``prefer`` region whose pages cannot be had again when it is
        copied (the hugetlb pool ran short), the next best way; else None."""
        if self.mode is not HugePages.PREFER:
            return None
        for index, attempt in enumerate(self.attempts):
            if attempt.backing == backing and index + 1 < len(self.attempts):
                return self.attempts[index + 1]
        return None


THP_MIN_SIZE = 4 << 20
"""The default allocator advises transparent huge pages for regions of this
size and more (numpy's threshold for its arrays)."""


def normal(mode: HugePages | None = None) -> PageSource:
    """The kernel's base pages."""
    return PageSource(PAGE_SIZE, (Attempt(0, 0, PAGE_SIZE, Backing.NORMAL),), mode)


def default() -> PageSource:
    """Base pages; regions of THP_MIN_SIZE and more (at least one huge page)
    aligned to the THP size and advised MADV_HUGEPAGE, where THP is available."""
    if not thp_available():
        return normal()
    thp = thp_size()
    return PageSource(
        PAGE_SIZE,
        (
            Attempt(0, MADV_HUGEPAGE, thp, Backing.THP, max(THP_MIN_SIZE, thp)),
            Attempt(0, 0, PAGE_SIZE, Backing.NORMAL),
        ),
    )


def thp_available() -> bool:
    """Whether MADV_HUGEPAGE can give transparent huge pages here (THP not ``never``)."""
    return thp_mode() in ("always", "madvise")


def hugetlb_flags(size: int) -> int:
    """MAP_HUGETLB with the page size encoded."""
    return MAP_HUGETLB | (size.bit_length() - 1) << MAP_HUGE_SHIFT


def select(huge: object, huge_pagesize: object) -> PageSource:
    """The page source a ``huge=`` / ``huge_pagesize=`` pair asks for; ValueError
    or TypeError (naming the setting) if it cannot work on this machine."""
    if huge is None and huge_pagesize is None:
        return default()
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
    size = None if huge_pagesize is None else integer(huge_pagesize, "huge_pagesize")

    if mode is HugePages.NORMAL:
        if size is not None:
            raise ValueError(
                f"huge='normal' uses base pages: huge_pagesize must be None, got {size}"
            )
        return normal(HugePages.NORMAL)
    if mode is HugePages.THP:
        page = _thp_page(size)
        return PageSource(page, (Attempt(0, MADV_HUGEPAGE, page, Backing.THP),), mode)
    if mode is HugePages.HUGETLB:
        page = _hugetlb_size(size)
        return PageSource(
            page, (Attempt(hugetlb_flags(page), 0, page, Backing.HUGETLB),), mode, page
        )
    # prefer: whatever this machine has, best first; never an error for lack of it
    hugetlb = _hugetlb_size(size) if size is not None else _default_hugetlb()
    thp = thp_size() if thp_available() else None
    page = hugetlb or thp or PAGE_SIZE
    attempts = []
    if hugetlb is not None:
        attempts.append(Attempt(hugetlb_flags(hugetlb), 0, page, Backing.HUGETLB))
    if thp is not None:
        attempts.append(Attempt(0, MADV_HUGEPAGE, max(page, thp), Backing.THP))
    attempts.append(Attempt(0, 0, page, Backing.NORMAL))
    return PageSource(page, tuple(attempts), mode, hugetlb)


def _hugetlb_size(size: int | None) -> int:
    supported = [pool.size for pool in hugepage_pools()]
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
    if size not in [pool.size for pool in hugepage_pools()]:
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
