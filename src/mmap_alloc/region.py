"""Region: one live allocation, a mapping that exports itself as a buffer."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, overload

from . import _mman
from ._platform import mappings
from .perm import Perm

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from .hugepages import Backing
    from .stats import RegionStats


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
        """The permissions in force for the whole region."""
        self._check_open()
        return Perm(self._prot)

    def protections(self) -> list[tuple[int, int, Perm]]:
        """The (offset, length, perms) runs that cover the capacity, as the
        kernel reports them in /proc/self/maps."""
        self._check_open()
        start = self.address
        end = start + self.capacity
        runs: list[tuple[int, int, Perm]] = []
        for mapping in mappings():
            if mapping.end <= start or mapping.start >= end:
                continue
            lo, hi = max(mapping.start, start) - start, min(mapping.end, end) - start
            if runs and runs[-1][2] == mapping.perms and sum(runs[-1][:2]) == lo:
                runs[-1] = (runs[-1][0], hi - runs[-1][0], mapping.perms)
            else:
                runs.append((lo, hi - lo, mapping.perms))
        return runs

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("region is closed")

    def __repr__(self) -> str:
        if self.closed:
            return f"<Region closed size={self.size}>"
        return (
            f"<Region {self.perms} address=0x{self.address:x} "
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
        with memoryview(self) as view:
            item = view[key]
            if isinstance(item, memoryview):
                with item:
                    return item.tobytes()
            return int(item)

    def __setitem__(self, key: int | slice, value: int | bytes) -> None:
        """Write a byte or a slice; a slice keeps its length (the region cannot resize)."""
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
