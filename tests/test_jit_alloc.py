"""CodeHeap: one memfd mapped read/write and read/exec; blocks, pins, patching.

Pins and exports, allocation, closing, bad input, and a randomised run."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jit_support import SMALL, assert_never_rwx, heap_views
from machine_code import IntFn, IntOp, add, needs_code
from mmap_alloc import AllocError, CodeBlock, CodeHeap, CodeHeapStats, _mman
from mmap_alloc._linux import PAGE_SIZE, mappings
from mmap_alloc.jit import MEMFD_NAME
from mmap_alloc.protection import CODE_ALIGN

# ---------------------------------------------------------------- pins and exports


@needs_code
def test_a_function_pins_its_block_until_it_dies(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(add())
    fn = block.function(IntOp)
    assert block._pins == 1
    with pytest.raises(BufferError, match=r"1 function\(s\) made by block.function\(\)"):
        heap.free(block)
    with pytest.raises(BufferError, match="delete them first"):
        block.close()
    with pytest.raises(BufferError, match="cannot close the code heap"):
        heap.close()
    assert fn(1, 2) == 3 and not block.closed and not heap.closed
    del fn
    assert block._pins == 0
    heap.free(block)
    assert block.closed


@needs_code
def test_the_function_type_subclasses_the_prototype_and_says_where_it_lives(
    heap: CodeHeap,
) -> None:
    block = heap.alloc(32)
    block.write(add(), 16)
    fn = block.function(IntOp, 16)
    assert isinstance(fn, IntOp)
    assert fn.block is block  # type: ignore[attr-defined]
    assert fn.offset == 16  # type: ignore[attr-defined]
    assert ctypes.cast(fn, ctypes.c_void_p).value == block.address + 16
    assert fn(20, 22) == 42


@needs_code
def test_two_functions_hold_two_pins_each_released_once(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(add())
    first, second = block.function(IntOp), block.function(IntOp)
    assert block._pins == 2
    del first
    assert block._pins == 1
    with pytest.raises(BufferError):
        heap.free(block)
    del second
    gc.collect()
    assert block._pins == 0


def test_a_writer_view_exports_its_block_until_released(heap: CodeHeap) -> None:
    block = heap.alloc(32)
    with block.writer() as view:
        assert len(view) == 32 and not view.readonly
        assert block._exports == 1
        with pytest.raises(BufferError, match=r"block\.writer"):
            heap.free(block)
        with pytest.raises(BufferError, match="cannot close the code heap"):
            heap.close()
        view[:4] = b"\x01\x02\x03\x04"
    assert block._exports == 0
    with pytest.raises(ValueError, match="released"):
        view[0]
    assert ctypes.string_at(block.address, 4) == b"\x01\x02\x03\x04"
    heap.free(block)


def test_a_buffer_made_from_the_writer_view_keeps_the_block_exported(heap: CodeHeap) -> None:
    block = heap.alloc(32)
    with pytest.raises(BufferError, match="still alive"), block.writer() as view:
        array = (ctypes.c_ubyte * 32).from_buffer(view)
    array[0] = 7
    assert block._exports == 1
    with pytest.raises(BufferError):
        heap.free(block)
    del array, view
    gc.collect()
    assert block._exports == 0
    heap.free(block)


def test_a_slice_of_the_writer_view_kept_past_the_block_is_a_buffer_error(
    heap: CodeHeap,
) -> None:
    block = heap.alloc(32)
    kept: list[memoryview] = []
    with (
        pytest.raises(BufferError, match="not made visible to instruction fetch"),
        block.writer() as view,
    ):
        kept.append(view[:8])
    assert block._exports == 1  # the slice still holds the block: it cannot be freed
    with pytest.raises(BufferError):
        heap.free(block)
    kept.pop().release()
    gc.collect()
    assert block._exports == 0
    heap.free(block)


def test_a_writer_cannot_be_entered_twice_at_once(heap: CodeHeap) -> None:
    writer = heap.alloc(16).writer()
    with writer, pytest.raises(RuntimeError, match="in use"), writer:
        pass


# ---------------------------------------------------------------- allocation


def test_blocks_are_aligned_and_never_overlap(heap: CodeHeap) -> None:
    rng = random.Random(5)
    blocks = []
    for _ in range(60):
        align = 1 << rng.randrange(0, 9)
        block = heap.alloc(rng.randrange(1, 300), align)
        assert block.address % max(align, 16) == 0
        blocks.append(block)
    spans = sorted((b.offset, b.offset + b.size) for b in blocks)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


def test_a_full_heap_raises_alloc_error(heap: CodeHeap) -> None:
    block = heap.alloc(SMALL)
    with pytest.raises(AllocError, match="the code heap is full") as info:
        heap.alloc(16)
    assert info.value.size == 16
    with pytest.raises(AllocError, match="does not fit in a code heap"):
        heap.alloc(SMALL + 1)
    heap.free(block)
    heap.alloc(SMALL).close()


def test_freed_runs_coalesce_so_a_large_block_fits_again(heap: CodeHeap) -> None:
    blocks = [heap.alloc(1024) for _ in range(SMALL // 1024)]
    with pytest.raises(AllocError):
        heap.alloc(16)
    for block in blocks[1:-1:2]:
        heap.free(block)  # holes between live blocks
    with pytest.raises(AllocError):
        heap.alloc(2048)
    for block in blocks[2:-1:2]:
        heap.free(block)  # the holes join
    big = heap.alloc(SMALL - 2048)
    assert big.offset == 1024
    assert heap.stats().fragments == 0


def test_the_bump_pointer_comes_down_when_the_top_block_is_freed(heap: CodeHeap) -> None:
    a, b = heap.alloc(100), heap.alloc(100)
    heap.free(b)
    heap.free(a)
    assert heap._spans() == [(0, SMALL)]


def test_first_fit_reuses_a_freed_run(heap: CodeHeap) -> None:
    a, _b = heap.alloc(64), heap.alloc(64)
    heap.free(a)
    assert heap.alloc(48).offset == 0


@needs_code
def test_freed_bytes_read_as_zero_in_the_next_block(heap: CodeHeap) -> None:
    block = heap.alloc(64)
    block.write(b"\xff" * 64)
    offset = block.offset
    block.close()
    again = heap.alloc(64)
    assert again.offset == offset
    assert ctypes.string_at(again.address, 64) == bytes(64)


def test_a_dropped_block_gives_its_range_back(heap: CodeHeap) -> None:
    heap.alloc(128)  # dropped at once
    assert heap.stats().blocks == 0
    assert heap._spans() == [(0, SMALL)]


def test_stats_count_blocks_bytes_runs_pins_and_exports(heap: CodeHeap) -> None:
    a, b, c = heap.alloc(10), heap.alloc(100), heap.alloc(1000)
    heap.free(b)
    with a.writer():
        stats = heap.stats()
    assert stats == CodeHeapStats(
        capacity=SMALL,
        used=16 + 1008,
        free=SMALL - 1024,
        blocks=2,
        largest_free=SMALL - (16 + 112 + 1008),
        fragments=1,
        pinned=0,
        exported=1,
    )
    c.close()


def test_block_properties_and_repr(heap: CodeHeap) -> None:
    block = heap.alloc(20)
    assert isinstance(block, CodeBlock)
    assert block.heap is heap
    assert block.size == 20
    assert block.address == heap.address + block.offset
    assert repr(block) == f"<CodeBlock address=0x{block.address:x} size=20>"
    block.close()
    assert repr(block) == "<CodeBlock freed size=20>"
    assert "blocks=0" in repr(heap)


def test_a_block_is_a_context_manager_that_frees_it(heap: CodeHeap) -> None:
    with heap.alloc(16) as block:
        assert not block.closed
    assert block.closed


# ---------------------------------------------------------------- closing


def test_closing_the_heap_frees_every_block_and_unmaps_both_views() -> None:
    heap = CodeHeap(SMALL)
    rx, rw = heap.address, heap._writable_address
    block = heap.alloc(16)
    heap.close()
    assert heap.closed and block.closed
    assert not any(m.start < rx + SMALL and rx < m.end for m in mappings())
    assert not any(m.start < rw + SMALL and rw < m.end for m in mappings())
    with pytest.raises(ValueError, match="code heap is closed"):
        block.address  # noqa: B018
    with pytest.raises(ValueError, match="code heap is closed"):
        block.write(b"x")
    with pytest.raises(ValueError, match="code heap is closed"):
        heap.alloc(16)
    block.close()  # nothing to do
    heap.close()  # nothing to do
    assert repr(heap) == "<CodeHeap closed capacity=64 KiB>"


def test_a_heap_is_a_context_manager_that_closes_it() -> None:
    with CodeHeap(SMALL) as heap:
        heap.alloc(16)
    assert heap.closed


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("size", "error", "match"),
    [
        (0, ValueError, "size must be positive, got 0"),
        (-5, ValueError, "size must be positive, got -5"),
        (1.5, TypeError, "size must be an integer, not float"),
        (True, TypeError, "size must be an integer, not bool"),
    ],
)
def test_alloc_refuses_bad_sizes(heap: CodeHeap, size: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        heap.alloc(size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("align", "error", "match"),
    [
        (3, ValueError, "align must be a positive power of two, got 3"),
        (0, ValueError, "align must be a positive power of two, got 0"),
        (-16, ValueError, "align must be a positive power of two"),
        (2 * PAGE_SIZE, ValueError, "align must be at most the page size"),
        ("16", TypeError, "align must be an integer, not str"),
    ],
)
def test_alloc_refuses_bad_alignments(
    heap: CodeHeap, align: object, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        heap.alloc(16, align)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("capacity", "error", "match"),
    [
        (0, ValueError, "capacity must be positive, got 0"),
        (-1, ValueError, "capacity must be positive, got -1"),
        ("1", TypeError, "capacity must be an integer, not str"),
    ],
)
def test_a_heap_refuses_bad_capacities(capacity: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CodeHeap(capacity)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"near": "0x1000"}, TypeError, "near must be an integer, not str"),
        ({"near": 1.0}, TypeError, "near must be an integer, not float"),
        ({"near": -1}, ValueError, "near must be an address from 0"),
        ({"near": 1 << 64}, ValueError, "near must be an address from 0"),
        ({"near": 1 << 40, "within": 0}, ValueError, "within must be positive, got 0"),
        ({"near": 1 << 40, "within": -8}, ValueError, "within must be positive, got -8"),
        ({"within": 1 << 20}, TypeError, "within= needs near="),
    ],
)
def test_a_heap_refuses_bad_placement(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CodeHeap(SMALL, **kwargs)  # type: ignore[arg-type]


def test_write_refuses_what_does_not_fit_or_is_not_bytes(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    with pytest.raises(ValueError, match="17 bytes at offset 0 do not fit in the block's 16"):
        block.write(bytes(17))
    with pytest.raises(ValueError, match="2 bytes at offset 15 do not fit"):
        block.write(b"ab", 15)
    with pytest.raises(ValueError, match="offset must not be negative"):
        block.write(b"a", -1)
    with pytest.raises(TypeError, match="data must be a bytes-like object, not str"):
        block.write("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="offset must be an integer, not float"):
        block.write(b"a", 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'where'"):
        block.write(b"a", where=1)  # type: ignore[call-arg]
    block.write(b"")  # nothing to do
    block.write(data=b"ab", offset=14)
    assert ctypes.string_at(block.address + 14, 2) == b"ab"


def test_freed_blocks_refuse_every_use(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    heap.free(block)
    with pytest.raises(ValueError, match="the block was already freed"):
        heap.free(block)
    for use in (
        lambda: block.write(b"x"),
        lambda: block.address,
        lambda: block.function(IntFn),
        lambda: block.writer().__enter__(),
    ):
        with pytest.raises(ValueError, match="block is freed"):
            use()


def test_free_refuses_foreign_blocks_and_other_objects(heap: CodeHeap) -> None:
    with CodeHeap(SMALL) as other:
        block = other.alloc(16)
        with pytest.raises(ValueError, match="belongs to another code heap"):
            heap.free(block)
        block.close()
    with pytest.raises(TypeError, match="expected a CodeBlock, not int"):
        heap.free(123)  # type: ignore[arg-type]


def test_function_refuses_bad_prototypes_and_offsets(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    with pytest.raises(TypeError, match="prototype must be a ctypes function type"):
        block.function(ctypes.c_int)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="offset 16 lies outside the block"):
        block.function(IntFn, 16)
    with pytest.raises(ValueError, match="offset must not be negative"):
        block.function(IntFn, -4)
    if CODE_ALIGN > 1:
        with pytest.raises(ValueError, match=f"must be a multiple of {CODE_ALIGN}"):
            block.function(IntFn, 2)
    assert block._pins == 0


def test_blocks_and_pins_are_made_by_the_heap_only(heap: CodeHeap) -> None:
    with pytest.raises(TypeError, match=r"blocks are made by CodeHeap\.alloc"):
        CodeBlock()
    with pytest.raises(TypeError, match=r"pins are made by Region\.function\(\) and CodeBlock"):
        _mman.Pin()
    with pytest.raises(ValueError, match="open already"):
        heap._open(SMALL, 1, MEMFD_NAME, 0, CodeBlock)
    unopened = _mman.CodeHeap()
    with pytest.raises(ValueError, match="not open"):
        unopened._alloc(16, 16)


# ---------------------------------------------------------------- a randomised run

OPS = st.lists(
    st.tuples(
        st.sampled_from(["alloc", "free", "write", "pin", "unpin", "writer", "close_block"]),
        st.integers(0, 1 << 16),
    ),
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_no_view_is_ever_writable_and_executable(ops: list[tuple[str, int]]) -> None:
    """After every operation of a random run: no mapping of the heap is rwx,
    the kernel shows both views as they were made, every block reads back
    what was written, and no two blocks overlap."""
    with CodeHeap(SMALL) as heap:
        views = heap_views(heap)
        blocks: list[tuple[CodeBlock, bytes]] = []
        functions: list[object] = []
        for op, n in ops:
            if op == "alloc":
                with contextlib.suppress(AllocError):
                    blocks.append((heap.alloc(1 + n % 4000, 1 << (n % 8)), b""))
            elif blocks:
                i = n % len(blocks)
                block, data = blocks[i]
                if op == "free" and block._pins == 0:
                    heap.free(block)
                    del blocks[i]
                elif op == "close_block" and block._pins == 0:
                    block.close()
                    del blocks[i]
                elif op == "write":
                    data = random.Random(n).randbytes(min(block.size, 1 + n % 64))
                    block.write(data)
                    blocks[i] = (block, data)
                elif op == "writer":
                    data = bytes([n & 0xFF]) * min(block.size, 8)
                    with block.writer() as view:
                        view[: len(data)] = data
                    blocks[i] = (block, data)
                elif op == "pin":
                    functions.append(block.function(IntFn))
                elif op == "unpin" and functions:
                    functions.pop(n % len(functions))
            maps = mappings()
            assert_never_rwx(maps)
            assert heap_views(heap, maps) == views
            for block, data in blocks:
                assert ctypes.string_at(block.address, len(data)) == data
            spans = sorted((b.offset, b.offset + b.size) for b, _ in blocks)
            assert all(x[1] <= y[0] for x, y in itertools.pairwise(spans))
        functions.clear()
        stats = heap.stats()
        assert stats.blocks == len(blocks)
        assert stats.used == sum(-(-b.size // 16) * 16 for b, _ in blocks)
        for block, _ in blocks:
            block.close()
