"""Interrupts at random: SIGALRM at random moments while random operations run,
its handler running random operations too; after every few, the checks of
interrupts_world.py. The long form runs under ``-m stress``."""

from __future__ import annotations

import gc
import os
import random
import signal
from types import FrameType

import pytest

from interrupts_world import (
    NAMES,
    OPERATIONS,
    attempt,
    check,
    freeze_the_runner,
    make_world,
    reenter,
    teardown,
)
from mmap_alloc import _mman
from support import HOST_MAPS, emulated_skip, run_forked

# ---------------------------------------------------------------- random signals


def random_signals(seconds: float, seed: int) -> dict[str, int]:
    """Run random operations while SIGALRM fires at random moments, its handler
    running random operations too; check every promise as it goes."""
    rnd = random.Random(seed)
    counts = {"operations": 0, "signals": 0, "inside": 0, "checks": 0}
    freeze_the_runner()
    start = _mman.mapped_bytes()
    world = make_world()

    def handler(signum: int, frame: FrameType | None) -> None:
        counts["signals"] += 1
        if world.inside == 1:
            counts["inside"] += 1
            reenter(world, rnd.choice(NAMES))
        signal.setitimer(signal.ITIMER_REAL, rnd.uniform(1e-5, 3e-4))

    previous = signal.signal(signal.SIGALRM, handler)
    deadline = _now() + seconds
    try:
        signal.setitimer(signal.ITIMER_REAL, 1e-4)
        while _now() < deadline:
            try:
                attempt(OPERATIONS[rnd.choice(NAMES)], world)
                counts["operations"] += 1
                if counts["operations"] % 50 == 0:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    check(world)
                    counts["checks"] += 1
                    if rnd.random() < 0.3:  # a fresh world now and then
                        teardown(world)
                        world = make_world()
                    signal.setitimer(signal.ITIMER_REAL, 1e-4)
            except KeyboardInterrupt:
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # an alarm already on its way is dropped
        signal.signal(signal.SIGALRM, previous)
    check(world)
    teardown(world)
    gc.collect()
    assert _mman.mapped_bytes() == start, "a mapping leaked"
    print(counts, flush=True)  # shown with -s
    return counts


def _now() -> float:
    import time

    return time.monotonic()


@emulated_skip(HOST_MAPS)  # its world has code blocks: r-x pages next to r-- ones
def test_random_signals_keep_every_promise() -> None:
    run_forked(random_signals, 5.0, 1, timeout=120)


@pytest.mark.stress
@emulated_skip(HOST_MAPS)
def test_random_signals_keep_every_promise_long() -> None:
    seconds = float(os.environ.get("MMAP_ALLOC_SIGNALS_SECONDS", "300"))
    run_forked(random_signals, seconds, 2, timeout=seconds + 300)
