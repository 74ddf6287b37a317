"""Executable code in regions: ctypes functions that pin their region, and
the W^X flip as a context manager.

The protection of pages itself (protect, make_exec, make_writable,
flush_icache) is the C base's: each is one call that checks the record,
exports and pins, and acts. This module holds what is policy: which
prototypes are accepted, instruction alignment, and the shape of the flip.
"""

from __future__ import annotations

import os
from _ctypes import CFuncPtr
from typing import Any, TypeVar

from ._args import integer
from ._mman import Pin, Region
from .closing import RestoresOnExit

F = TypeVar("F", bound=CFuncPtr)
R = TypeVar("R", bound=Region)

CODE_ALIGN: int = {
    "x86_64": 1,
    "amd64": 1,
    "i386": 1,
    "i686": 1,
    "riscv64": 2,
}.get(os.uname().machine.lower(), 4)
"""Instructions start at multiples of this many bytes (A64 and most RISC: 4)."""


def function(region: Region, prototype: type[F], offset: object = 0) -> F:
    """A ctypes function for the machine code at ``offset`` of ``region``.

    ``prototype`` is a ctypes function type, e.g.
    ``ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)``. The
    function holds a pin on the region (the C layer's Pin, released exactly
    once when the function is deallocated): until then the region cannot be
    closed, freed, moved, shrunk, re-zeroed or uncommitted, nor lose EXEC on
    any page (BufferError). The page at ``offset`` must be executable. The
    function's ``region`` and ``offset`` attributes say where it lives.
    """
    at = code_offset(prototype, offset)
    fn = pinned_function(region._pin(at), prototype, __name__)
    fn.region = region  # type: ignore[attr-defined]
    fn.offset = at  # type: ignore[attr-defined]
    return fn


def code_offset(prototype: object, offset: object) -> int:
    """``offset`` as an int after checking ``prototype`` is a ctypes function
    type and ``offset`` a place where an instruction can start."""
    if not (isinstance(prototype, type) and issubclass(prototype, CFuncPtr)):
        raise TypeError(
            "prototype must be a ctypes function type such as "
            f"ctypes.CFUNCTYPE(ctypes.c_int), not {prototype!r}"
        )
    at = integer(offset, "offset")
    if at < 0:
        raise ValueError(f"offset must not be negative, got {at}")
    if at % CODE_ALIGN:
        raise ValueError(
            f"offset must be a multiple of {CODE_ALIGN} (instruction alignment on "
            f"{os.uname().machine}), got {at}"
        )
    return at


def pinned_function(pin: Pin, prototype: type[F], module: str) -> F:
    """A function of type ``prototype`` calling the code ``pin`` holds in
    place; it keeps the pin (checked and taken in one C call) until it dies."""
    fn = function_type(prototype, module)(pin.address)
    fn._mmap_alloc_pin = pin  # type: ignore[attr-defined]
    return fn


_function_types: dict[tuple[type[Any], str], type[Any]] = {}


def function_type(prototype: type[F], module: str) -> type[F]:
    """A subclass of ``prototype`` whose instances can hold their pin (one per
    prototype and module, made once)."""
    try:
        return _function_types[prototype, module]
    except KeyError:
        pass
    namespace: dict[str, object] = {
        name: getattr(prototype, name)
        for name in ("_flags_", "_restype_", "_argtypes_")
        if hasattr(prototype, name)
    }
    namespace["__doc__"] = "Machine code called through ctypes; holds a pin on its memory."
    namespace["__module__"] = module
    metaclass: Any = type(prototype)
    cls: type[F] = metaclass(prototype.__name__, (prototype,), namespace)
    _function_types[prototype, module] = cls
    return cls


class Writable(RestoresOnExit[R]):
    """``with region.writable(offset, length):`` read/write inside, read/exec
    (instruction cache flushed) after, even when the block raises.

    Entering refuses (BufferError, nothing changed) when a function pins the
    region or a writable buffer covers the pages, since leaving could not
    make them read/exec again. A buffer exported inside the block and still
    alive at its end makes leaving fail the same way, and the pages stay
    read/write: release buffers before the block ends.
    """

    __slots__ = ("_length", "_offset", "_region")

    _what = "writable() block"

    def __init__(self, region: R, offset: int, length: int | None) -> None:
        super().__init__()
        self._region = region
        self._offset = offset
        self._length = length

    def _open(self) -> R:
        region = self._region
        region._check_protect(5, self._offset, self._length)  # could the block be left?
        region.make_writable(self._offset, self._length)
        return region

    def _restore(self) -> None:
        self._region.make_exec(self._offset, self._length)

    def _refused(self, error: BufferError) -> BufferError:
        return BufferError(f"the pages stay read/write: {error}")
