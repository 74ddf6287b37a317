"""Machine code for the tests, chosen by platform.machine(): x86-64 or arm64.

Each helper returns the bytes of a tiny function (System V AMD64 or AAPCS64
calling convention) and, where a test patches it, where the patch goes.
"""

from __future__ import annotations

import ctypes
import platform
import struct

import pytest

from support import emulated_skip

MACHINE = platform.machine().lower()
X86_64 = MACHINE in ("x86_64", "amd64")
ARM64 = MACHINE in ("aarch64", "arm64")
SUPPORTED = X86_64 or ARM64

needs_code = pytest.mark.skipif(not SUPPORTED, reason=f"no test encodings for {MACHINE}")

REWRITES_RUN_CODE = emulated_skip(
    "the emulator keeps running its translation of code that "
    "already ran when that code is rewritten through another mapping of the same memory "
    "(seen with qemu-user 7.2); this needs a real processor"
)
"""For tests that rewrite, through the heap's read/write view, code that already ran."""

IntOp = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)
IntFn = ctypes.CFUNCTYPE(ctypes.c_int)
LongFn = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long)


RET = b"\xc3" if X86_64 else struct.pack("<I", 0xD65F03C0)
"""A ``void f(void)`` that returns at once: ``ret`` (1 byte on x86-64, 4 on arm64)."""


def add() -> bytes:
    """``int add(int a, int b)``."""
    if X86_64:
        return bytes([0x89, 0xF8, 0x01, 0xF0, 0xC3])  # mov eax, edi; add eax, esi; ret
    return bytes([0x00, 0x00, 0x01, 0x0B, 0xC0, 0x03, 0x5F, 0xD6])  # add w0, w0, w1; ret


def sub() -> bytes:
    """``int sub(int a, int b)``: a - b."""
    if X86_64:
        return bytes([0x89, 0xF8, 0x29, 0xF0, 0xC3])  # mov eax, edi; sub eax, esi; ret
    return struct.pack("<2I", 0x4B010000, 0xD65F03C0)  # sub w0, w0, w1; ret


RETURN_PATCH_OFFSET = 4 if X86_64 else 0
"""Where the 4 bytes that ``returns(k)`` varies start (a multiple of 4)."""


def returns(k: int) -> bytes:
    """``int f(void)`` returning ``k`` (0 <= k < 65536): on x86-64 ``mov eax,
    imm32`` with its immediate at offset 4; on arm64 ``movz w0, #k``."""
    assert 0 <= k < 1 << 16
    if X86_64:
        return bytes([0x90, 0x90, 0x90, 0xB8]) + struct.pack("<I", k) + b"\xc3"
    return struct.pack("<2I", 0x52800000 | (k << 5), 0xD65F03C0)


def returns_patch(k: int) -> bytes:
    """The 4 bytes at RETURN_PATCH_OFFSET that make ``returns(...)`` return k."""
    return returns(k)[RETURN_PATCH_OFFSET : RETURN_PATCH_OFFSET + 4]


BRANCH_PATCH_OFFSET = 4 if X86_64 else 0
"""Where the 4 bytes of a branch site's target start (a multiple of 4)."""

BRANCH_SIZE = 8 if X86_64 else 4


def branch(site: int, target: int) -> bytes:
    """A tail jump from address ``site`` to ``target``: x86-64 three nops and
    ``jmp rel32`` (its displacement at offset 4), arm64 ``b imm26``."""
    if X86_64:
        rel = target - (site + 8)
        assert -(1 << 31) <= rel < 1 << 31
        return bytes([0x90, 0x90, 0x90, 0xE9]) + struct.pack("<i", rel)
    rel = target - site
    assert rel % 4 == 0 and -(1 << 27) <= rel < 1 << 27
    return struct.pack("<I", 0x14000000 | ((rel >> 2) & 0x3FFFFFF))


def branch_patch(site: int, target: int) -> bytes:
    """The 4 bytes at BRANCH_PATCH_OFFSET that send the site to ``target``."""
    return branch(site, target)[BRANCH_PATCH_OFFSET : BRANCH_PATCH_OFFSET + 4]


CALL_REACH = 1 << 31 if X86_64 else 1 << 27
"""How far a direct call reaches: x86-64 ``call rel32`` +-2 GiB, arm64 ``bl`` +-128 MiB."""


def call_near(site: int, target: int) -> bytes:
    """``long f(long x) { return target(x); }`` at address ``site``, calling
    ``target`` directly: x86-64 ``call rel32`` (the stack kept 16-byte aligned
    around the call), arm64 ``bl imm26`` (the frame record saved around it)."""
    if X86_64:
        rel = target - (site + 4 + 5)  # sub rsp, 8 is 4 bytes; the call ends 5 later
        assert -(1 << 31) <= rel < 1 << 31, "target out of rel32 reach"
        return (
            bytes([0x48, 0x83, 0xEC, 0x08])  # sub rsp, 8
            + b"\xe8"
            + struct.pack("<i", rel)  # call rel32
            + bytes([0x48, 0x83, 0xC4, 0x08, 0xC3])  # add rsp, 8; ret
        )
    rel = target - (site + 8)  # the bl is the third instruction
    assert rel % 4 == 0 and -(1 << 27) <= rel < 1 << 27, "target out of bl reach"
    return struct.pack(
        "<5I",
        0xA9BF7BFD,  # stp x29, x30, [sp, #-16]!
        0x910003FD,  # mov x29, sp
        0x94000000 | ((rel >> 2) & 0x3FFFFFF),  # bl target
        0xA8C17BFD,  # ldp x29, x30, [sp], #16
        0xD65F03C0,  # ret
    )


def libc_address(name: str) -> int:
    """The address of a libc function."""
    address = ctypes.cast(getattr(ctypes.CDLL(None), name), ctypes.c_void_p).value
    assert address is not None
    return address
