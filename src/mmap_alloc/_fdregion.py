"""A region over a file descriptor it owns: what FileRegion and SharedRegion
have in common.

Both map a file through their own descriptor (``fd``), closed with the
region: the file's size can change under them, the kernel refuses write
access when the descriptor or the file is read-only, their arrays travel by
reference inside multiprocessing, and multiprocessing alone may pickle them,
passing the descriptor. A subclass gives its descriptor (``fd``, from its C
layer), why write access is refused (``_readonly_reason``), what a failed
resize says (``_resize_error``), how to reach another program
(``_elsewhere``), and its own ``_reduce`` for :func:`register_pickling`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, Self, TypeVar

from ._fdshare import share as share_descriptor
from ._mman import _shared_dup
from .exceptions import CLOSED
from .region import Region

if TYPE_CHECKING:
    from numpy.typing import DTypeLike, NDArray

__all__ = ["FdRegion", "pickle_handle", "register_pickling"]

R = TypeVar("R", bound="FdRegion")

_registered: set[type] = set()


def register_pickling(cls: type[R], reduce: Callable[[R], tuple[Any, tuple[Any, ...]]]) -> None:
    """Teach multiprocessing's pickler to pass the regions of ``cls`` by
    descriptor, with ``reduce``, once (done when the first region is made:
    no region, nothing to pickle)."""
    if cls not in _registered:
        from multiprocessing import reduction

        reduction.register(cls, reduce)
        _registered.add(cls)


def pickle_handle(region: FdRegion, *, readonly: bool) -> Any:
    """What carries the region's descriptor in multiprocessing's pickle: with
    a process being started, a duplicate that travels with the start, as
    multiprocessing passes sockets; else (queues, pools) where it is, for the
    receiver to open (see _fdshare: the region must stay open until the
    receiver has it), ``readonly`` for a receiver that may only read."""
    from multiprocessing import context, reduction

    fd = region.fd
    if context.get_spawning_popen() is not None:
        return reduction.DupFd(fd)
    try:
        return share_descriptor(region, fd, readonly=readonly, dup=_shared_dup)
    except OSError:  # no Unix socket to serve it from: multiprocessing's way
        return reduction.DupFd(fd)


class FdRegion(Region):
    """A Region over a file through a descriptor of its own (``fd``)."""

    __slots__ = ()

    _elsewhere: ClassVar[str]
    """How to hand the region to what multiprocessing does not reach (the
    end of the message that refuses any other pickling)."""

    @property
    def fd(self) -> int:
        """The region's descriptor of its file, owned by the region (subclasses: theirs)."""
        raise NotImplementedError

    @property
    def file_size(self) -> int:
        """The file's size now: another process may have changed it
        (:meth:`refresh` maps the region to it). ValueError once closed."""
        try:
            return os.fstat(self.fd).st_size
        except OSError:
            if self.closed:  # meanwhile: by a signal handler, a finalizer, a thread
                raise ValueError(CLOSED) from None
            raise

    def protect(self, perms: int, offset: int = 0, length: int | None = None) -> None:
        """As Region.protect(); PermissionError, saying why, when WRITE is
        asked of a region the kernel maps read-only (a FileRegion of mode
        "r", a ``readonly`` SharedRegion)."""
        try:
            super().protect(perms, offset, length)
        except PermissionError as exc:
            raise self._readonly_error(exc) from None

    def make_writable(self, offset: int = 0, length: int | None = None) -> None:
        """As Region.make_writable(); PermissionError, saying why, on a region
        the kernel maps read-only (as for protect())."""
        try:
            super().make_writable(offset, length)
        except PermissionError as exc:
            raise self._readonly_error(exc) from None

    def _readonly_error(self, exc: PermissionError) -> PermissionError:
        return PermissionError(exc.errno, f"{exc.strerror}: {self._readonly_reason()}")

    def _readonly_reason(self) -> str:
        """Why the kernel refuses this region write access."""
        raise NotImplementedError

    def _resize_with(
        self,
        resize: Callable[[Region, int], None],
        n: int,
        recover: Callable[[OSError], bool] = lambda exc: False,
    ) -> None:
        """``resize(self, n)`` (the C layer's resize of the file and the
        mapping), again after a signal interrupted it or after ``recover``
        mended what failed (it returns True); any other OSError is raised as
        ``_resize_error``."""
        while True:
            try:
                resize(self, n)
                return
            except InterruptedError:
                continue  # a signal came during fallocate, which undid itself: again
            except OSError as exc:
                if not recover(exc):
                    raise self._resize_error(exc, n) from None

    def _resize_error(self, exc: OSError, n: int) -> Exception:
        """What a resize to ``n`` bytes that failed with ``exc`` raises."""
        raise NotImplementedError

    def ndarray(
        self, dtype: DTypeLike, shape: int | tuple[int, ...], offset: int = 0
    ) -> NDArray[Any]:
        """As Region.ndarray(). Inside multiprocessing (Pool, Queue,
        ProcessPoolExecutor) the array travels by reference when the region
        shares its pages (a SharedRegion; a FileRegion of mode "r", "r+" or
        "w+"): the receiver maps the same pages, and its writes are seen here."""
        from . import _arraypickle

        array = super().ndarray(dtype, shape, offset)
        _arraypickle.register()
        return array

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError(
            f"a {type(self).__name__} is pickled only by multiprocessing, which passes its "
            "file descriptor (pass it to a Process, Pool or Queue of multiprocessing or "
            f"concurrent.futures); {self._elsewhere}"
        )

    def __enter__(self) -> Self:
        if self.closed:
            raise ValueError(CLOSED)
        return self
