"""CodeHeap: one memfd mapped read/write and read/exec; blocks, pins, patching."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import random
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machine_code import (
    BRANCH_PATCH_OFFSET,
    BRANCH_SIZE,
    CALL_REACH,
    RETURN_PATCH_OFFSET,
    REWRITES_RUN_CODE,
    IntFn,
    IntOp,
    LongFn,
    add,
    branch,
    branch_patch,
    call_near,
    libc_address,
    needs_code,
    returns,
    returns_patch,
    sub,
)
from mmap_alloc import AllocError, CodeBlock, CodeHeap, CodeHeapStats, Perm, _mman
from mmap_alloc._linux import PAGE_SIZE, Mapping, mappings
from mmap_alloc.jit import MEMFD_NAME
from mmap_alloc.protection import CODE_ALIGN
from support import SIGSEGV, run_forked, run_in_child, run_in_pid_namespace

RW = Perm.READ | Perm.WRITE
RX = Perm.READ | Perm.EXEC
RWX = Perm.READ | Perm.WRITE | Perm.EXEC
SMALL = 64 << 10


@pytest.fixture
def heap() -> Iterator[CodeHeap]:
    heap = CodeHeap(SMALL)
    yield heap
    try:
        heap.close()
    except BufferError:  # a function held by a failed test's traceback
        gc.collect()
        heap.close()


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


# ---------------------------------------------------------------- the two views


def test_a_heap_maps_one_memfd_twice_read_write_and_read_exec(heap: CodeHeap) -> None:
    views = heap_views(heap)
    assert sorted(perms for _, _, perms in views) == sorted([RW, RX])
    rx = next(v for v in views if v[2] == RX)
    rw = next(v for v in views if v[2] == RW)
    assert rx == (heap.address, heap.address + SMALL, RX)
    assert rw == (heap._writable_address, heap._writable_address + SMALL, RW)
    names = {m.name for m in mappings() if m.start in (heap.address, heap._writable_address)}
    assert names == {f"/memfd:{MEMFD_NAME} (deleted)"}


def test_capacity_rounds_up_to_whole_pages() -> None:
    with CodeHeap(1) as heap:
        assert heap.capacity == PAGE_SIZE


def test_the_default_capacity_is_64_mib() -> None:
    with CodeHeap() as heap:
        assert heap.capacity == 64 << 20


def test_a_heap_counts_both_views_as_mapped_bytes() -> None:
    before = _mman.mapped_bytes()
    heap = CodeHeap(SMALL)
    assert _mman.mapped_bytes() == before + 2 * SMALL
    heap.close()
    assert _mman.mapped_bytes() == before


def test_a_heap_is_unmapped_when_garbage_collected() -> None:
    before = _mman.mapped_bytes()
    heap = CodeHeap(SMALL)
    block = heap.alloc(16)
    del heap
    assert _mman.mapped_bytes() == before + 2 * SMALL  # the block holds its heap
    del block
    assert _mman.mapped_bytes() == before


@needs_code
def test_code_written_through_the_write_view_runs_at_the_block_address(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(add())
    assert ctypes.string_at(block.address, len(add())) == add()
    fn = block.function(IntOp)
    assert fn(2, 3) == 5
    assert fn(40, 2) == 42


@needs_code
def test_writing_to_the_exec_view_kills_with_sigsegv(heap: CodeHeap) -> None:
    block = heap.alloc(16)

    def body() -> None:
        ctypes.memmove(block.address, b"\xcc", 1)

    assert run_in_child(body) == SIGSEGV


@needs_code
def test_running_code_in_the_write_view_kills_with_sigsegv(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(add())
    writable = heap._writable_address + block.offset

    def body() -> None:
        IntOp(writable)(1, 2)

    assert run_in_child(body) == SIGSEGV


# ---------------------------------------------------------------- patching


@needs_code
@REWRITES_RUN_CODE
def test_a_thousand_patches_are_each_seen_by_the_living_function(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(returns(0))
    fn = block.function(IntFn)
    for k in range(1, 1001):
        block.write(returns_patch(k), RETURN_PATCH_OFFSET)
        assert fn() == k
    assert_never_rwx()


@needs_code
@REWRITES_RUN_CODE
def test_patches_through_the_writer_are_seen_by_the_living_function(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(add())
    fn = block.function(IntOp)
    assert fn(7, 5) == 12
    with block.writer() as view:
        view[: len(sub())] = sub()
    assert fn(7, 5) == 2


@needs_code
@REWRITES_RUN_CODE
def test_a_thousand_branch_patches_while_another_thread_calls(heap: CodeHeap) -> None:
    """A call site rewritten 1,000 times while a second thread keeps calling
    it: every call from either thread lands on one of the targets, and each
    patch is seen by the next call of the patching thread."""
    targets = []
    for k in range(4):
        target = heap.alloc(16)
        target.write(returns(100 + k))
        targets.append(target)
    site = heap.alloc(BRANCH_SIZE)
    site.write(branch(site.address, targets[0].address))
    call = site.function(IntFn)
    stop = threading.Event()
    seen: list[int] = []

    def caller() -> None:
        while not stop.is_set():
            seen.append(call())

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        for i in range(1000):
            k = (i + 1) % 4
            site.write(branch_patch(site.address, targets[k].address), BRANCH_PATCH_OFFSET)
            assert call() == 100 + k
    finally:
        stop.set()
        thread.join(timeout=60)
    assert seen, "the second thread made no call"
    assert set(seen) <= {100, 101, 102, 103}


@needs_code
def test_a_branch_site_reaches_each_target(heap: CodeHeap) -> None:
    """The encodings the patching tests use: each fresh site, written once,
    lands on its target (this also runs under an emulator)."""
    # kept: a freed block's place would be reused, and its code ran already
    blocks: list[CodeBlock] = []
    for k in range(4):
        target = heap.alloc(16)
        target.write(returns(200 + k))
        site = heap.alloc(BRANCH_SIZE)
        site.write(branch(site.address, target.address))
        call = site.function(IntFn)
        assert call() == 200 + k
        del call
        blocks += (target, site)


@needs_code
def test_code_written_before_its_first_call_runs_patched(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(returns(0))
    fn = block.function(IntFn)
    block.write(returns_patch(4321), RETURN_PATCH_OFFSET)  # patched while `fn` lives
    assert fn() == 4321


@needs_code
def test_patching_does_not_change_the_views_protection(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(returns(1))
    before = heap_views(heap)
    fn = block.function(IntFn)
    block.write(returns_patch(2), RETURN_PATCH_OFFSET)
    assert fn() == 2
    assert heap_views(heap) == before


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


# ---------------------------------------------------------------- near


@needs_code
def test_a_heap_near_libc_lies_within_reach_of_it() -> None:
    target = libc_address("labs")
    with CodeHeap(SMALL, near=target) as heap:
        assert target - (1 << 31) < heap.address
        assert heap.address + heap.capacity <= target + (1 << 31)
        views = heap_views(heap)
        assert sorted(perms for _, _, perms in views) == sorted([RW, RX])


@needs_code
def test_code_in_a_heap_near_libc_calls_it_directly() -> None:
    """call rel32 on x86-64, bl on arm64: the heap lies within the call's reach."""
    target = libc_address("labs")
    with CodeHeap(SMALL, near=target, within=CALL_REACH) as heap:
        block = heap.alloc(32)
        block.write(call_near(block.address, target))
        labs = block.function(LongFn)
        assert labs(-42) == 42
        assert labs(7) == 7
        del labs


def test_a_heap_refuses_a_window_that_is_all_taken(heap: CodeHeap) -> None:
    inside = heap.address + SMALL // 2  # the window lies inside the heap's own mapping
    with pytest.raises(AllocError, match="no free range of 65536 bytes lies less than"):
        CodeHeap(SMALL, near=inside, within=PAGE_SIZE)


# ---------------------------------------------------------------- fork


@needs_code
def test_a_forked_child_runs_the_code_but_may_not_write_or_allocate(heap: CodeHeap) -> None:
    block = heap.alloc(16)
    block.write(add())
    fn = block.function(IntOp)

    def child() -> None:
        assert fn(2, 2) == 4
        with pytest.raises(RuntimeError, match="made before fork"):
            block.write(sub())
        with pytest.raises(RuntimeError, match="made before fork"):
            heap.alloc(16)
        with pytest.raises(RuntimeError, match="made before fork"):
            block.writer().__enter__()

    run_forked(child)
    assert fn(2, 2) == 4


@needs_code
def test_a_forked_child_freeing_blocks_leaves_the_parents_code_alone(heap: CodeHeap) -> None:
    """The child shares the heap's pages: its frees must not zero the code
    the parent runs (a freed block is zeroed in the heap's own process only)."""
    block = heap.alloc(16)
    block.write(add())

    def child() -> None:
        heap.free(block)
        assert block.closed

    run_forked(child)
    assert ctypes.string_at(block.address, len(add())) == add()
    fn = block.function(IntOp)
    assert fn(2, 3) == 5
    del fn


# ---------------------------------------------------------------- re-entrancy


class Evil:
    """An integer whose ``__index__`` runs ``action`` first."""

    def __init__(self, value: int, action: Callable[[], object]) -> None:
        self.value = value
        self.action = action

    def __index__(self) -> int:
        self.action()
        return self.value


@pytest.mark.parametrize("action", ["close heap", "free block"])
@pytest.mark.parametrize("call", ["write offset", "function offset", "alloc size", "alloc align"])
def test_an_index_that_frees_or_closes_mid_call_cannot_crash(action: str, call: str) -> None:
    def body() -> None:
        heap = CodeHeap(SMALL)
        block = heap.alloc(32)
        act = heap.close if action == "close heap" else block.close
        calls: dict[str, Callable[[], object]] = {
            "write offset": lambda: block.write(b"abcd", Evil(4, act)),  # type: ignore[arg-type]
            "function offset": lambda: block.function(IntFn, Evil(0, act)),  # type: ignore[arg-type]
            "alloc size": lambda: heap.alloc(Evil(16, act)),  # type: ignore[arg-type]
            "alloc align": lambda: heap.alloc(16, Evil(16, act)),  # type: ignore[arg-type]
        }
        try:
            result = calls[call]()
        except ValueError as exc:
            assert "closed" in str(exc) or "freed" in str(exc)
        else:  # done before the block or heap went away: it must still be sound
            assert isinstance(result, CodeBlock) and not heap.closed

    run_forked(body)


def _signal_storm() -> None:
    """Runs in a child: SIGALRM at random moments, its handler freeing,
    writing and allocating blocks while the main loop does the same."""
    rng = random.Random(1234)
    heap = CodeHeap(SMALL)
    blocks: list[CodeBlock] = []
    calls = {"handler": 0, "refused": 0}

    def handler(signum: int, frame: object) -> None:
        calls["handler"] += 1
        try:
            choice = rng.randrange(3)
            if choice == 0 and blocks:
                heap.free(blocks.pop(rng.randrange(len(blocks))))
            elif choice == 1 and blocks:
                block = blocks[rng.randrange(len(blocks))]
                block.write(rng.randbytes(min(block.size, 8)))
            else:
                blocks.append(heap.alloc(rng.randrange(1, 200)))
        except (ValueError, BufferError, AllocError):
            calls["refused"] += 1

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0003)
    try:
        for _ in range(20_000):
            try:
                block = heap.alloc(rng.randrange(1, 500), 1 << rng.randrange(0, 7))
                blocks.append(block)
                block.write(rng.randbytes(min(block.size, 16)), 0)
                if len(blocks) > 50:
                    heap.free(blocks.pop(0))
            except (ValueError, BufferError, AllocError, IndexError):
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert calls["handler"] > 10, calls
    spans = sorted((b.offset, b.offset + b.size) for b in blocks if not b.closed)
    assert all(x[1] <= y[0] for x, y in itertools.pairwise(spans))
    stats = heap.stats()
    assert stats.blocks == len(spans)
    free = sum(hi - lo for lo, hi in heap._spans())
    assert stats.used + free == SMALL
    blocks.clear()
    heap.close()


def test_signal_handlers_freeing_and_writing_mid_call_cannot_crash() -> None:
    run_forked(_signal_storm, timeout=120)


# ---------------------------------------------------------------- vm.memfd_noexec


@pytest.mark.parametrize("value", [1, 2])
def test_vm_memfd_noexec_in_a_pid_namespace(value: int) -> None:
    """vm.memfd_noexec = 2 makes CodeHeap() a PermissionError naming it, and
    never a fallback to rwx memory; 1 (noexec unless MFD_EXEC) still works."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    if not Path("/proc/sys/vm/memfd_noexec").exists():
        pytest.skip("kernel before 6.3: no vm.memfd_noexec")
    code = (
        f"open('/proc/sys/vm/memfd_noexec', 'w').write('{value}')\n"
        "from mmap_alloc import CodeHeap, _mman\n"
        "try:\n"
        "    heap = CodeHeap(1 << 16)\n"
        "except PermissionError as exc:\n"
        "    print('refused', exc.errno, exc)\n"
        "else:\n"
        "    print('made', heap)\n"
        "    heap.close()\n"
        "print('mapped', _mman.mapped_bytes())\n"
    )
    # the sysctl belongs to the pid namespace of the process that writes it: a
    # child in a new one (no --mount-proc needed, which fails in a chroot)
    done = run_in_pid_namespace(code)
    assert done.returncode == 0, done.stderr
    if value == 2:
        assert done.stdout.startswith("refused 13 ")
        assert "vm.memfd_noexec = 2" in done.stdout
        assert "never falls back to memory that is writable and executable" in done.stdout
    else:
        assert done.stdout.startswith("made <CodeHeap address=")
    assert "mapped 0\n" in done.stdout
