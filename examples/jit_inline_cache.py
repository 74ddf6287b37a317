"""A patched inline cache: a call site re-linked 1,000 times while its function lives.

A dynamic language calls ``op(x)`` where the operation depends on the kind
of the receiver (square, double, negate, increment). The call site is one
direct branch to the code for the last kind it saw: a monomorphic inline
cache. On a miss the site is re-linked: its branch is rewritten, through
the code heap's read/write view, to the code for the new kind. The ctypes
function that calls the site is made once and stays alive the whole time;
no page is ever writable and executable, and no mprotect is made.

Runs on x86-64 (``jmp rel32``) and arm64 (``b imm26``), Linux:

    python examples/jit_inline_cache.py [--rewrites N] [--hits N] [--seed S]
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import random
import struct
import time
from collections.abc import Callable

from mmap_alloc import CodeHeap

MACHINE = platform.machine().lower()
X86_64 = MACHINE in ("x86_64", "amd64")
ARM64 = MACHINE in ("aarch64", "arm64")

IntFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)


def _wrap(n: int) -> int:
    """n as a C int (32-bit two's complement)."""
    return (n + (1 << 31)) % (1 << 32) - (1 << 31)


# What each kind computes, in Python: the reference every call is checked against.
KINDS: dict[str, Callable[[int], int]] = {
    "square": lambda x: _wrap(x * x),
    "double": lambda x: _wrap(2 * x),
    "negate": lambda x: _wrap(-x),
    "increment": lambda x: _wrap(x + 1),
}


def kind_code(kind: str) -> bytes:
    """``int f(int x)`` for a kind (x in edi / w0, result in eax / w0)."""
    if X86_64:
        return {
            "square": bytes([0x89, 0xF8, 0x0F, 0xAF, 0xC7, 0xC3]),  # mov eax, edi; imul eax, edi
            "double": bytes([0x8D, 0x04, 0x3F, 0xC3]),  # lea eax, [rdi + rdi]
            "negate": bytes([0x89, 0xF8, 0xF7, 0xD8, 0xC3]),  # mov eax, edi; neg eax
            "increment": bytes([0x8D, 0x47, 0x01, 0xC3]),  # lea eax, [rdi + 1]
        }[kind]  # each ends with ret (c3)
    word = {
        "square": 0x1B007C00,  # mul w0, w0, w0   (madd w0, w0, w0, wzr)
        "double": 0x0B000000,  # add w0, w0, w0
        "negate": 0x4B0003E0,  # neg w0, w0       (sub w0, wzr, w0)
        "increment": 0x11000400,  # add w0, w0, #1
    }[kind]
    return struct.pack("<2I", word, 0xD65F03C0)  # ...; ret


# The call site. x86-64: three nops, then jmp rel32, so that the 4-byte
# displacement sits at offset 4 (aligned: rewritten by one atomic store).
# arm64: one b imm26 instruction, rewritten whole (b is one of the
# instructions the architecture allows to be patched while other threads
# may be running it).
SITE_SIZE = 8 if X86_64 else 4
PATCH_AT = 4 if X86_64 else 0


def site_code(site: int, target: int) -> bytes:
    """The call site at address ``site``: a tail jump to ``target``."""
    if X86_64:
        rel = target - (site + 8)
        return bytes([0x90, 0x90, 0x90, 0xE9]) + struct.pack("<i", rel)
    rel = (target - site) >> 2
    return struct.pack("<I", 0x14000000 | (rel & 0x3FFFFFF))


def heap_views() -> list[str]:
    """The permissions of the code heap's mappings, as the kernel shows them."""
    with open("/proc/self/maps") as maps:
        return sorted(line.split()[1][:3] for line in maps if "mmap_alloc-codeheap" in line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rewrites", type=int, default=1000, help="re-links of the site")
    parser.add_argument("--hits", type=int, default=3, help="calls after each re-link")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    if args.rewrites < 1 or args.hits < 0:
        parser.error("--rewrites must be at least 1 and --hits at least 0")
    if not (X86_64 or ARM64):
        raise SystemExit(f"jit_inline_cache: no encodings for {MACHINE} (x86-64, arm64 only)")

    with CodeHeap(1 << 20) as heap:
        targets = {}
        for kind in KINDS:
            block = heap.alloc(16)
            block.write(kind_code(kind))
            targets[kind] = block
        site = heap.alloc(SITE_SIZE)
        cached = "square"
        site.write(site_code(site.address, targets[cached].address))
        call = site.function(IntFn)  # made once: alive across every rewrite

        rng = random.Random(args.seed)
        calls = checked = 0
        start = time.perf_counter()
        for _ in range(args.rewrites):
            kind = rng.choice([k for k in KINDS if k != cached])  # a miss: re-link the site
            patch = site_code(site.address, targets[kind].address)[PATCH_AT:]
            site.write(patch, PATCH_AT)  # through the rw- view; icache made coherent
            cached = kind
            for _ in range(1 + args.hits):
                x = rng.randrange(-50_000, 50_000)
                result = call(x)
                calls += 1
                if result != KINDS[kind](x):
                    raise SystemExit(f"{kind}({x}): the site returned {result}")
                checked += 1
        elapsed = time.perf_counter() - start

        views = heap_views()
        print(f"{MACHINE}: call site at 0x{site.address:x} ({SITE_SIZE} bytes)")
        print(
            f"{args.rewrites} rewrites of the call site, {calls} calls through one "
            f"function object; every result matched Python ({checked} checked)"
        )
        print(f"heap views in /proc/self/maps: {', '.join(views)}")
        if "rwx" in views:
            raise SystemExit("a view of the code heap is writable and executable")
        print(f"{elapsed / args.rewrites * 1e6:.1f} us per rewrite and its calls")
        del call  # a function pins its block: drop it before the heap closes


if __name__ == "__main__":
    main()
