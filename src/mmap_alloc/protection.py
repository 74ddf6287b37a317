"""Protection of page ranges, and executable code (W^X).

The Region methods protect(), protections(), make_exec(), make_writable(),
writable(), flush_icache() and function() are thin wrappers around the
functions here.

The C layer keeps two facts per region: the protection common to all pages
(``_prot``) and whether pages differ (``_mixed``). protect() computes both
for the state after the change without reading /proc when the region is
uniform; only a region whose pages already differ is read from
/proc/self/maps first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import threading
import weakref
from _ctypes import CFuncPtr
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from . import _args
from ._platform import PAGE_SIZE, effective_perms
from .exceptions import AllocError
from .perm import ALL_PERMS, Perm

if TYPE_CHECKING:
    from .region import Region

F = TypeVar("F", bound=CFuncPtr)

_READ = int(Perm.READ)
_EXEC = int(Perm.EXEC)
_RW = int(Perm.READ | Perm.WRITE)
_RX = int(Perm.READ | Perm.EXEC)

# Requested -> in force on this platform, by value (a tuple index is cheaper than a call).
_IN_FORCE: tuple[int, ...] = tuple(int(effective_perms(perm)) for perm in ALL_PERMS)
# The permission column of /proc/self/maps ("r-xp") -> Perm.
_PARSED: dict[bytes, Perm] = {str(perm).encode(): perm for perm in ALL_PERMS}

# Instructions start at multiples of this many bytes (A64 and most RISC: 4).
_CODE_ALIGN: int = {
    "x86_64": 1,
    "amd64": 1,
    "i386": 1,
    "i686": 1,
    "riscv64": 2,
}.get(platform.machine().lower(), 4)


lock = threading.RLock()
"""Held while a region's protections are read and acted on (protect, resize,
zeroing, prefaulting), so that ``_prot`` and ``_mixed`` never go stale under
threads: a buffer exported on a stale ``_prot`` could reach a PROT_NONE page."""


def _new_lock_in_child() -> None:
    # The thread that held the lock at fork does not exist in the child.
    global lock  # noqa: PLW0603
    lock = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


# ---------------------------------------------------------------- protection


def protect(region: Region, perms: object, offset: object = 0, length: object = None) -> None:
    """Set the protection of the pages in [offset, offset + length).

    ``offset`` must be page-aligned, ``length`` rounds up to whole pages and
    None means to the end of the capacity. Raises BufferError, changing
    nothing, when the change would remove READ or WRITE while a buffer of
    the region is exported, or EXEC while a function from function() lives.
    A failed mprotect (AllocError for ENOMEM, e.g. at vm.max_map_count)
    leaves the protections as they were.
    """
    if region.closed:
        raise ValueError("region is closed")
    prot = _IN_FORCE[_perms(perms)]
    whole = type(offset) is int and offset == 0 and length is None
    if not whole:  # argument checks (which may run user code) before taking the lock
        start, n = _args.page_range(offset, length, region.capacity, _page_size(region))
        if n == 0:
            return
    with lock:
        if whole:
            start, n = 0, region.capacity
        if region._mixed:
            _protect_mixed(region, prot, start, n)
            return
        old = region._prot
        if old & ~prot & _EXEC and region._pins:
            raise _exec_pinned(region)
        if n == region.capacity or prot == old:
            common, mixed = prot, 0
        else:
            common, mixed = old & prot, 1
        try:
            if not region._protect(start, n, prot, common, mixed, old):
                # another thread changed the whole region (the C fast path
                # takes no lock) since ``old`` was read: compute again
                protect(region, perms, start, n)
        except OSError as exc:
            # mprotect can fail part-way across several kernel mappings: put the rest back.
            with contextlib.suppress(OSError):
                region._protect(start, n, old, old, 0)
            raise _protect_error(exc, start, n) from None


def _protect_mixed(region: Region, prot: int, start: int, n: int) -> None:
    """protect() for a region whose pages differ: the current runs come from /proc."""
    end = start + n
    before = runs(region)
    common, mixed = prot, 0
    removes_exec = False
    for offset, length, perms in before:
        if offset < start or offset + length > end:  # some of this run stays as it is
            common &= perms
            if perms != prot:
                mixed = 1
        if offset < end and offset + length > start and perms & ~prot & _EXEC:
            removes_exec = True
    if removes_exec and region._pins:
        raise _exec_pinned(region)
    try:
        region._protect(start, n, prot, common, mixed)
    except OSError as exc:
        for offset, length, perms in before:
            lo, hi = max(offset, start), min(offset + length, end)
            if lo < hi:
                with contextlib.suppress(OSError):
                    region._protect(lo, hi - lo, int(perms), region._prot, int(region._mixed))
        raise _protect_error(exc, start, n) from None


def runs(region: Region) -> list[tuple[int, int, Perm]]:
    """The (offset, length, perms) runs covering the capacity, from /proc/self/maps.

    Neighbouring kernel mappings with the same protection form one run.
    """
    if region.closed:
        raise ValueError("region is closed")
    start = region.address
    end = start + region.capacity
    found: list[tuple[int, int, Perm]] = []
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            dash = line.index(b"-")
            lo = int(line[:dash], 16)
            if lo >= end:
                break  # the kernel lists mappings in address order
            space = line.index(b" ", dash)
            hi = int(line[dash + 1 : space], 16)
            if hi <= start:
                continue
            perms = _PARSED[line[space + 1 : space + 4]]
            lo, hi = max(lo, start) - start, min(hi, end) - start
            if found and found[-1][2] == perms and found[-1][0] + found[-1][1] == lo:
                found[-1] = (found[-1][0], hi - found[-1][0], perms)
            else:
                found.append((lo, hi - lo, perms))
    return found


def perms_at(region: Region, offset: int) -> Perm:
    """The protection of the page holding byte ``offset``."""
    if not region._mixed:
        return Perm(region._prot)
    for start, length, perms in runs(region):
        if start <= offset < start + length:
            return perms
    return Perm.NONE


# ---------------------------------------------------------------- code


def make_exec(region: Region, offset: object = 0, length: object = None) -> None:
    """Make the pages read/exec (no longer writable), then flush the
    instruction cache for them."""
    start, n = _range(region, offset, length)
    with lock:
        protect(region, _RX, start, n)
        if n:
            region._flush_icache(start, n)


def make_writable(region: Region, offset: object = 0, length: object = None) -> None:
    """Make the pages read/write (no longer executable)."""
    protect(region, _RW, offset, length)


@contextlib.contextmanager
def writable(region: Region, offset: object = 0, length: object = None) -> Iterator[Region]:
    """Read/write inside the block, read/exec with the instruction cache
    flushed on leaving it (even when the block raises)."""
    make_writable(region, offset, length)
    try:
        yield region
    finally:
        make_exec(region, offset, length)


def flush_icache(region: Region, offset: object = 0, length: object = None) -> None:
    """Make code written to the pages visible to instruction fetch.

    Needed after writing code on arm64 and most other architectures; a no-op
    on x86, whose caches are coherent. Pages without READ are skipped (cache
    maintenance by address needs read access on arm64).
    """
    if region.closed:
        raise ValueError("region is closed")
    start, n = _range(region, offset, length)
    if n == 0:
        return
    with lock:
        if not region._mixed:
            if region._prot & _READ:
                region._flush_icache(start, n)
            return
        end = start + n
        for run_start, run_length, perms in runs(region):
            lo, hi = max(run_start, start), min(run_start + run_length, end)
            if lo < hi and perms & _READ:
                region._flush_icache(lo, hi - lo)


def function(region: Region, prototype: type[F], offset: object = 0) -> F:
    """A ctypes function for the machine code at ``offset``.

    ``prototype`` is a ctypes function type, e.g.
    ``ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)``. The
    function keeps the region alive and pinned while it exists: the region
    cannot be closed, freed, moved or shrunk (BufferError), nor lose EXEC
    on any page (BufferError). The page at ``offset`` must be executable.
    The function's ``region`` and ``offset`` attributes say where it lives.
    """
    if region.closed:
        raise ValueError("region is closed")
    if not (isinstance(prototype, type) and issubclass(prototype, CFuncPtr)):
        raise TypeError(
            "prototype must be a ctypes function type such as "
            f"ctypes.CFUNCTYPE(ctypes.c_int), not {prototype!r}"
        )
    at = _args.integer(offset, "offset")
    if not 0 <= at < region.capacity:
        raise ValueError(f"offset {at} lies outside the region (capacity {region.capacity})")
    if at % _CODE_ALIGN:
        raise ValueError(
            f"offset must be a multiple of {_CODE_ALIGN} (instruction alignment on "
            f"{platform.machine()}), got {at}"
        )
    with lock:
        # Pin first: from then on no thread can remove EXEC, not even through
        # the C fast path of make_writable(), so the check below stays true.
        region._pin(1)
        try:
            perms = perms_at(region, at)
            if not perms & _EXEC:
                raise ValueError(
                    f"the code at offset {at} is not executable ({perms}): "
                    "call make_exec() or protect() first"
                )
            fn = _function_type(prototype)(region.address + at)
            fn.region = region  # type: ignore[attr-defined]
            fn.offset = at  # type: ignore[attr-defined]
            weakref.finalize(fn, region._pin, -1)
        except BaseException:
            region._pin(-1)
            raise
    return fn


_function_types: dict[type[Any], type[Any]] = {}


def _function_type(prototype: type[F]) -> type[F]:
    """A subclass of ``prototype`` whose instances can hold the region."""
    try:
        return _function_types[prototype]
    except KeyError:
        pass
    namespace: dict[str, object] = {
        name: getattr(prototype, name)
        for name in ("_flags_", "_restype_", "_argtypes_")
        if hasattr(prototype, name)
    }
    namespace["__doc__"] = "Machine code in a Region, called through ctypes; pins the region."
    namespace["__module__"] = __name__
    metaclass: Any = type(prototype)
    cls: type[F] = metaclass(prototype.__name__, (prototype,), namespace)
    _function_types[prototype] = cls
    return cls


# ---------------------------------------------------------------- helpers


def _perms(perms: object) -> int:
    """A Perm (or its int value) as an int from 0 to 7."""
    if type(perms) is Perm:
        return int(perms)
    value = _args.integer(perms, "perms")
    if not 0 <= value <= 7:
        raise ValueError(f"perms must combine Perm.READ, WRITE and EXEC, got {value}")
    return value


def _page_size(region: Region) -> int:
    page: int = getattr(region._owner, "page_size", PAGE_SIZE)
    return page


def _range(region: Region, offset: object, length: object) -> tuple[int, int]:
    if type(offset) is int and offset == 0 and length is None:
        return 0, region.capacity
    return _args.page_range(offset, length, region.capacity, _page_size(region))


def _exec_pinned(region: Region) -> BufferError:
    return BufferError(
        f"cannot remove EXEC: {region._pins} function(s) made by region.function() "
        "run code in the region; delete them first"
    )


def _protect_error(exc: OSError, start: int, n: int) -> Exception:
    """The exception a failed mprotect of [start, start + n) becomes."""
    message = f"cannot change the protection of {n} bytes at offset {start}: {exc.strerror}"
    if exc.errno == errno.ENOMEM:
        return AllocError(
            message + " (the process may hold vm.max_map_count mappings)",
            errno=errno.ENOMEM,
            size=n,
        )
    return OSError(exc.errno, message)


__all__ = [
    "flush_icache",
    "function",
    "make_exec",
    "make_writable",
    "perms_at",
    "protect",
    "runs",
    "writable",
]
