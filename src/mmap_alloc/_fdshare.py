"""Passing a file descriptor inside a pickle, for multiprocessing's queues and pools.

When multiprocessing starts a process, the descriptors a pickle needs travel
with the start (``get_spawning_popen()``). A pickle sent later through a
Queue or a Pool's task pipe cannot carry one: multiprocessing's answer for
sockets is its resource sharer, a thread of the sender that hands out
duplicates over an authenticated connection (an HMAC challenge each way:
about 1 ms a descriptor here, and a round trip through the sender). This is
the same idea, lighter:

- the sender keeps a duplicate under a random 16-byte token; the pickle holds
  the sender's pid, the duplicate's number, the token, the file's identity
  (st_dev, st_ino) and the address of the sender's Unix socket (abstract
  namespace), served by a daemon thread;
- the receiver opens ``/proc/PID/fd/N`` of the sender (allowed between
  processes of one user, as reading /proc/PID/fd is), checks it is the same
  file, and tells the sender so with one datagram it does not wait for; the
  sender's thread then closes its duplicate;
- where /proc does not allow it (another user, a sender made non-dumpable,
  /proc mounted with hidepid), the receiver fetches the descriptor over the
  socket instead (SCM_RIGHTS; the sender serves only its own user and root,
  checked with SO_PEERCRED, and only the right token).

As with the resource sharer, a duplicate waits in the sender until a process
unpickles it (or the sender exits): a pickle that is never loaded keeps its
file alive that long.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass

_TOKEN = 16
_NOTICE_TIMEOUT = 5.0


class _Sharer:
    """The sender's side: pending duplicates and the thread that serves them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[bytes, int] = {}
        self.listener: socket.socket | None = None
        self.notices: socket.socket | None = None
        self.address = ""

    def put(self, fd: int) -> tuple[str, bytes, int]:
        """Keep a duplicate of ``fd`` for one process to take: (address, token,
        the duplicate's number)."""
        with self.lock:
            if self.listener is None:
                self._listen()
            token = secrets.token_bytes(_TOKEN)
            dup = os.dup(fd)
            self.pending[token] = dup
            return self.address, token, dup

    def _listen(self) -> None:
        address = f"\0mmap_alloc-{os.getpid()}-{secrets.token_hex(8)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        notices = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(address)
            listener.listen(128)
            notices.bind(address + "-done")
        except OSError:
            listener.close()
            notices.close()
            raise
        for target, sock, name in (
            (self._serve, listener, "mmap_alloc fd sharer"),
            (self._close_taken, notices, "mmap_alloc fd sharer notices"),
        ):
            threading.Thread(target=target, args=(sock,), name=name, daemon=True).start()
        self.listener, self.notices, self.address = listener, notices, address

    def _close_taken(self, notices: socket.socket) -> None:
        """Close the duplicates that receivers opened through /proc."""
        while True:
            try:
                token = notices.recv(_TOKEN)
            except OSError:
                return  # closed (after a fork, in the child)
            with self.lock:
                fd = self.pending.pop(token, None)
            if fd is not None:
                os.close(fd)

    def _serve(self, listener: socket.socket) -> None:
        me = os.geteuid()
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed (after a fork, in the child)
            with conn:
                try:
                    conn.settimeout(10)
                    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                    if struct.unpack("3i", creds)[1] not in (me, 0):
                        continue
                    token = conn.recv(_TOKEN, socket.MSG_WAITALL)
                    with self.lock:
                        fd = self.pending.pop(token, None)
                    if fd is None:
                        continue
                    try:
                        socket.send_fds(conn, [b"\1"], [fd])
                    finally:
                        os.close(fd)
                except OSError:
                    continue

    def forget(self) -> None:
        """In a forked child: the thread is not there, the duplicates are the parent's."""
        self.lock = threading.Lock()
        for fd in self.pending.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pending.clear()
        for sock in (self.listener, self.notices):
            if sock is not None:
                sock.close()
        self.listener, self.notices, self.address = None, None, ""


class _Notices:
    """The receiver's side: one unbound datagram socket for every notice."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def socket(self) -> socket.socket:
        sock = self.sock
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(_NOTICE_TIMEOUT)
            self.sock = sock
        return sock

    def forget(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


_sharer = _Sharer()
_notices = _Notices()
os.register_at_fork(after_in_child=_sharer.forget)
os.register_at_fork(after_in_child=_notices.forget)


@dataclass(frozen=True)
class SharedFd:
    """A descriptor in a pickle: where it is, and the file it must be."""

    pid: int
    number: int
    address: str
    token: bytes
    file: tuple[int, int]  # st_dev, st_ino
    readonly: bool

    def detach(self) -> int:
        """The descriptor, for the caller to own (once). OSError if the sender
        is gone or has already given it out."""
        fd = self._open_in_proc()
        if fd is not None:
            self._taken()
            return fd
        return self._fetch()

    def _open_in_proc(self) -> int | None:
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(f"/proc/{self.pid}/fd/{self.number}", flags)
        except OSError:
            return None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self.file:  # closed and reused meanwhile
            os.close(fd)
            return None
        return fd

    def _taken(self) -> None:
        """Tell the sender to close its duplicate: a datagram, not answered. It
        waits only while the sender's queue of them is full (net.unix.
        max_dgram_qlen, 10 by default), and at most a few seconds."""
        with contextlib.suppress(OSError):  # a sender gone has nothing to close
            _notices.socket().sendto(self.token, self.address + "-done")

    def _fetch(self) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
            try:
                conn.connect(self.address)
                conn.sendall(self.token)
                _data, fds, _flags = recv_fds(conn, 1)
            except OSError as exc:
                message = f"cannot fetch the descriptor from the process that pickled it: {exc}"
                raise OSError(exc.errno, message) from None
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise OSError(
                "the process that pickled the descriptor did not hand it over "
                "(it was taken already, or that process is gone)"
            )
        st = os.fstat(fds[0])
        if (st.st_dev, st.st_ino) != self.file:
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


def share(fd: int, *, readonly: bool) -> SharedFd:
    """A picklable handle of a duplicate of ``fd``, for one process to take
    (``readonly``: it is to be opened read-only, as ``fd`` is)."""
    st = os.fstat(fd)
    address, token, number = _sharer.put(fd)
    return SharedFd(os.getpid(), number, address, token, (st.st_dev, st.st_ino), readonly)
