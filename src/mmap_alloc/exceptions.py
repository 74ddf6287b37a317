"""The library's own exceptions (the C layer raises them too)."""

from __future__ import annotations

from errno import ENOMEM, ENXIO

from ._mman import _register_errors, _register_secret_errors


class MapAllocError(Exception):
    """Base of the errors mmap_alloc raises itself."""


class AllocError(MapAllocError, MemoryError):
    """The kernel refused memory (ENOMEM, or a size no address space can hold).

    ``errno`` is the system error behind it; ``size`` the bytes asked for.
    """

    errno: int
    """The system error number behind the refusal (most often ENOMEM)."""
    size: int | None
    """The bytes asked for, or None where no one size was asked for."""

    def __init__(self, message: str, *, errno: int = ENOMEM, size: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.size = size


class CannotReallocInPlace(MapAllocError):
    """The region cannot grow or shrink without moving; nothing was changed."""


class FileTruncatedError(MapAllocError, OSError):
    """The file under a region was cut short, and a method of the region was
    asked for bytes past its new end (pages repaired since the last
    ``refresh()``).

    Such pages read as zeros through every buffer, array and pointer of the
    region, and writes there stay in this process: the library mapped zero
    pages over them when a touch found them, instead of letting the process
    die of SIGBUS. ``refresh()`` maps the file as it is now. ``size`` is the
    file's size when the pages were found; ``errno`` is ENXIO (no such
    address: past the end of the file).
    """

    size: int
    """The file's size in bytes when the pages past its end were found."""

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(ENXIO, message)
        self.size = size


class MemoryCorruptionError(MapAllocError):
    """The canary before a SecretBuffer was overwritten: a write out of bounds
    corrupted memory next to the secret.

    Raised by ``close()`` of a buffer made with ``on_corruption="raise"``,
    after the buffer was wiped and unmapped. (The default, "abort", ends the
    process at once, as libsodium does.) Found when a buffer is garbage
    collected, it cannot be raised: Python reports it as an unraisable
    exception (``sys.unraisablehook``).
    """


CLOSED = "region is closed"
"""The message of the ValueError for any use of a closed region."""

_register_errors(AllocError, CannotReallocInPlace, FileTruncatedError)
_register_secret_errors(MemoryCorruptionError)
