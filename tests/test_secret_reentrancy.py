"""SecretBuffer under re-entrancy: signal handlers, collector callbacks and
__index__ methods using the buffer in the middle of a call."""

from __future__ import annotations

import contextlib
import gc
import random
import signal
from collections.abc import Callable

import pytest

from mmap_alloc import SecretBuffer
from secret_support import ACCESS_PERMS, Make, kernel_access
from support import run_forked

# ---------------------------------------------------------------- re-entrancy


def consistent(buf: SecretBuffer) -> None:
    """The access recorded is the kernel's, exactly."""
    if not buf.closed:
        assert kernel_access(buf) == ACCESS_PERMS[buf.access], (buf.access, kernel_access(buf))


def interrupt_at_random(seconds: float, steps: int, seed: int) -> None:
    """The main loop opens, writes, compares and closes buffers while a SIGALRM
    handler calls the same API on the same buffer at random moments."""
    rng = random.Random(seed)
    state: dict[str, SecretBuffer] = {"buf": SecretBuffer(64, backend="anonymous")}
    fired = [0]

    def handler(signum: int, frame: object) -> None:
        fired[0] += 1
        buf = state["buf"]
        action = rng.randrange(7)
        try:
            if action == 0:
                buf.noaccess()
            elif action == 1:
                buf.readonly()
            elif action == 2:
                buf.readwrite()
            elif action == 3:
                with buf.open(write=True) as view:
                    view[0] = 9
            elif action == 4:
                buf.write(b"h" * 8, 8)
            elif action == 5:
                buf.compare(b"x" * 64)
            else:
                buf.close()
        except (BufferError, ValueError):
            pass
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, seconds))

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        for _ in range(steps):
            buf = state["buf"]
            try:
                step = rng.randrange(5)
                if step == 0:
                    with buf.open(write=rng.random() < 0.5) as view:
                        bytes(view)
                elif step == 1:
                    buf.write(b"m" * 32, rng.randrange(33))
                elif step == 2:
                    buf.compare(b"m" * 64)
                elif step == 3:
                    buf.close()
                else:
                    buf.noaccess()
            except (BufferError, ValueError):
                pass
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            try:
                consistent(buf)
                if buf.closed:
                    state["buf"] = SecretBuffer(64, backend="anonymous")
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGALRM])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # an alarm already on its way is dropped
        signal.signal(signal.SIGALRM, previous)
    consistent(state["buf"])
    state["buf"].close()
    assert fired[0] > 10, fired


def test_a_signal_handler_using_the_buffer_mid_call_cannot_crash_or_open_it_unrecorded() -> None:
    run_forked(interrupt_at_random, 0.0005, 600, 7)


@pytest.mark.stress
def test_a_signal_handler_using_the_buffer_mid_call_stress() -> None:
    run_forked(interrupt_at_random, 0.0002, 10_000, 8, timeout=600)


def test_a_garbage_collection_callback_using_the_buffer_mid_call_cannot_crash() -> None:
    def child() -> None:
        buf = SecretBuffer(64, backend="anonymous")
        rng = random.Random(3)

        quiet = [False]

        def meddle(phase: str, info: dict[str, int]) -> None:
            if quiet[0]:
                return
            with contextlib.suppress(BufferError, ValueError):
                rng.choice((buf.noaccess, buf.readonly, buf.readwrite))()

        def check() -> None:
            quiet[0] = True  # the check's own allocations would collect too
            gc.set_threshold(10**6, 10**6, 10**6)
            try:
                consistent(buf)
            finally:
                gc.set_threshold(1, 10**6, 10**6)
                quiet[0] = False

        gc.freeze()  # collections of the youngest objects only: fast, and very frequent
        gc.callbacks.append(meddle)
        gc.set_threshold(1, 10**6, 10**6)
        try:
            for _ in range(200):
                try:
                    with buf.open(write=rng.random() < 0.5) as view:
                        bytes(view)
                        check()
                    buf.write(b"q" * 4, 3)
                except (BufferError, ValueError):
                    pass
                check()
        finally:
            gc.callbacks.remove(meddle)
        buf.close()

    run_forked(child)


class Evil:
    """An integer whose ``__index__`` runs ``action`` first."""

    def __init__(self, value: int, action: Callable[[], object]) -> None:
        self.value, self.action = value, action

    def __index__(self) -> int:
        self.action()
        return self.value


@pytest.mark.parametrize("action", ["close", "noaccess", "readonly"])
def test_an_offset_whose_index_changes_the_buffer_cannot_crash_write(
    make: Make, action: str
) -> None:
    buf = make(32)

    def call() -> None:
        with pytest.raises((ValueError, BufferError)):
            buf.write(b"abc", Evil(4, getattr(buf, action)))  # type: ignore[arg-type]
        consistent(buf)

    run_forked(call)
    buf.close()


def test_writing_a_buffer_whose_index_closes_it_from_its_own_view_is_refused(make: Make) -> None:
    buf = make(32)
    with buf.open() as view, pytest.raises(BufferError):  # the view pins it: close refuses
        buf.write(view[:4], Evil(4, buf.close))  # type: ignore[arg-type]
    buf.close()
