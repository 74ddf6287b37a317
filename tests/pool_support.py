"""Helpers shared by the pool tests (tests/test_pool_*.py): a pattern per seed,
raw reads and writes at an address, a collection inside a call. The ``pool``
fixture is in conftest.py."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")

MiB = 1 << 20


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ for every seed."""
    unit = seed.to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def write(address: int, data: bytes) -> None:
    ctypes.memmove(address, data, len(data))


def read(address: int, size: int) -> bytes:
    return ctypes.string_at(address, size)


collects_inside_calls = pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="from 3.12 the collector runs only between bytecodes, never inside a C call",
)
"""For tests of a collection that starts inside a pool method (3.11: any
allocation of a tracked object may start one)."""


def collecting(call: Callable[[], T], meddle: Callable[[], object]) -> T:
    """``call()`` with the collector's threshold at 1, so that the first
    tracked object it allocates starts a collection, whose callback runs
    ``meddle()`` once."""
    armed = [True]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and armed[0]:
            armed[0] = False
            meddle()

    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    try:
        return call()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)
