"""closing: what leaving a with-block does."""

from __future__ import annotations

import pytest

from mmap_alloc.closing import RestoresOnExit


class Opens(RestoresOnExit[str]):
    """Opens a resource; putting it back is refused while ``held``."""

    __slots__ = ("held", "log")

    _what = "test block"

    def __init__(self) -> None:
        super().__init__()
        self.held = False
        self.log: list[str] = []

    def _open(self) -> str:
        self.log.append("open")
        return "opened"

    def _restore(self) -> None:
        if self.held:
            raise BufferError("a buffer lives on")
        self.log.append("restore")

    def _refused(self, error: BufferError) -> BufferError:
        return BufferError(f"nothing was put back: {error}")


def test_the_block_gets_what_open_returns_and_restore_runs_at_its_end() -> None:
    block = Opens()
    with block as value:
        assert value == "opened"
    assert block.log == ["open", "restore"]


def test_restore_runs_when_the_body_raises() -> None:
    block = Opens()
    with pytest.raises(KeyError), block:
        raise KeyError("body")
    assert block.log == ["open", "restore"]


def test_a_refused_restore_after_a_clean_body_raises_the_worded_refusal() -> None:
    block = Opens()
    with pytest.raises(BufferError, match="nothing was put back: a buffer lives on"), block:
        block.held = True


def test_a_refused_restore_after_a_failing_body_is_a_note_on_the_body_s_exception() -> None:
    block = Opens()
    with pytest.raises(KeyError) as caught, block:
        block.held = True
        raise KeyError("body")
    assert caught.value.__notes__ == ["and nothing was put back: a buffer lives on"]


def test_a_block_object_is_in_use_once_at_a_time() -> None:
    block = Opens()
    with block, pytest.raises(RuntimeError, match="this test block is already in use"), block:
        pass
    with block:  # and again once it ended
        pass
