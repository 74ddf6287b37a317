"""Secret memory: keys and passwords in pages that are guarded, locked, never
dumped, zero in a forked child, and wiped when they are closed.

``SecretBuffer(size)`` maps a guard page, the secret's pages and a guard page.
The secret ends where the trailing guard begins, so reading or writing one
byte past it faults at once; a random canary sits right before it and is
checked when the buffer is closed (a mismatch aborts the process, as
libsodium does, or raises :class:`MemoryCorruptionError`). The pages are
locked in memory (``lock``), excluded from core dumps, zero in a forked child,
and wiped on close; ``backend="memfd_secret"`` takes them out of the kernel's
own direct map. See docs/secrets.md for what each measure defends against,
and what none of them does.

The C kernel (``_mman.Secret``) owns the mapping, the access state, the
buffers exported and every change of them; this module holds the policy:
options, backend and guard choice, the mapping budget, error messages.
"""

from __future__ import annotations

import errno
import os
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Final, NoReturn, Self, SupportsIndex

from ._args import size as size_argument
from ._linux import (
    PAGE_SIZE,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    mapping_count,
    max_map_count,
    memlock_error,
)
from ._mman import Secret, SecretOpening
from .closing import ClosesOnExit, RestoresOnExit
from .exceptions import AllocError, MemoryCorruptionError
from .features import madv_guard_install, memfd_secret

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["MemoryCorruptionError", "SecretBuffer"]

LOCKS: Final = ("required", "best_effort", "off")
"""The ``lock`` policies, in the order the C kernel numbers them (off = 0)."""
BACKENDS: Final = ("auto", "memfd_secret", "anonymous")
"""The ``backend`` choices."""
ON_CORRUPTION: Final = ("abort", "raise")
"""What a canary mismatch at close does."""

CANARY_SIZE: Final = 16
"""Bytes of the canary right before the secret."""
MAPPINGS_PER_BUFFER: Final = 3
"""Kernel mappings (VMAs) one buffer holds: a guard, the secret pages, a guard."""
SPARE_MAPPINGS: Final = 32
"""Mappings the budget check keeps free for the interpreter and everything else."""

_LOCK_CODE: Final = {"off": 0, "best_effort": 1, "required": 2}
_BACKEND_ANONYMOUS, _BACKEND_MEMFD_SECRET = 0, 1
_GUARD_MPROTECT, _GUARD_MADVISE = 0, 1
_ACCESS_NAME: Final = {PROT_NONE: "none", PROT_READ: "read", PROT_READ | PROT_WRITE: "readwrite"}
_ACCESS_METHOD: Final = {PROT_NONE: "noaccess", PROT_READ: "readonly"}
_MEMLOCK_ERRNOS: Final = (errno.EAGAIN, errno.ENOMEM, errno.EPERM)


def _choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value in choices:
        return value
    listed = ", ".join(repr(choice) for choice in choices)
    raise ValueError(f"{name} must be one of {listed}, got {value!r}")


def secret_pages(size: int) -> int:
    """Bytes of the secret pages of a buffer of ``size`` bytes (secret and canary,
    rounded up to whole pages): what ``lock`` locks."""
    return (size + CANARY_SIZE + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class _MapBudget:
    """The check of vm.max_map_count before a buffer is mapped.

    Reading /proc/self/maps costs more than making a buffer, so the count is
    read again only once the buffers made since the last reading could have
    used half of the room it left; a refusal by the kernel in between is
    diagnosed with a fresh reading (:func:`_creation_error`).
    """

    __slots__ = ("credit",)

    def __init__(self) -> None:
        self.credit = 0

    def take(self, size: int) -> None:
        """Count one more buffer; AllocError if the process has no room for its mappings."""
        if self.credit > 0:
            self.credit -= 1
            return
        limit = max_map_count()
        try:
            count = mapping_count()
        except OSError:  # e.g. unreadable after a change of user: let the kernel decide
            limit = -1
        if limit < 0:  # unknown: let the kernel decide
            self.credit = 1024
            return
        room = limit - count - SPARE_MAPPINGS
        if room < MAPPINGS_PER_BUFFER:
            raise AllocError(
                f"cannot make a secret buffer of {size} bytes: the process holds {count} "
                f"mappings and vm.max_map_count is {limit}; a secret buffer needs "
                f"{MAPPINGS_PER_BUFFER} (and {SPARE_MAPPINGS} are kept spare). Close "
                "regions or buffers, or raise the limit (sysctl vm.max_map_count)",
                errno=errno.ENOMEM,
                size=size,
            )
        self.credit = room // (2 * MAPPINGS_PER_BUFFER)

    def reset(self) -> None:
        """Read the count again before the next buffer."""
        self.credit = 0


_budget = _MapBudget()


def _creation_error(exc: OSError, size: int, backend: int) -> Exception:
    """The exception a refusal by the kernel while making a buffer becomes.

    The C kernel names the step that failed in ``exc.filename``.
    """
    step = exc.filename if isinstance(exc.filename, str) else "mmap"
    code = exc.errno or errno.ENOMEM
    reason = os.strerror(code)
    if step == "mlock" or (step == "mmap memfd_secret" and code in _MEMLOCK_ERRNOS):
        error = memlock_error(exc, secret_pages(size))
        if backend == _BACKEND_MEMFD_SECRET and isinstance(error, AllocError):
            return AllocError(
                f"{error}; memfd_secret pages are always locked (backend='anonymous' "
                "with lock='best_effort' or 'off' can do without)",
                errno=error.errno,
                size=size,
            )
        return error
    if code in (errno.ENOMEM, errno.EAGAIN):
        _budget.reset()
        message = f"cannot make a secret buffer of {size} bytes: {step} failed: {reason}"
        limit = max_map_count()
        try:
            count = mapping_count()
        except OSError:
            limit = -1
        if limit > 0 and count + MAPPINGS_PER_BUFFER + SPARE_MAPPINGS > limit:
            message += f" (the process holds {count} mappings and vm.max_map_count is {limit})"
        return AllocError(message, errno=code, size=size)
    return OSError(code, f"cannot make a secret buffer of {size} bytes: {step} failed: {reason}")


def _memfd_secret_missing() -> OSError:
    feature = memfd_secret()
    return OSError(
        errno.ENOSYS,
        f"backend='memfd_secret' is not available here: {feature.detail}; "
        "backend='auto' uses anonymous memory where it is missing",
    )


class SecretBuffer(Secret, ClosesOnExit):
    """Memory for secrets: guarded, locked, never dumped, wiped on close.

    ``SecretBuffer(size, *, lock="required", backend="auto", on_corruption="abort")``
    maps ``size`` bytes (zero-filled, access "readwrite") between two guard
    pages, with a random canary right before them:

    - ``lock``: "required" locks the pages in memory or raises AllocError
      naming RLIMIT_MEMLOCK; "best_effort" carries on unlocked when the limit
      refuses (``locked`` says); "off" does not lock.
    - ``backend``: "memfd_secret" takes the pages out of the kernel's direct
      map (Linux 5.14, OSError where the kernel lacks it); "anonymous" uses
      private anonymous memory; "auto" takes memfd_secret where it is
      available and the lock limit allows it, else anonymous. ``backend``
      says which.
    - ``on_corruption``: what close() does when the canary was overwritten:
      "abort" the process (as libsodium) or "raise" MemoryCorruptionError
      (after the buffer is wiped and closed).

    Reading and writing go through buffers that follow ``access``: none at
    "none", read-only at "read". ``with buf.open() as view:`` opens the pages
    for a block and restores the access after; ``write()`` copies in,
    ``compare()`` compares in constant time. Nothing copies the secret into a
    Python object unless asked (``bytes(view)``): no repr of the contents, no
    pickling, no ``==`` on contents (use compare()). ``close()`` (or the end
    of a ``with`` block, or garbage collection) checks the canary, wipes the
    bytes, and unmaps the pages.

    Attributes (from the C kernel): ``size`` (also ``len(buf)``), ``address``
    (the first secret byte, for ctypes), ``access``, ``locked``, ``backend``,
    ``guard`` ("madvise": MADV_GUARD_INSTALL, or "mprotect": PROT_NONE pages),
    ``closed``.
    """

    __slots__ = ()

    _noun = "secret buffer"

    def __new__(
        cls,
        size: int,
        *,
        lock: str = "required",
        backend: str = "auto",
        on_corruption: str = "abort",
    ) -> Self:
        n = size_argument(size, PAGE_SIZE)
        lock_code = _LOCK_CODE[_choice(lock, "lock", LOCKS)]
        _choice(backend, "backend", BACKENDS)
        abort = _choice(on_corruption, "on_corruption", ON_CORRUPTION) == "abort"
        _budget.take(n)
        if backend != "anonymous":
            if not memfd_secret().available:
                if backend == "memfd_secret":
                    raise _memfd_secret_missing()
            else:
                try:
                    return cls._create(n, _BACKEND_MEMFD_SECRET, _GUARD_MPROTECT, lock_code, abort)
                except OSError as exc:
                    # auto: anonymous memory when the kernel refuses secretmem itself
                    # (the syscall, or the lock limit its pages count against)
                    if backend == "memfd_secret" or exc.filename == "mmap":
                        raise _creation_error(exc, n, _BACKEND_MEMFD_SECRET) from None
        guard = _GUARD_MADVISE if madv_guard_install().available else _GUARD_MPROTECT
        try:
            return cls._create(n, _BACKEND_ANONYMOUS, guard, lock_code, abort)
        except OSError as exc:
            raise _creation_error(exc, n, _BACKEND_ANONYMOUS) from None

    @classmethod
    def from_bytes(cls, data: Buffer, **options: str) -> Self:
        """A new buffer holding a copy of ``data`` (any bytes-like object, or a
        readable SecretBuffer); ``options`` as for SecretBuffer(). The copy
        goes straight from ``data`` into the secret pages."""
        with memoryview(data) as view:
            if view.nbytes == 0:
                raise ValueError("data must not be empty: a secret buffer holds at least 1 byte")
            buf = cls(view.nbytes, **options)
            buf.write(view)
        return buf

    def open(self, write: bool = False) -> AbstractContextManager[memoryview]:
        """``with buf.open(write=False) as view:`` a memoryview of the secret,
        read-only unless ``write``; the pages are opened as far as the block
        needs and their previous access is restored when it ends (also when
        it raises).

        A buffer made from the view (a slice, a numpy array) still alive when
        the block ends would lose its access: the end of the block then raises
        BufferError and changes nothing (the access stays open: release the
        buffer, then call noaccess() or readonly()).
        """
        return _Opened(self, bool(write))

    def __repr__(self) -> str:
        name = type(self).__name__
        if self.closed:
            return f"<{name} closed, {self.size} bytes>"
        locked = "locked" if self.locked else "not locked"
        return (
            f"<{name} {self.size} bytes, access {self.access}, backend {self.backend}, "
            f"guard {self.guard}, {locked}>"
        )

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(
            f"a {type(self).__name__} cannot be pickled or copied: that would copy the "
            "secret out of its pages (use SecretBuffer.from_bytes() to make a new one)"
        )


class _Opened(RestoresOnExit[memoryview]):
    """The context manager of SecretBuffer.open()."""

    __slots__ = ("_buf", "_opening", "_previous", "_write")

    _what = "open() block"

    def __init__(self, buf: SecretBuffer, write: bool) -> None:
        super().__init__()
        self._buf = buf
        self._write = write
        self._opening: SecretOpening | None = None
        self._previous = PROT_NONE

    # The C token ends the block exactly once: by release(), or by its death
    # when an interrupt unwinds the frame holding it (before or after
    # _entered is set): no line here can lose the end of the block.
    def _open(self) -> memoryview:
        opening = self._opening = self._buf._open(self._write)
        self._previous = opening.previous
        return opening.view

    def _restore(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.release()  # releases the view; the block ends, refused or not

    def _refused(self, error: BufferError) -> BufferError:
        previous = self._previous
        method = _ACCESS_METHOD.get(previous, "readwrite")
        return BufferError(
            f"open() cannot restore access {_ACCESS_NAME[previous]!r}: {error}; a buffer "
            f"made from the view is still alive (release it, then call buf.{method}())"
        )
