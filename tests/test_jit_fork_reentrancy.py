"""CodeHeap: one memfd mapped read/write and read/exec; blocks, pins, patching.

Fork, and callers that re-enter the heap in the middle of a call."""

from __future__ import annotations

import ctypes
import itertools
import random
import signal
from collections.abc import Callable

import pytest

from jit_support import SMALL
from machine_code import IntFn, IntOp, add, needs_code, sub
from mmap_alloc import AllocError, CodeBlock, CodeHeap
from support import run_forked

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
