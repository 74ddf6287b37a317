"""Emit machine code for ``int add(int a, int b)``, make it executable, call it.

Runs on x86-64 and arm64 (Linux): the two encodings are below.

    python examples/jit_add.py
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import struct

from mmap_alloc import MapAlloc


def add_code(machine: str) -> bytes:
    """The machine code of ``int add(int a, int b)`` for ``machine``."""
    if machine in ("x86_64", "amd64"):
        # System V AMD64 ABI: a in edi, b in esi, result in eax.
        return bytes(
            [
                0x89, 0xF8,  # mov eax, edi   (89 /r: r/m32 <- r32; ModRM 11 111 000)
                0x01, 0xF0,  # add eax, esi   (01 /r: r/m32 += r32; ModRM 11 110 000)
                0xC3,        # ret
            ]
        )  # fmt: skip
    if machine in ("aarch64", "arm64"):
        # AAPCS64: a in w0, b in w1, result in w0. Fixed 32-bit little-endian words.
        return struct.pack(
            "<2I",
            0x0B010000,  # add w0, w0, w1  (ADD shifted register, 32-bit: Rm=1, Rn=0, Rd=0)
            0xD65F03C0,  # ret             (RET x30)
        )
    raise SystemExit(f"jit_add: no encoding for {machine}; x86-64 and arm64 are known")


def main() -> None:
    # no options: the parser gives --help, and a stray argument is a usage error (exit 2)
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    machine = platform.machine().lower()
    code = add_code(machine)
    alloc = MapAlloc()  # read/write, not executable
    region = alloc.alloc(len(code))
    region[: len(code)] = code
    region.make_exec()  # read/exec (W^X), and the instruction cache is flushed
    add = region.function(ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int))
    print(f"{machine}: {len(code)} bytes of code at 0x{region.address:x} ({region.perms})")
    for a, b in ((2, 3), (40, 2), (-7, 7), (2**31 - 1, 1)):
        print(f"add({a}, {b}) = {add(a, b)}")
    assert add(2, 3) == 5
    del add  # a function pins its region: release it before freeing the region
    alloc.dealloc(region)


if __name__ == "__main__":
    main()
