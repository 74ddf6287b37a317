"""SecretBuffer.open() under Ctrl-C: a KeyboardInterrupt at any line of the
library's Python code while an open() block begins or ends (raised by a trace
hook, as support.Injector does for test_reliability_interrupts_everywhere.py)
loses no end of the block: the access is the one before it, and later blocks
restore theirs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from mmap_alloc import Perm, SecretBuffer
from secret_support import ACCESS_PERMS, Make, kernel_access
from support import Injector, traced

ACCESSES = ("none", "read", "readwrite")


def set_access(buf: SecretBuffer, access: str) -> None:
    getattr(buf, {"none": "noaccess", "read": "readonly", "readwrite": "readwrite"}[access])()


def block(buf: SecretBuffer, write: bool) -> None:
    with buf.open(write=write) as view:
        if write:
            view[0] = 7
        assert view[0] in (0, 7)


def block_lines(buf: SecretBuffer, write: bool) -> int:
    """How many lines of library code an open() block runs, beginning and end."""
    with traced(Injector()) as injector:
        block(buf, write)
    return injector.count


def interrupt() -> None:
    raise KeyboardInterrupt


def interrupt_at(buf: SecretBuffer, write: bool, at: int) -> type | None:
    """An open() block with a KeyboardInterrupt raised at its ``at``-th line of
    library code: the type of what left the block (None: nothing), once it is
    handled (its traceback, which holds the block's frames, is gone)."""
    try:
        with traced(Injector(at, interrupt)):
            block(buf, write)
    except BaseException as exc:  # what escaped is the result
        return type(exc)
    return None


def interrupted(buf: SecretBuffer, write: bool) -> Iterator[tuple[int, type | None]]:
    """interrupt_at for each line of an open() block, the access set back before each."""
    before = buf.access
    for at in range(1, block_lines(buf, write) + 1):
        set_access(buf, before)
        yield at, interrupt_at(buf, write, at)


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("access", ACCESSES)
def test_an_interrupt_at_any_line_of_an_open_block_leaves_the_access_as_before_it(
    make: Make, access: str, write: bool
) -> None:
    with make(32) as buf:
        set_access(buf, access)
        lines = 0
        for at, _ in interrupted(buf, write):
            assert (at, buf.access) == (at, access)
            assert kernel_access(buf) == ACCESS_PERMS[access], at
            lines += 1
        assert lines >= 10  # the harness reached the block's beginning and end


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
def test_an_interrupt_while_an_open_block_begins_or_ends_propagates_as_keyboard_interrupt(
    make: Make, write: bool
) -> None:
    with make(32) as buf:
        lines = block_lines(buf, write)
    for at in range(1, lines + 1):
        with make(32) as buf:
            buf.noaccess()
            assert interrupt_at(buf, write, at) is KeyboardInterrupt, at


def test_open_blocks_after_an_interrupted_one_restore_the_access(make: Make) -> None:
    with make(32) as buf:
        buf.noaccess()
        for at, _ in interrupted(buf, write=True):
            buf.noaccess()
            with buf.open() as view:
                assert (at, view.readonly, buf.access) == (at, True, "read")
            assert (at, buf.access) == (at, "none")
            buf.readonly()
            with buf.open(write=True):
                assert buf.access == "readwrite"
            assert (at, buf.access) == (at, "read")
            assert kernel_access(buf) == Perm.READ


def test_open_blocks_ended_out_of_order_after_an_interrupted_one_restore_the_first_access(
    make: Make,
) -> None:
    with make(32) as buf:
        buf.noaccess()
        for at, _ in interrupted(buf, write=False):
            buf.noaccess()
            first, second = buf.open(), buf.open(write=True)
            first.__enter__()
            second.__enter__()
            first.__exit__(None, None, None)  # the other block still writes
            assert (at, buf.access) == (at, "readwrite")
            second.__exit__(None, None, None)
            assert (at, buf.access) == (at, "none")
            assert kernel_access(buf) == Perm.NONE


def test_an_interrupted_open_block_inside_another_lets_the_outer_one_restore_the_access(
    make: Make,
) -> None:
    with make(32) as buf:
        for at in range(1, block_lines(buf, write=True) + 1):
            buf.noaccess()
            with (
                buf.open(),
                contextlib.suppress(KeyboardInterrupt),
                traced(Injector(at, interrupt)),
            ):
                block(buf, write=True)  # inside the outer block
            assert (at, buf.access) == (at, "none")
            assert kernel_access(buf) == Perm.NONE, at
