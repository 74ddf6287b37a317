"""MapAllocBuilder: the configuration of a MapAlloc, one setting at a time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .allocator import MapAlloc


@dataclass(frozen=True)
class MapAllocBuilder:
    """A MapAlloc configuration; every setter returns a new builder.

    Defaults: readable, writable, not executable, commit off, objects of one
    page aligned to the page. Nothing is checked until build(), which raises
    ValueError or TypeError for a configuration that cannot work.
    """

    readable: bool = True
    writable: bool = True
    executable: bool = False
    commits: bool = False
    object_size: int | None = None
    object_align: int | None = None
    huge_page_size: int | None = None
    huge_mode: str | None = None
    cache_size: int = 0

    def read(self, flag: bool = True) -> MapAllocBuilder:
        """Whether allocated memory is readable (default: yes)."""
        return dataclasses.replace(self, readable=flag)

    def write(self, flag: bool = True) -> MapAllocBuilder:
        """Whether allocated memory is writable (default: yes)."""
        return dataclasses.replace(self, writable=flag)

    def exec(self, flag: bool = True) -> MapAllocBuilder:
        """Whether allocated memory is executable (default: no)."""
        return dataclasses.replace(self, executable=flag)

    def no_write(self) -> MapAllocBuilder:
        """Make allocated memory read-only (or at least not writable)."""
        return dataclasses.replace(self, writable=False)

    def commit(self, flag: bool = True) -> MapAllocBuilder:
        """Whether alloc() returns committed (prefaulted) memory (default: no)."""
        return dataclasses.replace(self, commits=flag)

    def obj_size(self, size: int) -> MapAllocBuilder:
        """The object size for alloc_obj(); a multiple of the page size and of obj_align."""
        return dataclasses.replace(self, object_size=size)

    def obj_align(self, align: int) -> MapAllocBuilder:
        """The object alignment for alloc_obj(); a power of two."""
        return dataclasses.replace(self, object_align=align)

    def huge_pagesize(self, size: int | None) -> MapAllocBuilder:
        """Back allocations with hugetlb pages of this size; None for normal pages."""
        return dataclasses.replace(self, huge_page_size=size)

    def huge(self, mode: str | None) -> MapAllocBuilder:
        """The huge page mode: "normal" (base pages only), "hugetlb", "thp" or
        "prefer" (see mmap_alloc.backings); None for the default (base pages,
        THP advice for regions of 4 MiB and more; hugetlb pages if
        huge_pagesize is set)."""
        return dataclasses.replace(self, huge_mode=mode)

    def cache(self, n: int) -> MapAllocBuilder:
        """Keep up to n freed mappings per class for reuse (default 0: off);
        see MapAlloc and docs/allocator.md."""
        return dataclasses.replace(self, cache_size=n)

    def build(self) -> MapAlloc:
        """The allocator this configuration describes; all validation happens here."""
        return MapAlloc(
            read=self.readable,
            write=self.writable,
            exec=self.executable,
            commit=self.commits,
            obj_size=self.object_size,
            obj_align=self.object_align,
            huge_pagesize=self.huge_page_size,
            huge=self.huge_mode,
            cache=self.cache_size,
        )
