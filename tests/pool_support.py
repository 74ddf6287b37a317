"""Helpers shared by the pool tests (tests/test_pool_*.py): a pattern per seed,
raw reads and writes at an address. The ``pool`` fixture is in conftest.py."""

from __future__ import annotations

import ctypes

MiB = 1 << 20


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ for every seed."""
    unit = seed.to_bytes(8, "little")
    return (unit * (size // 8 + 1))[:size]


def write(address: int, data: bytes) -> None:
    ctypes.memmove(address, data, len(data))


def read(address: int, size: int) -> bytes:
    return ctypes.string_at(address, size)
