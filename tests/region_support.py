"""Helpers shared by the region tests (tests/test_region_*.py): permission
shorthands, allocators, a closed region, and what bytearray or a region raises.
The ``region`` and ``mixed`` fixtures are in conftest.py."""

from __future__ import annotations

from collections.abc import Callable

from mmap_alloc import MapAlloc, Perm, Region

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC


def allocator_for(perms: Perm) -> MapAlloc:
    return MapAlloc(read=bool(perms & R), write=bool(perms & W), exec=bool(perms & X))


def closed_region() -> Region:
    r = MapAlloc().alloc(10)
    r.close()
    return r


MiB = 1 << 20


def bytearray_error(call: Callable[[bytearray], object]) -> tuple[type, str] | None:
    """The exception ``call`` raises on a bytearray of b"0123456789", its message
    with "bytearray" read as "region"; None when it raises nothing."""
    try:
        call(bytearray(b"0123456789"))
    except Exception as exc:  # any exception is the answer
        return type(exc), str(exc).replace("bytearray", "region")
    return None


def region_error(region: Region, call: Callable[[Region], object]) -> tuple[type, str] | None:
    try:
        call(region)
    except Exception as exc:
        return type(exc), str(exc)
    return None


class Index:
    """An object with __index__ (as numpy integers have)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def outcome(call: Callable[[], object]) -> object:
    """What a call gives: its result, or the type of the exception it raised."""
    try:
        return call()
    except Exception as exc:
        return type(exc)
