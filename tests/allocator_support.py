"""Helpers shared by the allocator tests (tests/test_allocator_*.py): permission
shorthands, bad arguments, allocators of given permissions."""

from __future__ import annotations

import sys

from mmap_alloc import MapAlloc, Perm
from mmap_alloc._linux import PAGE_SIZE as P

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
MiB = 1 << 20

BAD_TYPES = [True, False, 1.0, 4096.0, "4096", b"1", None, [1]]
NOT_POSITIVE = [0, -1, -P]
TOO_LARGE = [2**64, 2**63, sys.maxsize, 2**47, 2**62]
BAD_ALIGNS = [0, -8, 3, 6, P + 1, 3 * P]


def allocator_for(perms: Perm, **options: object) -> MapAlloc:
    return MapAlloc(read=bool(perms & R), write=bool(perms & W), exec=bool(perms & X), **options)  # type: ignore[arg-type]


def exec_only() -> MapAlloc:
    """An allocator whose pages look like nothing Python or libc maps (--x)."""
    return MapAlloc(read=False, write=False, exec=True)
