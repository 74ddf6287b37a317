"""Passing a file descriptor inside a pickle, for multiprocessing's queues and pools.

When multiprocessing starts a process, the descriptors a pickle needs travel
with the start (``get_spawning_popen()``). A pickle sent later through a
Queue or a Pool's task pipe cannot carry one: multiprocessing's answer for
sockets is its resource sharer, a thread of the sender that hands out
duplicates over an authenticated connection (an HMAC challenge each way:
about 1 ms a descriptor here, and a round trip through the sender). Here
the pickle holds where the descriptor is instead:

- the sender's pid, the descriptor's number and the file's identity
  (st_dev, st_ino): the receiver opens ``/proc/PID/fd/N`` of the sender
  (allowed between processes of one user, as listing /proc/PID/fd is) and
  checks that it is that file. No message goes back to the sender;
- for where /proc does not allow that (another user, a sender made
  non-dumpable, /proc mounted with hidepid): a token and the address of a
  Unix socket (abstract namespace) on which a daemon thread of the sender
  hands a duplicate of the owner's descriptor (SCM_RIGHTS) to a process of
  the same user or root (SO_PEERCRED) that presents the token.

The owner must therefore still be open in the sender when the receiver
loads the pickle, as a SharedMemory segment must not be unlinked before the
others attach: the receiver otherwise gets a clear OSError, never another
file (the identity is checked on both ways).

The sharer serves every connection at once (one thread, a selector): a
token is read the moment it arrives and answered right away, so a
connection that sends nothing delays nobody; it is dropped after
``_DEADLINE`` seconds, or sooner when more than ``_WAITING`` connections
wait (the oldest first). Every answer is one byte, so that the receiver can
say why it got no descriptor; every send is ``MSG_NOSIGNAL``: a peer that
hangs up early is an error of that connection, never a SIGPIPE that kills
the sender. The receiver gives up after ``TIMEOUT`` seconds with a
TimeoutError that says who did not answer.

``socket`` is imported when a descriptor is first shared or fetched, not
with the library (multiprocessing, which pickles, has it by then). Tokens
come from ``os.urandom``, which ``secrets`` uses too: not importing
``secrets`` spares hmac and OpenSSL's hashes, and a process that dropped
privileges (or chrooted) after import and can no longer read its Python
installation still hands regions over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import selectors
    import socket

_TOKEN = 16

TIMEOUT = 30.0
"""Seconds a receiver waits for the sender's sharer to hand a descriptor over."""

_DEADLINE = 5.0  # seconds a connection may take to present its token
_WAITING = 64  # connections waiting for their token at once; more drop the oldest
_ACCEPTS = 256  # connections accepted in one pass, before the waiting ones are read
_BACKLOG = 256  # connections the kernel queues for the sharer; a receiver waits for room

# The sharer's answers: one byte each.
_GIVEN = b"\1"  # with the descriptor
_UNKNOWN = b"T"  # no owner has that token: closed, or never shared
_STRANGER = b"U"  # the connecting process is of another user (not root)


class _Waiting(NamedTuple):
    """A connection of the sharer that has not sent its whole token yet."""

    deadline: float
    data: bytes


class _Sharer:
    """The sender's side: a token per owner, and the thread that serves them."""

    def __init__(self) -> None:
        # reentrant: a signal handler or finalizer on the thread holding it may pickle too
        self.lock = threading.RLock()
        self.owners: weakref.WeakValueDictionary[bytes, Any] = weakref.WeakValueDictionary()
        self.tokens: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
        self.dup: Callable[[Any], int] | None = None
        self.listener: socket.socket | None = None
        self.address = ""
        # the serving thread's, kept here for forget() to close in a forked child
        self.selector: selectors.BaseSelector | None = None
        self.waiting: dict[socket.socket, _Waiting] = {}
        # held by the serving thread while it holds a descriptor that is
        # nowhere above; a fork waits for it (before_fork)
        self.hold = threading.Lock()
        self.forking = False

    def token(self, owner: object, dup: Callable[[Any], int]) -> tuple[str, bytes]:
        """The socket's address and the owner's token (made on first use)."""
        with self.lock:
            if self.listener is None:
                self._listen()
            self.dup = dup
            token = self.tokens.get(owner)
            if token is None:
                token = os.urandom(_TOKEN)
                # the sharer's entry first: an interrupt between the two leaves
                # a token nobody was given, never one the sharer does not know
                self.owners[token] = owner
                self.tokens[owner] = token
            return self.address, token

    def _listen(self) -> None:
        import selectors
        import socket

        address = f"\0mmap_alloc-{os.getpid()}-{os.urandom(8).hex()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        selector: selectors.BaseSelector | None = None
        thread: threading.Thread | None = None
        # recorded before the thread starts, so that an interrupt at any line
        # leaves either no sharer (all closed) or the one recorded
        try:
            listener.bind(address)
            listener.listen(_BACKLOG)
            listener.setblocking(False)
            selector = selectors.DefaultSelector()
            if self.listener is not None:  # a hook on this thread started one meanwhile
                selector.close()
                listener.close()
                return
            selector.register(listener, selectors.EVENT_READ)
            thread = threading.Thread(
                target=self._serve,
                args=(listener, selector),
                name="mmap_alloc fd sharer",
                daemon=True,
            )
            self.listener, self.address, self.selector = listener, address, selector
            thread.start()
        except BaseException:
            if thread is not None and thread.ident is not None:
                raise  # interrupted once the thread ran: it serves, as recorded
            if self.listener is listener:
                self.listener, self.address, self.selector = None, "", None
            if selector is not None:
                selector.close()  # a thread not yet serving then returns at once
            listener.close()
            raise

    # ------------------------------------------------------------ the serving thread

    def _serve(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        waiting = self.waiting
        while True:
            timeout = None
            if waiting:  # in order of arrival: the first one's deadline comes first
                timeout = max(0.0, next(iter(waiting.values())).deadline - time.monotonic())
            try:
                events = selector.select(timeout)
            except (OSError, ValueError):
                return  # closed (after a fork, in the child; or before the thread began)
            for key, _mask in events:
                if key.fileobj is listener:
                    if not self._accept(listener, selector, waiting):
                        return
                else:
                    self._read(key.fileobj, selector, waiting)  # type: ignore[arg-type]
            now = time.monotonic()
            while waiting and next(iter(waiting.values())).deadline <= now:
                self._drop(next(iter(waiting)), selector, waiting)

    def _accept(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Waiting],
    ) -> bool:
        """Take the connections that came; answer those whose token is there
        already. False when the listener is gone."""
        for _ in range(_ACCEPTS):
            with self.hold:  # a fork waits until the connection is in `waiting` or closed
                try:
                    conn, _address = listener.accept()
                except BlockingIOError:
                    return True
                except OSError as exc:
                    if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                        return False
                    conn = None
                if conn is not None:
                    try:
                        self._admit(conn, selector, waiting)
                    except Exception:  # whatever one connection did, the sharer serves on
                        self._discard(conn, selector, waiting)
            if conn is None:
                time.sleep(0.05)  # out of descriptors or memory: let it pass
                return True
            try:
                self._read(conn, selector, waiting)  # its token may be there already
            except Exception:
                with self.hold:
                    self._discard(conn, selector, waiting)
            if len(waiting) > _WAITING:
                self._drop(next(iter(waiting)), selector, waiting)
        return True

    def _admit(
        self,
        conn: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Waiting],
    ) -> None:
        """A new connection: refused at once if of another user, else left
        waiting for its token (``hold`` held)."""
        import selectors
        import socket

        conn.setblocking(False)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        if struct.unpack("3i", creds)[1] not in (os.geteuid(), 0):
            with contextlib.suppress(OSError):
                conn.send(_STRANGER, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            conn.close()
            return
        waiting[conn] = _Waiting(time.monotonic() + _DEADLINE, b"")
        selector.register(conn, selectors.EVENT_READ)

    def _read(
        self,
        conn: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Waiting],
    ) -> None:
        """Read what is there of the token; answer once it is whole."""
        entry = waiting.get(conn)
        if entry is None:
            return
        try:
            chunk = conn.recv(_TOKEN - len(entry.data))
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk and len(entry.data) + len(chunk) < _TOKEN:
            waiting[conn] = entry._replace(data=entry.data + chunk)
            return
        if chunk:
            self._answer(conn, entry.data + chunk)
        self._drop(conn, selector, waiting)

    def _answer(self, conn: socket.socket, token: bytes) -> None:
        import socket

        with self.lock:
            owner, dup = self.owners.get(token), self.dup
        flags = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT  # never SIGPIPE, never wait
        with self.hold:  # a fork waits until the duplicate is closed
            fd = -1
            if owner is not None and dup is not None:
                with contextlib.suppress(Exception):
                    fd = dup(owner)  # atomic in C: the owner may be closing meanwhile
            try:
                if fd < 0:
                    conn.send(_UNKNOWN, flags)
                else:
                    send_fds(conn, _GIVEN, [fd], flags)
            except OSError:
                pass  # the receiver hung up: its loss, nobody else's
            finally:
                if fd >= 0:
                    os.close(fd)

    def _drop(
        self,
        conn: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Waiting],
    ) -> None:
        with self.hold:  # a fork waits until the connection is closed
            self._discard(conn, selector, waiting)

    @staticmethod
    def _discard(
        conn: socket.socket,
        selector: selectors.BaseSelector,
        waiting: dict[socket.socket, _Waiting],
    ) -> None:
        waiting.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            selector.unregister(conn)
        conn.close()

    # ------------------------------------------------------------ fork

    def before_fork(self) -> None:
        """Wait until the serving thread holds no descriptor that only its
        locals know of (a duplicate being sent, a connection being taken or
        dropped): a forked child would keep it open for good."""
        self.forking = False
        self.forking = self.hold.acquire()

    def after_fork_in_parent(self) -> None:
        if self.forking:
            self.forking = False
            self.hold.release()

    def forget(self) -> None:
        """In a forked child: the thread is not there; the owners are the parent's."""
        self.lock = threading.RLock()
        self.hold, self.forking = threading.Lock(), False
        self.owners = weakref.WeakValueDictionary()
        self.tokens = weakref.WeakKeyDictionary()
        for conn in list(self.waiting):
            conn.close()
        self.waiting = {}
        if self.selector is not None:
            with contextlib.suppress(OSError):
                self.selector.close()
            self.selector = None
        if self.listener is not None:
            self.listener.close()
        self.listener, self.address = None, ""


_sharer = _Sharer()
os.register_at_fork(
    before=_sharer.before_fork,
    after_in_parent=_sharer.after_fork_in_parent,
    after_in_child=_sharer.forget,
)


class SharedFd(NamedTuple):
    """A descriptor in a pickle: where it is, and the file it must be (a
    tuple: it pickles small and loads fast)."""

    pid: int
    number: int
    address: str
    token: bytes
    dev: int
    ino: int
    readonly: bool

    def detach(self) -> int:
        """A new descriptor of the file, for the caller to own. OSError if the
        sender has closed it, is gone, refuses this process, or does not
        answer within ``TIMEOUT`` seconds (TimeoutError)."""
        with Fds() as held:
            self.detach_into(held)
            return held.fds.pop()

    def detach_into(self, held: Fds) -> None:
        """``detach()``, the descriptor going into ``held`` the moment it is
        opened or received."""
        if not self._open_in_proc(held):
            self._fetch_into(held)

    def _open_in_proc(self, held: Fds) -> bool:
        # O_NONBLOCK, O_NOCTTY: the number may be another file by now (the
        # owner closed it), a FIFO whose open would wait for a writer, a tty.
        # (A stat of the path first, to open only the right file, would cost
        # as much as the open: /proc's lookup is most of a hand-over.)
        flags = os.O_RDONLY if self.readonly else os.O_RDWR
        flags |= os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        try:
            held.fds.append(os.open(f"/proc/{self.pid}/fd/{self.number}", flags))
        except OSError:
            return False
        st = os.fstat(held.fds[-1])
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):  # closed, and the number reused
            os.close(held.fds.pop())
            return False
        os.set_blocking(held.fds[-1], True)
        return True

    def _fetch(self) -> int:
        """The descriptor from the sender's sharer, for the caller to own."""
        with Fds() as held:
            self._fetch_into(held)
            return held.fds.pop()

    def _fetch_into(self, held: Fds) -> None:
        """The descriptor from the sender's sharer, into ``held``; asked again
        while the sharer drops the connection unanswered (too many were
        waiting)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            mine = Fds()  # this answer's descriptors, closed unless the one asked for
            with mine:
                answer, sender_uid = self._ask(deadline, mine)
                if answer == _GIVEN and len(mine.fds) == 1:
                    st = os.fstat(mine.fds[0])
                    if (st.st_dev, st.st_ino) != (self.dev, self.ino):
                        raise OSError(
                            "the descriptor handed over is not of the file that was pickled"
                        )
                    held.fds.append(mine.fds.pop())
                    return
            if answer == _STRANGER:
                raise PermissionError(
                    errno.EPERM,
                    f"process {self.pid} (uid {sender_uid}), which pickled the descriptor, "
                    "refused to hand it over: it hands descriptors only to processes of its "
                    f"own user or root, and this one runs as uid {os.geteuid()}; load the "
                    "pickle in a process of that user, or hand the region over with send() "
                    "and receive() on a Unix socket the two processes share",
                )
            if answer:  # _UNKNOWN, or anything else: no descriptor for that token
                raise OSError(
                    f"process {self.pid}, which pickled the descriptor, no longer has it "
                    "open: keep a region open until every process it was sent to has "
                    "received it"
                )
            if time.monotonic() >= deadline:
                raise self._timeout()
            time.sleep(0.01)

    def _ask(self, deadline: float, held: Fds) -> tuple[bytes, int]:
        """One connection to the sharer: its answer byte (the descriptors that
        came with it go into ``held``), and the sender's uid (-1 if unknown)."""
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            try:
                self._connect(conn, deadline)
            except TimeoutError:
                raise self._timeout() from None
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"cannot reach process {self.pid}, which pickled the descriptor "
                    f"({exc.strerror}): it must still be running, with the region open, "
                    "when the pickle is loaded",
                ) from None
            try:
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                sender_uid = struct.unpack("3i", creds)[1]
            except OSError:
                sender_uid = -1
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(self.token, socket.MSG_NOSIGNAL)  # a refusal may come first
            try:
                data, _fds, _flags = recv_fds(conn, 1, held)
            except TimeoutError:
                raise self._timeout() from None
            except ConnectionResetError:
                data = b""
        return data, sender_uid

    def _connect(self, conn: socket.socket, deadline: float) -> None:
        """Connect, waiting in the kernel for room while the sharer's backlog
        is full (with Python's timeout, a non-blocking socket, a Unix socket
        says EAGAIN at once; a blocking one waits up to SO_SNDTIMEO)."""
        import socket

        left = max(0.001, deadline - time.monotonic())
        conn.settimeout(None)
        conn.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(left), int(left % 1 * 1e6))
        )
        try:
            conn.connect(self.address)
        except BlockingIOError:  # no room before the deadline
            raise TimeoutError from None
        conn.settimeout(max(0.001, deadline - time.monotonic()))

    def _timeout(self) -> TimeoutError:
        return TimeoutError(
            errno.ETIMEDOUT,
            f"process {self.pid}, which pickled the descriptor, did not hand it over within "
            f"{TIMEOUT:g} s: its thread that serves descriptors ('mmap_alloc fd sharer') "
            "does not run (the process is stopped, or a call holds its GIL that long)",
        )


def send_fds(sock: socket.socket, data: bytes, fds: list[int], flags: int = 0) -> int:
    """Send ``data`` with the descriptors ``fds`` (SCM_RIGHTS), never raising
    SIGPIPE: a peer that hung up is a BrokenPipeError. (``socket.send_fds``
    takes flags but, up to Python 3.11, does not pass them on.)"""
    import socket

    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    return sock.sendmsg([data], rights, flags | socket.MSG_NOSIGNAL)


class Fds:
    """Raw descriptors owned until handed on: those still here when the
    ``with`` block ends are closed. Each comes in and goes out in one
    statement (``recv_fds``' store, ``fds.append(...)``, ``fds.pop()``), so
    that an interrupt (Ctrl-C) at any line leaves none unowned."""

    __slots__ = ("fds", "raw")

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.raw: list[Any] = []  # a message's ancillary data, unread

    def __enter__(self) -> Fds:
        return self

    def __exit__(self, *exc: object) -> None:
        # one statement, and no Python code in it (``raw`` is empty but after an
        # interrupt inside recv_fds): each is closed, then forgotten
        del self.fds[: len([*map(os.close, self.fds + (self.raw and _rights(self.raw)))])]


def _rights(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of a message's ancillary data (SCM_RIGHTS)."""
    import socket

    fd_size = struct.calcsize("i")
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fd_size
            fds.extend(struct.unpack(f"{usable // fd_size}i", payload[:usable]))
    return fds


def recv_fds(
    sock: socket.socket, size: int, held: Fds | None = None
) -> tuple[bytes, list[int], int]:
    """One message of at most ``size`` bytes and the descriptors that came
    with it (close-on-exec from the start), and the message flags. The
    descriptors are ``held.fds``: ``held`` owns them from the moment they
    come."""
    import socket

    held = Fds() if held is None else held
    size_fds = socket.CMSG_SPACE(struct.calcsize("i"))
    data, held.raw, flags, _address = sock.recvmsg(size, size_fds, socket.MSG_CMSG_CLOEXEC)
    held.fds, held.raw = held.fds + _rights(held.raw), []
    return data, held.fds, flags


def share(owner: object, fd: int, *, readonly: bool, dup: Callable[[Any], int]) -> SharedFd:
    """A picklable handle of ``fd``, which ``owner`` holds open (``dup(owner)``
    makes a new descriptor of it, or raises once the owner is closed);
    ``readonly``: it is to be opened read-only, as ``fd`` is."""
    st = os.fstat(fd)
    address, token = _sharer.token(owner, dup)
    return SharedFd(os.getpid(), fd, address, token, st.st_dev, st.st_ino, readonly)
