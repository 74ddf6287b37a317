"""Helpers shared by the code heap tests (tests/test_jit_*.py): the size of a
small heap, and what the kernel says of a heap's two views. The ``heap``
fixture is in conftest.py."""

from __future__ import annotations

from mmap_alloc import CodeHeap, Perm
from mmap_alloc._linux import Mapping, mappings
from mmap_alloc.jit import MEMFD_NAME

RW = Perm.READ | Perm.WRITE
RX = Perm.READ | Perm.EXEC
RWX = Perm.READ | Perm.WRITE | Perm.EXEC
SMALL = 64 << 10


def heap_views(heap: CodeHeap, maps: list[Mapping] | None = None) -> list[tuple[int, int, Perm]]:
    """(start, end, perms) of every mapping of the heap's two views, from the kernel."""
    spans = [
        (heap.address, heap.address + heap.capacity),
        (heap._writable_address, heap._writable_address + heap.capacity),
    ]
    return [
        (m.start, m.end, m.perms)
        for m in (mappings() if maps is None else maps)
        if any(m.start < end and start < m.end for start, end in spans)
    ]


def assert_never_rwx(maps: list[Mapping] | None = None) -> None:
    """No code heap mapping of this process is writable and executable."""
    heaps = [m for m in (mappings() if maps is None else maps) if MEMFD_NAME in m.name]
    assert all(m.perms != RWX for m in heaps), heaps
    assert all(m.perms in (RW, RX) for m in heaps), heaps
