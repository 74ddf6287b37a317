"""Closing on leaving a with-block, without hiding the block's own exception."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self, cast


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


class ClosesOnExit:
    """``with obj: ...`` closes ``obj`` at the end of the block.

    When the block raised and the close is refused (BufferError: a buffer is
    still alive), the block's exception is the one that propagates; the
    refusal is added to it as a note and the object stays open (it is freed
    when collected). ``_noun`` names the object in messages, ``_closed_word``
    what closing it is ("closed", "freed").
    """

    __slots__ = ()

    _noun = "object"
    _closed_word = "closed"

    def __enter__(self) -> Self:
        if _closable(self).closed:
            raise ValueError(f"{self._noun} is {self._closed_word}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        closable = _closable(self)
        if exc is None:
            closable.close()
            return
        try:
            closable.close()
        except BufferError as error:
            exc.add_note(f"and the {self._noun} was not {self._closed_word}: {error}")


def _closable(obj: object) -> _Closable:
    return cast(_Closable, obj)  # a subclass of a type with close() and closed
