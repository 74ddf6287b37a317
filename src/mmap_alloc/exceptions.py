"""The library's own exceptions."""

from __future__ import annotations

import errno as _errno


class MapAllocError(Exception):
    """Base of the errors mmap_alloc raises itself."""


class AllocError(MapAllocError, MemoryError):
    """The kernel refused memory (ENOMEM, or a size no address space can hold).

    ``errno`` is the system error behind it; ``size`` the bytes asked for.
    """

    def __init__(self, message: str, *, errno: int = _errno.ENOMEM, size: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.size = size


class CannotReallocInPlace(MapAllocError):
    """The region cannot grow or shrink without moving; nothing was changed."""
