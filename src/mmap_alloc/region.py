"""Region: one live allocation, a mapping that is a bytes-like object.

The C base (``_mman.Region``) owns everything that keeps memory safe: the
mapping, the record of each page's protection, exports, pins, and every
change of them. This class adds what is plain Python: properties that read
the record as Perm values, the context manager, and conveniences.
"""

from __future__ import annotations

import errno
import math
from _ctypes import CFuncPtr
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from ._args import integer
from ._linux import ADVICE, ADVICE_SINCE, memlock_error
from ._mman import Region as KernelRegion
from .backings import Backing
from .closing import ClosesOnExit
from .exceptions import CLOSED, FileTruncatedError
from .perm import Perm
from .protection import Writable, function
from .stats import RegionStats, region_stats

if TYPE_CHECKING:
    from numpy.typing import DTypeLike, NDArray

_F = TypeVar("_F", bound=CFuncPtr)


class Region(KernelRegion, ClosesOnExit):
    """One live allocation: whole pages from the kernel, owned by this object.

    Made by MapAlloc.alloc() and its siblings, never directly. ``len(region)``
    is the size asked for; ``capacity`` the bytes mapped. A region is a
    bytes-like object of fixed length: ``region[i]``, ``region[a:b]``,
    ``region[a:b] = data``, ``sub in region``, ``find()``, ``iter()``, and the
    buffer protocol (memoryview, numpy, ctypes.from_buffer). Reading needs
    READ (else BufferError), writing needs WRITE (else TypeError). While a
    buffer lives, the pages it covers cannot be unmapped, moved, or lose the
    access it needs.

    ``address`` is for interop with ctypes or cffi: memory behind it is only
    valid while the region is open.
    """

    __slots__ = ()

    _noun = "region"

    @property
    def perms(self) -> Perm:
        """The permissions of the whole region; ValueError when its pages
        differ (``mixed``): see protections()."""
        prot = self._prot
        if prot < 0:
            raise ValueError("the region's pages differ in protection; see region.protections()")
        return Perm(prot)

    @property
    def backing(self) -> Backing:
        """What backs the region, as recorded when it was mapped."""
        if self.closed:
            raise ValueError(CLOSED)
        return Backing(str(self._backing))

    def protections(self) -> list[tuple[int, int, Perm]]:
        """The (offset, length, perms) runs that cover the capacity, from the
        region's own record (the authority its buffers are checked against)."""
        runs: list[tuple[int, int, Perm]] = []
        for offset, length, prot, _flags in self._runs():
            if runs and runs[-1][2] == prot:
                runs[-1] = (runs[-1][0], runs[-1][1] + length, runs[-1][2])
            else:
                runs.append((offset, length, Perm(prot)))
        return runs

    def writable(self, offset: int = 0, length: int | None = None) -> Writable[Region]:
        """``with region.writable(): ...`` read/write inside, read/exec (flushed) after."""
        return Writable(self, offset, length)

    def function(self, prototype: type[_F], offset: int = 0) -> _F:
        """A ctypes function for the code at ``offset``; it pins the region
        (no close, move, shrink, re-zeroing, or loss of EXEC) while it exists."""
        return function(self, prototype, offset)

    def advise(self, advice: str, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) whole pages by name: "normal", "random", "sequential",
        "willneed", "dontneed", "free", "cold", "pageout", "hugepage",
        "nohugepage", "collapse", "dontfork", "dofork", "dontdump", "dodump",
        "wipeonfork", "keeponfork", "populate_read", "populate_write".

        ``offset`` and ``length`` are read as for commit(): whole pages, the
        length rounded up, None to the end. Advice that discards contents
        ("dontneed", "free", "pageout") follows uncommit's rules: refused
        (BufferError) while functions from function() pin the region. Pages
        advised "dontfork" are zero pages in a forked child, never a hole.
        An unknown name is a ValueError listing the names; advice the kernel
        refuses an OSError naming it (and the kernel that introduced it).
        """
        try:
            value = ADVICE[advice]
        except (KeyError, TypeError):
            names = ", ".join(ADVICE)
            raise ValueError(f"unknown advice {advice!r}; one of: {names}") from None
        try:
            self._madvise(value, offset, length)
        except FileTruncatedError:
            raise
        except OSError as exc:
            if exc.errno is None:
                raise
            raise OSError(exc.errno, advice_error(advice, exc)) from None

    def lock(self, offset: int = 0, length: int | None = None, *, on_fault: bool = False) -> None:
        """Lock whole pages in memory (mlock; with ``on_fault``,
        mlock2(MLOCK_ONFAULT): pages are locked as they are faulted in, so only
        touched pages count). ``offset`` and ``length`` as for advise().
        AllocError naming RLIMIT_MEMLOCK and its value when the limit refuses;
        ``stats().locked_bytes`` tells what is locked."""
        try:
            self._mlock(1 if on_fault else 0, offset, length)
        except FileTruncatedError:
            raise
        except OSError as exc:
            _start, n = self._page_range(offset, length)
            raise memlock_error(exc, n) from None

    def unlock(self, offset: int = 0, length: int | None = None) -> None:
        """Unlock pages locked by lock() (munlock); unlocking unlocked pages does nothing."""
        self._munlock(offset, length)

    def stats(self) -> RegionStats:
        """Residency, huge page and locked bytes, page size and protections, measured now."""
        return region_stats(self)

    def ndarray(
        self, dtype: DTypeLike, shape: int | tuple[int, ...], offset: int = 0
    ) -> NDArray[Any]:
        """A C-ordered numpy array of ``shape`` and ``dtype`` over the region's
        bytes at ``offset`` (needs numpy).

        The array, and every view of it, pins those bytes: the region cannot be
        unmapped or made unreadable under it. Read-only where a page lacks
        WRITE; BufferError where one lacks READ. Works on the usable middle of
        a region with guard pages.
        """
        import numpy as np

        dt = array_dtype(dtype)
        dims = array_shape(shape)
        start = integer(offset, "offset")
        if start < 0:
            raise ValueError(f"offset must not be negative, got {start}")
        if start % dt.alignment:
            raise ValueError(
                f"offset {start} is not a multiple of the alignment {dt.alignment} of dtype {dt}"
            )
        nbytes = math.prod(dims) * dt.itemsize
        if start + nbytes > self.size:
            raise ValueError(
                f"{nbytes} bytes at offset {start} do not fit in the region's {self.size} bytes"
            )
        pin = ArrayPin(self, start, nbytes)
        array: NDArray[Any] = np.asarray(pin).view(dt).reshape(dims)
        return array

    def __repr__(self) -> str:
        if self.closed:
            return f"<Region closed size={self.size}>"
        perms = "mixed" if self.mixed else str(self.perms)
        return (
            f"<Region {perms} address=0x{self.address:x} size={self.size} capacity={self.capacity}>"
        )

    if TYPE_CHECKING:

        def __iter__(self) -> Iterator[int]: ...


_EINVAL_HINTS = {
    "dontneed": "pages locked by lock() cannot be discarded",
    "free": "it applies to private anonymous memory that lock() did not lock",
    "pageout": "it does not apply to pages locked by lock()",
    "cold": "it does not apply to pages locked by lock()",
    "hugepage": "it needs transparent huge pages (THP not 'never')",
    "collapse": "it needs transparent huge pages and a range holding a whole aligned huge page",
    "wipeonfork": "it applies to private anonymous memory only",
    "keeponfork": "it applies to private anonymous memory only",
}


def advice_error(advice: str, exc: OSError) -> str:
    """The message of an OSError from madvise: the advice by name, and where
    the kernel answered EINVAL, the kernel that introduced the advice and
    what else it needs."""
    message = f"madvise({advice!r}) failed: {exc.strerror}"
    if exc.errno != errno.EINVAL:
        return message
    notes = []
    since = ADVICE_SINCE.get(advice)
    if since:
        notes.append(f"kernels before {since} lack it")
    if advice in _EINVAL_HINTS:
        notes.append(_EINVAL_HINTS[advice])
    return f"{message} ({'; '.join(notes)})" if notes else message


class ArrayPin:
    """The root of a numpy array's ``base`` chain: it holds a view of the
    region (an export) for as long as any array over it lives. numpy finds the
    memory through ``__array_interface__``; user code cannot release the view
    (as it could ``array.base.release()`` on a memoryview numpy held)."""

    __slots__ = ("__array_interface__", "_view", "region")

    def __init__(self, region: Region, offset: int, nbytes: int) -> None:
        view = region.view(offset, nbytes)  # the export: pins the bytes from here on
        self._view = view
        self.region = region
        self.__array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (region.address + offset, view.readonly),
            "version": 3,
        }


def array_dtype(dtype: DTypeLike) -> Any:
    """``dtype`` as a numpy dtype that can live in raw memory."""
    import numpy as np

    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in raw memory")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has no size")
    return dt


def array_shape(shape: object) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints."""
    import numpy as np

    if isinstance(shape, int | np.integer):
        dims: tuple[object, ...] = (shape,)
    else:
        try:
            dims = tuple(shape)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                f"shape must be an int or a tuple of ints, not {type(shape).__name__}"
            ) from None
    result = tuple(integer(n, "shape") for n in dims)
    if any(n < 0 for n in result):
        raise ValueError(f"shape must not have negative dimensions, got {result}")
    return result
