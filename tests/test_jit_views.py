"""CodeHeap: one memfd mapped read/write and read/exec; blocks, pins, patching.

The two views, patching code in place, code near libc, and vm.memfd_noexec."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from pathlib import Path

import pytest

from jit_support import RW, RX, SMALL, assert_never_rwx, heap_views
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
from mmap_alloc import AllocError, CodeBlock, CodeHeap, _mman
from mmap_alloc._linux import PAGE_SIZE, mappings
from mmap_alloc.jit import MEMFD_NAME
from support import SIGSEGV, run_in_child, run_in_pid_namespace

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
