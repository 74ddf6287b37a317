"""The pool under interrupts: a signal handler that runs as a free returns,
and Ctrl-C in a long alloc_many.

The first uses the world and the model of interrupts_world.py: it
runs a handler at exactly the point where the long random-signals run found
"the pool handed out a live address again", which was the model's fault
(it counted the freed objects as live until after the call).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from interrupts_world import (
    OPERATIONS,
    World,
    call,
    check,
    make_world,
    reenter,
    teardown,
)
from mmap_alloc import ObjectPool, _mman
from mmap_alloc._linux import PAGE_SIZE
from support import run_forked

PAGE = PAGE_SIZE


# ---------------------------------------------------------------- a hook as a call returns


def _hook_as_call_returns(world: World, name: str) -> Callable[[FrameType, str, object], Any]:
    """A trace function that runs operation ``name`` once, at the first line of
    ``call`` after the library call returned (its ``finally``): where a signal
    handler runs when the signal arrives during the call."""
    finally_line = next(
        number
        for number, text in enumerate(_source_lines(call), call.__code__.co_firstlineno)
        if "world.inside -= 1" in text
    )
    fired = [False]

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and frame.f_lineno == finally_line and not fired[0]:
            fired[0] = True
            reenter(world, name)
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code is call.__code__ else None

    return tracer


def _source_lines(function: Callable[..., Any]) -> list[str]:
    import inspect

    return inspect.getsourcelines(function)[0]


@pytest.mark.parametrize(
    ("name", "hook"), [("pool_free", "pool_alloc"), ("pool_free_many", "pool_alloc_many")]
)
def test_a_hook_as_a_free_returns_is_handed_the_freed_objects(name: str, hook: str) -> None:
    """The objects a free gave back are free the moment it returns: a signal
    handler that runs then may be handed them again, and the model must count
    them as freed by then (it used to drop them only after the call)."""
    world = make_world()
    try:
        freed = set(world.objects[-1:] if name == "pool_free" else world.objects[-70:])
        before = set(world.objects)
        previous = sys.gettrace()
        sys.settrace(_hook_as_call_returns(world, hook))
        try:
            OPERATIONS[name](world)
        finally:
            sys.settrace(previous)
        handed = set(world.objects) - (before - freed)
        assert handed & freed, "the hook did not run in the window (the test tests nothing)"
        assert not (before - freed) & handed
        check(world)
    finally:
        teardown(world)


# ---------------------------------------------------------------- Ctrl-C in a long alloc_many


def interrupted_alloc_many(obj_size: int, slab_size: int | None, n: int, after: float) -> None:
    """alloc_many(n) interrupted by a KeyboardInterrupt from a timer's signal
    handler after ``after`` seconds: it stops at once, and the pool is exact
    (its live objects, nothing of the interrupted call, its slabs released)."""
    import time

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    start_bytes = _mman.mapped_bytes()
    pool = ObjectPool(obj_size, slab_size=slab_size)
    kept = pool.alloc_many(10)
    before = pool.stats()
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, after)
    start = time.monotonic()
    try:
        pool.alloc_many(n)
    except KeyboardInterrupt:
        pass
    else:
        raise AssertionError(f"alloc_many({n}) ended before the interrupt")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # "late" includes giving back the slabs the call added (some 15,000
    # munmaps after 0.3 s of the first case), which a loaded machine slows
    # (0.66 s seen); the whole call would take some 20 s.
    late = time.monotonic() - start - after
    assert late < 1.5, f"the interrupt took effect {late:.3f} s late"
    assert len(pool) == len(kept)
    assert all(address in pool for address in kept)
    after_stats = pool.stats()
    assert after_stats.live == before.live
    spare = (pool.stats().slabs - before.slabs) * pool.slab_size
    assert spare <= 3 * pool.slab_size, "the slabs the call added were not released"
    fresh = pool.alloc_many(20)
    assert not set(fresh) & set(kept)
    pool.free_many(fresh + kept)
    pool.close()
    assert _mman.mapped_bytes() == start_bytes, "a slab leaked"


def test_ctrl_c_interrupts_alloc_many_while_it_adds_slabs() -> None:
    # one object per slab: a million slabs would take about 20 s
    run_forked(interrupted_alloc_many, PAGE, PAGE, 10**6, 0.3, timeout=120)


def test_ctrl_c_interrupts_alloc_many_while_it_takes_objects() -> None:
    # ten million objects of 16 bytes: 160 MiB of slabs in a few ms, then
    # about half a second making the list
    run_forked(interrupted_alloc_many, 16, None, 10**7, 0.15, timeout=120)
