"""Argument checks shared by the public modules: one message per mistake."""

from __future__ import annotations

import operator
import sys

from .exceptions import AllocError

MAX_SIZE = sys.maxsize
"""The largest byte count a mapping can be asked for."""


def integer(value: object, name: str) -> int:
    """``value`` as an int; TypeError for bools, floats, strings, None."""
    if type(value) is int:
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None


def size(value: object, page: int, name: str = "size") -> int:
    """A positive byte count that whole pages of ``page`` bytes can hold.

    Sizes no address space can hold are an AllocError, as the kernel's own
    refusal would be.
    """
    n = integer(value, name)
    if n <= 0:
        raise ValueError(f"{name} must be positive, got {n}")
    if n > MAX_SIZE + 1 - page:
        raise AllocError(f"{name}={n} exceeds the address space", size=n)
    return n


def power_of_two(value: object, name: str) -> int:
    """A positive power of two."""
    n = integer(value, name)
    if n <= 0 or n & (n - 1):
        raise ValueError(f"{name} must be a positive power of two, got {n}")
    return n
