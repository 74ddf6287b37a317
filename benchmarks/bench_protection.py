"""The cost of a W^X flip, and of calling code through region.function().

Compares, in one run, ``make_writable()`` + ``make_exec()`` with a bare pair of
mprotect calls through ctypes on a mapping of the same size, and a call of a
function from ``region.function()`` with a plain ctypes function for the same
address. Absolute times on a shared VM are noisy: read the ratios.

    python benchmarks/bench_protection.py [--pages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import time
from collections.abc import Callable

from mmap_alloc import MapAlloc

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
ADD = {
    "x86_64": bytes([0x89, 0xF8, 0x01, 0xF0, 0xC3]),
    "aarch64": bytes.fromhex("0000010bc0035fd6"),
}


def best(action: Callable[[], object], number: int, rounds: int) -> float:
    """The shortest time of one call of ``action`` over ``rounds`` rounds of ``number``."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(number):
            action()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1, help="size of the region in pages")
    parser.add_argument("--number", type=int, default=20_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds to take the best of")
    args = parser.parse_args()

    libc = ctypes.CDLL(None, use_errno=True)
    mprotect = libc.mprotect
    mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    mprotect.restype = ctypes.c_int

    alloc = MapAlloc()
    size = args.pages * alloc.page_size
    ours = alloc.alloc(size)
    bare = alloc.alloc(size)
    ours[:] = bytes(size)  # fault the pages in: both mappings are resident
    bare[:] = bytes(size)
    address = bare.address
    rw, rx = PROT_READ | PROT_WRITE, PROT_READ | PROT_EXEC

    def flip_ours() -> None:
        ours.make_writable()
        ours.make_exec()

    def flip_bare() -> None:
        mprotect(address, size, rw)
        mprotect(address, size, rx)

    # Interleave the two, so that drift on a shared machine hits both alike.
    t_ours, t_bare = [], []
    for _ in range(args.rounds):
        t_ours.append(best(flip_ours, args.number, 1))
        t_bare.append(best(flip_bare, args.number, 1))
    flip, raw = min(t_ours), min(t_bare)
    print(f"W^X flip, {args.pages} page(s), best of {args.rounds} x {args.number}:")
    print(f"  region.make_writable() + make_exec(): {flip * 1e6:7.2f} us")
    print(f"  two ctypes mprotect() calls         : {raw * 1e6:7.2f} us")
    print(f"  ratio                               : {flip / raw:7.2f}x")

    code = ADD.get(platform.machine().lower())
    if code is not None:
        ours.make_writable()
        ours[: len(code)] = code
        ours.make_exec()
        prototype = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)
        pinned = ours.function(prototype)
        plain = prototype(ours.address)
        t_pinned, t_plain = [], []
        for _ in range(args.rounds):
            t_pinned.append(best(lambda: pinned(2, 3), args.number, 1))
            t_plain.append(best(lambda: plain(2, 3), args.number, 1))
        print("call of int add(int, int):")
        print(f"  region.function()       : {min(t_pinned) * 1e9:7.1f} ns")
        print(f"  plain ctypes function   : {min(t_plain) * 1e9:7.1f} ns")
        print(f"  ratio                   : {min(t_pinned) / min(t_plain):7.2f}x")
        del pinned, plain

    ours.close()
    bare.close()


if __name__ == "__main__":
    main()
