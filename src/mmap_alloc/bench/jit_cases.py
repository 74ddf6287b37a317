"""Benchmark cases of the code heap: patching code without mprotect, and
calling code that lives in a CodeHeap against code in a Region.

A patch cycle is what a JIT does to rewrite live code: write 16 bytes, and
have them callable. With a CodeHeap that is one write through the
read/write view (the function made before stays valid). With a Region it is
the W^X flip: make_writable(), write, make_exec(), and, since a function
pins its region's EXEC, deleting the function first and making a new one
after (the last variant).
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import CodeHeap, MapAlloc
from .harness import Case, Variant

if TYPE_CHECKING:
    from .cases import Scale

_MACHINE = platform.machine().lower()
_IntOp = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)


def _add_code() -> bytes | None:
    """16 bytes: ``int add(int a, int b)`` padded with nops, or None for an
    architecture without an encoding here."""
    if _MACHINE in ("x86_64", "amd64"):
        return bytes([0x89, 0xF8, 0x01, 0xF0, 0xC3]) + b"\x90" * 11  # mov; add; ret; nops
    if _MACHINE in ("aarch64", "arm64"):
        nop = bytes([0x1F, 0x20, 0x03, 0xD5])
        return bytes([0x00, 0x00, 0x01, 0x0B, 0xC0, 0x03, 0x5F, 0xD6]) + nop * 2  # add; ret
    return None


def code_heap(scale: Scale) -> Iterator[Case]:
    """Case 9: a patch cycle (write 16 bytes + callable) on a CodeHeap against
    the make_writable/write/make_exec flip of a Region; and calling a
    function in each."""
    code = _add_code()
    if code is None:
        return
    heap = CodeHeap(1 << 20)
    block = heap.alloc(len(code))
    block.write(code)
    allocator = MapAlloc()
    region = allocator.alloc(len(code))
    region[: len(code)] = code
    region.make_exec()
    held = {"heap": block.function(_IntOp), "region": region.function(_IntOp)}

    def heap_patch(n: int) -> None:
        write = block.write
        for _ in range(n):
            write(code)  # callable as soon as it returns: held["heap"] stays valid

    def flip(n: int) -> None:
        fn = held.pop("region")
        del fn  # a function keeps EXEC on its region: it must go before the flip
        make_writable, make_exec = region.make_writable, region.make_exec
        try:
            for _ in range(n):
                make_writable()
                region[0:16] = code
                make_exec()
        finally:
            held["region"] = region.function(_IntOp)

    def flip_and_function(n: int) -> None:
        make_writable, make_exec, function = (
            region.make_writable,
            region.make_exec,
            region.function,
        )
        fn = held.pop("region")
        for _ in range(n):
            del fn
            make_writable()
            region[0:16] = code
            make_exec()
            fn = function(_IntOp)
        held["region"] = fn

    def call(name: str) -> Variant:
        def run(n: int) -> None:
            fn = held[name]
            for _ in range(n):
                fn(2, 3)

        return Variant(f"{'CodeHeap' if name == 'heap' else 'Region'} function", run)

    def close() -> None:
        held.clear()
        heap.close()
        allocator.dealloc(region)

    yield Case(
        "code patch cycle: write 16 bytes + callable",
        "code heap",
        scale.ops(5000),
        (
            Variant("CodeHeap write", heap_patch),
            Variant("Region make_writable+write+make_exec", flip),
            Variant("Region flip + new function", flip_and_function),
        ),
        target=0.5,
        note="dual mapping: no mprotect, functions stay alive",
    )
    yield Case(
        "call a function of 16 bytes of code",
        "code heap",
        scale.ops(100_000),
        (call("heap"), call("region")),
        target=1.05,
        note="ctypes call of add(2, 3)",
        close=close,
    )
