"""Interrupt everywhere: Python code that runs in the middle of a library call.

A signal handler, a finalizer run by the garbage collector, a trace or profile
hook, an atexit handler or a KeyboardInterrupt can run Python code on the
same thread at any bytecode of the library's Python layer, and at any
allocation of a garbage-collected object in its C layer. No lock stops that;
what keeps the interpreter alive is the rule that every change of
memory-safety state is one C call. This module checks the rule from the
outside:

- for every public operation, its Python-level path through the library is
  traced (``sys.settrace``) and, at every line of library code on it, either a
  KeyboardInterrupt is raised there, or each other public operation is run
  there on the same objects (as a signal handler or a finalizer would);
- every operation also runs with the collector forced to run at every
  allocation point inside the C layer, with a ``gc.callbacks`` hook that runs
  other operations during those collections;

and after each run: nothing crashed, every open region's record of page
protections equals /proc/self/maps, its export and pin counts equal the
buffers and functions alive, the pool handed out no address twice, and once
everything is freed no byte stays mapped. Each operation's runs happen in a
forked child, so a crash fails one test and names it.

The world, its operations and the checks are in interrupts_world.py; the
randomised form (SIGALRM at random moments, handlers calling the API) is
test_reliability_interrupts_signals.py, its long form under ``-m stress``.
"""

from __future__ import annotations

import gc
import os

import pytest

from interrupts_world import (
    NAMES,
    OPERATIONS,
    World,
    attempt,
    check,
    freeze_the_runner,
    make_world,
    reenter,
    teardown,
)
from mmap_alloc import _mman
from support import HOST_MAPS, TOO_SLOW, Injector, run_forked, skip_if_emulated, traced


def library_lines(name: str) -> int:
    """How many lines of library code ``name`` runs on a fresh world."""
    world = make_world()
    try:
        with traced(Injector()) as injector:
            attempt(OPERATIONS[name], world)
        return injector.count
    finally:
        teardown(world)


def interrupt_everywhere(name: str, others: list[str]) -> dict[str, int]:
    """The checks after ``name`` with a KeyboardInterrupt, then each operation
    of ``others``, injected at every line of library code it runs."""
    freeze_the_runner()
    start = _mman.mapped_bytes()
    lines = library_lines(name)
    runs = 0
    actions: list[str | None] = [None, *others]  # None: a KeyboardInterrupt
    for at in range(1, lines + 1):
        for other in actions:
            world = make_world()

            def act(world: World = world, other: str | None = other) -> None:
                if other is None:
                    raise KeyboardInterrupt
                reenter(world, other)

            try:
                with traced(Injector(at, act)):
                    attempt(OPERATIONS[name], world)
            except KeyboardInterrupt:
                pass
            check(world)
            teardown(world)
            runs += 1
    gc.collect()
    assert _mman.mapped_bytes() == start, "a mapping leaked"
    print({"operation": name, "lines": lines, "runs": runs}, flush=True)  # shown with -s
    return {"lines": lines, "runs": runs}


def collect_everywhere(name: str, others: list[str]) -> None:
    """``name`` with a collection at every allocation of the C layer (the
    threshold at 1), each collection running the next of ``others``."""
    freeze_the_runner()
    start = _mman.mapped_bytes()
    for other in others:
        world = make_world()
        fired = [0]

        def callback(
            phase: str,
            info: dict[str, int],
            world: World = world,
            other: str = other,
            fired: list[int] = fired,
        ) -> None:
            if phase == "start" and fired[0] < 3 and world.inside == 1:
                fired[0] += 1
                reenter(world, other)

        thresholds = gc.get_threshold()
        gc.callbacks.append(callback)
        gc.set_threshold(1, 1, 1)
        try:
            attempt(OPERATIONS[name], world)
        finally:
            gc.set_threshold(*thresholds)
            gc.callbacks.remove(callback)
        check(world)
        teardown(world)
    gc.collect()
    assert _mman.mapped_bytes() == start, "a mapping leaked"


# ---------------------------------------------------------------- the tests


SHORT_OTHERS = [
    "cache_alloc",
    "cache_dealloc",
    "cache_trim",
    "close",
    "code_close",
    "code_free",
    "dealloc",
    "drop_function",
    "file_close",
    "file_resize_shrink",
    "file_truncated",
    "memoryview",
    "pool_alloc_many",
    "pool_close",
    "protect_none",
    "protect_part",
    "realloc_grow",
    "realloc_mixed",
    "release",
    "secret_close",
    "secret_noaccess",
    "shared_close",
    "shared_resize_shrink",
    "shrink_in_place",
    "uncommit",
]
"""The operations injected by the normal run: those that change the state
others depend on (the long form injects every operation)."""


def _others(full: bool) -> list[str]:
    return NAMES if full or os.environ.get("MMAP_ALLOC_INTERRUPTS_FULL") else SHORT_OTHERS


def skip_if_emulated_case(name: str, every_line: bool) -> None:
    """Under emulation: a code block made writable has r-x and rw- pages, which
    /proc/self/maps does not tell apart there; stats at every line is too slow."""
    if name == "writable_block":
        skip_if_emulated(HOST_MAPS)
    elif name == "stats" and every_line:
        skip_if_emulated(TOO_SLOW)


@pytest.mark.parametrize("name", NAMES)
def test_interrupt_or_reenter_at_every_line(name: str) -> None:
    skip_if_emulated_case(name, every_line=True)
    # the slowest (stats: 86 lines x 20 runs) takes 100-240 s on a busy 2-core VM
    run_forked(interrupt_everywhere, name, _others(False), timeout=900)


@pytest.mark.parametrize("name", NAMES)
def test_collect_at_every_allocation(name: str) -> None:
    skip_if_emulated_case(name, every_line=False)
    run_forked(collect_everywhere, name, _others(False), timeout=900)


@pytest.mark.stress
@pytest.mark.parametrize("name", NAMES)
def test_interrupt_or_reenter_at_every_line_with_every_operation(name: str) -> None:
    run_forked(interrupt_everywhere, name, _others(True), timeout=1800)


def test_the_harness_reaches_library_code() -> None:
    """The tracer sees the Python layer (a harness that saw nothing would pass anything)."""
    assert library_lines("realloc_grow") > 3
    assert library_lines("writable_block") > 3
    assert library_lines("stats") > 10


def test_the_harness_catches_a_broken_invariant() -> None:
    """An export the world does not know of is reported."""
    world = make_world()
    try:
        extra = memoryview(world.region(0))  # an export the world does not know of
        with pytest.raises(AssertionError, match="exports"):
            check(world)
        extra.release()
    finally:
        teardown(world)
