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
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

_TOKEN = 16


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

    def token(self, owner: object, dup: Callable[[Any], int]) -> tuple[str, bytes]:
        """The socket's address and the owner's token (made on first use)."""
        with self.lock:
            if self.listener is None:
                self._listen()
            self.dup = dup
            token = self.tokens.get(owner)
            if token is None:
                token = secrets.token_bytes(_TOKEN)
                self.tokens[owner] = token
                self.owners[token] = owner
            return self.address, token

    def _listen(self) -> None:
        address = f"\0mmap_alloc-{os.getpid()}-{secrets.token_hex(8)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(address)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        if self.listener is not None:  # a hook on this thread started one meanwhile
            listener.close()
            return
        threading.Thread(
            target=self._serve, args=(listener,), name="mmap_alloc fd sharer", daemon=True
        ).start()
        self.listener, self.address = listener, address

    def _serve(self, listener: socket.socket) -> None:
        me = os.geteuid()
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed (after a fork, in the child)
            with conn:
                try:
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    if struct.unpack("3i", creds)[1] not in (me, 0):
                        continue
                    conn.settimeout(10)
                    token = conn.recv(_TOKEN, socket.MSG_WAITALL)
                    with self.lock:
                        owner, dup = self.owners.get(token), self.dup
                    if owner is None or dup is None:
                        continue
                    try:
                        fd = dup(owner)  # atomic in C: the owner may be closing meanwhile
                    except (OSError, ValueError):
                        continue
                    try:
                        socket.send_fds(conn, [b"\1"], [fd])
                    finally:
                        os.close(fd)
                except OSError:
                    continue

    def forget(self) -> None:
        """In a forked child: the thread is not there; the owners are the parent's."""
        self.lock = threading.RLock()
        self.owners = weakref.WeakValueDictionary()
        self.tokens = weakref.WeakKeyDictionary()
        if self.listener is not None:
            self.listener.close()
        self.listener, self.address = None, ""


_sharer = _Sharer()
os.register_at_fork(after_in_child=_sharer.forget)


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
        sender has closed it or is gone."""
        fd = self._open_in_proc()
        return fd if fd is not None else self._fetch()

    def _open_in_proc(self) -> int | None:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(f"/proc/{self.pid}/fd/{self.number}", flags)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):  # closed, and the number reused
            os.close(fd)
            return None
        return fd

    def _fetch(self) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            try:
                conn.connect(self.address)
                conn.sendall(self.token)
                _data, fds, _flags = recv_fds(conn, 1)
            except OSError as exc:
                message = (
                    f"cannot get the descriptor from process {self.pid}, which pickled it "
                    f"(it must still be running): {exc}"
                )
                raise OSError(exc.errno, message) from None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(
                f"process {self.pid}, which pickled the descriptor, no longer has it open: keep "
                "a region open until every process it was sent to has received it"
            )
        st = os.fstat(fds[0])
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            os.close(fds[0])
            raise OSError("the descriptor handed over is not of the file that was pickled")
        return fds[0]


def recv_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int], int]:
    """One message of at most ``size`` bytes and the descriptors that came
    with it (close-on-exec from the start), and the message flags."""
    fd_size = struct.calcsize("i")
    data, ancillary, flags, _address = sock.recvmsg(
        size, socket.CMSG_SPACE(fd_size), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fd_size
            fds.extend(struct.unpack(f"{usable // fd_size}i", payload[:usable]))
    return data, fds, flags


def share(owner: object, fd: int, *, readonly: bool, dup: Callable[[Any], int]) -> SharedFd:
    """A picklable handle of ``fd``, which ``owner`` holds open (``dup(owner)``
    makes a new descriptor of it, or raises once the owner is closed);
    ``readonly``: it is to be opened read-only, as ``fd`` is."""
    st = os.fstat(fd)
    address, token = _sharer.token(owner, dup)
    return SharedFd(os.getpid(), fd, address, token, st.st_dev, st.st_ino, readonly)
