"""Region: one live allocation, a mapping that exports itself as a buffer."""

from __future__ import annotations

import contextlib
import operator
from _ctypes import CFuncPtr
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _mman, protection
from .perm import Perm

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from .hugepages import Backing
    from .stats import RegionStats

_F = TypeVar("_F", bound=CFuncPtr)


class Region(_mman.Region):
    """One live allocation: whole pages from the kernel, owned by this object.

    Made by MapAlloc.alloc() and its siblings, never directly. ``len(region)``
    is the size asked for; ``capacity`` the bytes mapped. The region exports
    its ``size`` bytes through the buffer protocol (memoryview, numpy,
    ctypes.from_buffer); while any such buffer lives the region cannot be
    unmapped, moved, shrunk, or lose read or write permission. Reading needs
    READ (else BufferError), writing needs WRITE (else TypeError).

    ``address`` is for interop with ctypes or cffi: memory behind it is only
    valid while the region is open.
    """

    __slots__ = ()

    @property
    def perms(self) -> Perm:
        """The permissions in force for the whole region.

        ValueError when its pages differ (``mixed``): see protections().
        """
        self._check_open()
        if self._mixed:
            raise ValueError("the region's pages differ in protection; see region.protections()")
        return Perm(self._prot)

    def protections(self) -> list[tuple[int, int, Perm]]:
        """The (offset, length, perms) runs that cover the capacity, as the
        kernel reports them in /proc/self/maps."""
        return protection.runs(self)

    # Protection and code: the logic is in protection.py.

    @property
    def mixed(self) -> bool:
        """Whether pages of the region differ in protection."""
        self._check_open()
        return self._mixed

    # protect(), make_exec() and make_writable() are the C base's: it changes a
    # whole region itself and hands every other case to these three.

    def _protect_pages(self, perms: Perm, offset: int = 0, length: int | None = None) -> None:
        protection.protect(self, perms, offset, length)

    def _make_exec_pages(self, offset: int = 0, length: int | None = None) -> None:
        protection.make_exec(self, offset, length)

    def _make_writable_pages(self, offset: int = 0, length: int | None = None) -> None:
        protection.make_writable(self, offset, length)

    def writable(
        self, offset: int = 0, length: int | None = None
    ) -> contextlib.AbstractContextManager[Region]:
        """``with region.writable(): ...`` read/write inside, read/exec (flushed) after."""
        return protection.writable(self, offset, length)

    def flush_icache(self, offset: int = 0, length: int | None = None) -> None:
        """Make code written to the pages visible to instruction fetch (no-op on x86)."""
        protection.flush_icache(self, offset, length)

    def function(self, prototype: type[_F], offset: int = 0) -> _F:
        """A ctypes function for the code at ``offset``; it pins the region
        (no close, move, shrink, or loss of EXEC) while it exists."""
        return protection.function(self, prototype, offset)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("region is closed")

    def __repr__(self) -> str:
        if self.closed:
            return f"<Region closed size={self.size}>"
        return (
            f"<Region {'mixed' if self._mixed else self.perms} address=0x{self.address:x} "
            f"size={self.size} capacity={self.capacity}>"
        )

    def __enter__(self) -> Region:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @overload
    def __getitem__(self, key: int) -> int: ...
    @overload
    def __getitem__(self, key: slice) -> bytes: ...

    def __getitem__(self, key: int | slice) -> int | bytes:
        """A byte (an int) or a slice (bytes), bounds-checked as for bytearray."""
        if not isinstance(key, slice):
            key = _index(key)
        with memoryview(self) as view:
            item = view[key]
            if isinstance(item, memoryview):
                with item:
                    return item.tobytes()
            return int(item)

    def __setitem__(self, key: int | slice, value: int | bytes) -> None:
        """Write a byte or a slice; a slice keeps its length (the region cannot resize)."""
        if not isinstance(key, slice):
            key = _index(key)
        with memoryview(self) as view:
            view[key] = value  # type: ignore[index, assignment]

    def __iter__(self) -> Iterator[int]:
        """The bytes as ints, from a snapshot taken now."""
        return iter(bytes(self))

    @property
    def backing(self) -> Backing:
        """What backs the region: normal pages, THP (advised), or hugetlb pages."""
        from .hugepages import backing_of

        self._check_open()
        return backing_of(self)

    def stats(self) -> RegionStats:
        """Residency, huge page use, kernel page size and protections, measured now."""
        from .stats import region_stats

        return region_stats(self)

    def ndarray(self, dtype: Any, shape: int | tuple[int, ...], offset: int = 0) -> NDArray[Any]:
        """A numpy array over the region's bytes at ``offset`` (needs numpy).

        The array, and every view of it, pins the region: it cannot be unmapped
        while any of them lives. A read-only region gives a read-only array.
        """
        from .numpy import ndarray

        return ndarray(self, dtype, shape, offset)


def _index(key: object) -> int:
    """An index as bytearray takes it: an int or an object with __index__."""
    try:
        return operator.index(key)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"region indices must be integers or slices, not {type(key).__name__}"
        ) from None
