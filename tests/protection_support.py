"""Helpers shared by the protection tests (tests/test_protection_*.py):
permission shorthands, machine code for this machine, a child interpreter."""

from __future__ import annotations

import ctypes
import platform
import struct
import subprocess
import sys
import textwrap

import pytest

from mmap_alloc import Perm

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
RW, RX = R | W, R | X
NONE = Perm.NONE
MACHINE = platform.machine().lower()
IntFunction = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)


def machine_code(operation: str) -> bytes:
    """``int f(int a, int b)`` returning a + b, a - b, or nothing but ``ret``."""
    if MACHINE in ("x86_64", "amd64"):
        body = {"add": b"\x89\xf8\x01\xf0", "sub": b"\x89\xf8\x29\xf0", "ret": b""}
        return body[operation] + b"\xc3"
    if MACHINE in ("aarch64", "arm64"):
        words = {"add": [0x0B010000], "sub": [0x4B010000], "ret": []}[operation]
        return struct.pack(f"<{len(words) + 1}I", *words, 0xD65F03C0)
    pytest.skip(f"no machine code for {MACHINE} in these tests")


def run_child(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run Python code in a child process (for code that may crash on purpose)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
