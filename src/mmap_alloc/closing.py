"""What leaving a with-block does: close an object, or put back what the
block opened; neither hides the block's own exception."""

from __future__ import annotations

from types import TracebackType
from typing import Generic, Protocol, Self, TypeVar, cast

T = TypeVar("T")


class _Closable(Protocol):
    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


class _LeavesBlock:
    """A with-block that runs ``_on_exit`` at its end. A refusal
    (BufferError), worded by ``_refused``, is raised after a clean body, and
    after a failing body is a note on the body's exception, which propagates."""

    __slots__ = ()

    def _on_exit(self) -> None:
        raise NotImplementedError

    def _refused(self, error: BufferError) -> BufferError:
        """The exception a refused ``_on_exit`` becomes."""
        return error

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._on_exit()
        except BufferError as error:
            if exc is None:
                raise self._refused(error) from None
            exc.add_note(f"and {self._refused(error)}")


class ClosesOnExit(_LeavesBlock):
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

    def _on_exit(self) -> None:
        _closable(self).close()

    def _refused(self, error: BufferError) -> BufferError:
        return BufferError(f"the {self._noun} was not {self._closed_word}: {error}")


def _closable(obj: object) -> _Closable:
    return cast(_Closable, obj)  # a subclass of a type with close() and closed


class RestoresOnExit(_LeavesBlock, Generic[T]):
    """A with-block that opens something for its body (``_open``) and puts it
    back at the end (``_restore``), also when the body raises.

    Putting back is refused with BufferError while a buffer made inside the
    block still lives (it would lose access, or outlive what the block
    promised). When the body raised, its exception is the one that
    propagates and the refusal is added to it as a note; otherwise the
    refusal is raised, worded by ``_refused``. One block object is in use at
    a time.
    """

    __slots__ = ("_entered",)

    _what = "block"
    """Names the block in messages ("open() block", "writer")."""

    def __init__(self) -> None:
        self._entered = False

    def _open(self) -> T:
        raise NotImplementedError

    def _restore(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> T:
        if self._entered:
            raise RuntimeError(f"this {self._what} is already in use")
        value = self._open()
        self._entered = True
        return value

    def _on_exit(self) -> None:
        if self._entered:
            self._entered = False
            self._restore()
