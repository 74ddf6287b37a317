"""A peer that misbehaves: a second process that truncates, grows, seals,
punches holes, writes, closes early, sends garbage or nothing, stops, or runs
as another user. The victim uses only the public API (SharedRegion, its
sockets, multiprocessing's pickling) and must never crash or hang: it runs
in a child with a time limit (a crash or a hang fails the test, not the
runner), and each error it gets must name the cause."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import io
import multiprocessing
import os
import pickle
import random
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

from mmap_alloc import AllocError, SharedRegion
from mmap_alloc._linux import PAGE_SIZE as P
from support import (
    describe_status,
    fork_child,
    interrupted_at_line,
    open_fds,
    run_forked,
    wait_child,
)

TiB = 1 << 40
NOBODY = 65534
F_SEAL_FUTURE_WRITE = 0x10
FALLOC_FL_PUNCH_HOLE_KEEP_SIZE = 0x3
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing to another user needs root")


# ---------------------------------------------------------------- the harness


@dataclass
class Side:
    """One end: the Unix socket regions travel on, and a control channel."""

    sock: socket.socket
    ctl: Connection

    def say(self, value: object = None) -> None:
        self.ctl.send(value)

    def hear(self, timeout: float = 10.0) -> Any:
        if not self.ctl.poll(timeout):
            raise TimeoutError(f"the other side said nothing for {timeout} s")
        return self.ctl.recv()

    def until_done(self, timeout: float = 20.0) -> None:
        """Wait until the other side speaks or ends (its end closes)."""
        self.ctl.poll(timeout)


def run_pair(victim: Callable[[Side], None], peer: Callable[[Side], None]) -> None:
    """The victim in a child (a crash or hang fails the test), and the peer
    in a child of it; each gets its end of a socket and of a control pipe."""

    def scenario() -> None:
        sock_v, sock_p = socket.socketpair()
        ctl_v, ctl_p = multiprocessing.Pipe()

        def peer_main() -> None:
            sock_v.close()
            ctl_v.close()
            peer(Side(sock_p, ctl_p))

        pid = fork_child(peer_main)
        sock_p.close()
        ctl_p.close()
        try:
            victim(Side(sock_v, ctl_v))
        finally:
            sock_v.close()
            ctl_v.close()
            status = wait_child(pid, 30)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        assert code == 0, f"the peer {describe_status(code)}"

    run_forked(scenario, timeout=60)


def become(uid: int) -> None:
    """Run as another user from here on (which also makes the process non-dumpable:
    no other process of that user may open its /proc/PID/fd)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def received_fd(side: Side) -> int:
    """The peer's side of a hand-over: the raw descriptor a region's send() carries."""
    _data, fds, _flags, _address = socket.recv_fds(side.sock, 64, 4)
    assert len(fds) == 1
    return fds[0]


def punch(fd: int, offset: int, length: int) -> int:
    """fallocate(PUNCH_HOLE): 0, or the errno."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE_KEEP_SIZE, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def try_errno(call: Callable[[], object]) -> int:
    """0 if ``call`` worked, else its errno."""
    try:
        call()
    except OSError as exc:
        return exc.errno or -1
    return 0


# ---------------------------------------------------------------- truncate, grow, holes, writes


def test_a_peer_cannot_truncate_a_region_sent_to_it() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.create(4 * P) as region:
            region[:] = b"\7" * (4 * P)
            region.send(side.sock)
            assert side.hear() == errno.EPERM  # the peer's ftruncate
            assert region[:] == b"\7" * (4 * P)  # every page still there: no SIGBUS
            assert region.file_size == 4 * P

    def peer(side: Side) -> None:
        fd = received_fd(side)
        side.say(try_errno(lambda: os.ftruncate(fd, 0)))

    run_pair(victim, peer)


def test_a_peer_that_sends_a_file_it_can_truncate_is_refused_before_anything_is_mapped() -> None:
    def victim(side: Side) -> None:
        before = open_fds()
        with pytest.raises(ValueError, match="F_SEAL_SHRINK"):
            SharedRegion.receive(side.sock)
        assert open_fds() == before
        side.say()  # the peer truncates now: nothing here maps the file

    def peer(side: Side) -> None:
        with SharedRegion.create(4 * P, seal_shrink=False) as region:
            region.send(side.sock)
            side.hear()
            os.ftruncate(region.fd, 0)

    run_pair(victim, peer)


def test_a_peer_that_grows_the_file_changes_nothing_until_refresh() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.create(P) as region:
            region[:2] = b"ok"
            region.send(side.sock)
            side.hear()  # grown to 3 pages
            assert (region.size, region.file_size) == (P, 3 * P)
            assert region[:2] == b"ok"
            assert region.refresh() == 3 * P
            assert region[P : 3 * P] == bytes(2 * P)
            side.say()
            side.hear()  # grown to 64 TiB: more than memory and swap
            with pytest.raises(AllocError, match="could ever back"):
                region.refresh()
            assert region.size == 3 * P
            assert region[:2] == b"ok"

    def peer(side: Side) -> None:
        fd = received_fd(side)
        os.posix_fallocate(fd, 0, 3 * P)
        side.say()
        side.hear()
        os.ftruncate(fd, 64 * TiB)
        side.say()

    run_pair(victim, peer)


def test_a_peer_that_punches_holes_leaves_zeros_not_faults() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.create(8 * P) as region:
            region[:] = b"\5" * (8 * P)
            region.send(side.sock)
            assert side.hear() == 0
            assert region[:] == bytes(8 * P)  # the holes read as zeros
            region[:] = b"\6" * (8 * P)  # and take writes again
            assert region.backed_bytes >= 8 * P

    def peer(side: Side) -> None:
        side.say(punch(received_fd(side), 0, 8 * P))

    run_pair(victim, peer)


def test_a_peer_writing_all_the_time_is_a_data_race_not_a_crash() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.create(16 * P) as region:
            region.send(side.sock)
            side.hear()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                region.find(b"\xff\xff\xff\xff")
                bytes(memoryview(region)[::P])
                region[0] = 1
            side.say()

    def peer(side: Side) -> None:
        fd = received_fd(side)
        rng = random.Random(5)
        side.say()
        while not side.ctl.poll(0):
            os.pwrite(fd, rng.randbytes(P), rng.randrange(16) * P)

    run_pair(victim, peer)


# ---------------------------------------------------------------- seals


def test_a_peer_that_seals_the_file_gives_the_victim_clear_errors_only() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.create(P) as region:
            region.send(side.sock)
            assert side.hear() == errno.EBUSY  # F_SEAL_WRITE: this mapping is writable
            region[0] = 1
            assert side.hear() == 0  # F_SEAL_GROW
            with pytest.raises(PermissionError, match="sealed against growing"):
                region.resize(2 * P)
            side.say()
            assert side.hear() == 0  # F_SEAL_FUTURE_WRITE, then F_SEAL_SEAL
            region[0] = 2  # a mapping made before the seal stays writable
            with pytest.raises(PermissionError, match="sealed against writing"):
                region.discard()
            with pytest.raises(PermissionError, match="sealed against sealing"):
                region.seal(write=True)
            assert region.seals == frozenset({"shrink", "grow", "future_write", "seal"})
            assert region[0] == 2

    def peer(side: Side) -> None:
        fd = received_fd(side)
        side.say(try_errno(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)))
        side.say(try_errno(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)))
        side.hear()
        seals = F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL
        side.say(try_errno(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)))

    run_pair(victim, peer)


# ---------------------------------------------------------------- closing early, nothing


def test_a_peer_that_hangs_up_before_sending_is_an_eof_error() -> None:
    def victim(side: Side) -> None:
        with pytest.raises(EOFError, match="closed the socket before sending"):
            SharedRegion.receive(side.sock)

    def peer(side: Side) -> None:
        side.sock.close()

    run_pair(victim, peer)


def test_a_peer_that_hangs_up_on_a_sender_is_a_broken_pipe_not_sigpipe() -> None:
    def victim(side: Side) -> None:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line programs have it
        side.hear()
        with SharedRegion.create(P) as region, pytest.raises(BrokenPipeError):
            region.send(side.sock)

    def peer(side: Side) -> None:
        side.sock.close()
        side.say()

    run_pair(victim, peer)


def test_a_peer_that_sends_nothing_is_a_timeout_error_within_the_sockets_timeout() -> None:
    def victim(side: Side) -> None:
        side.sock.settimeout(0.5)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="the peer sent nothing"):
            SharedRegion.receive(side.sock)
        assert time.monotonic() - start < 5
        side.say()

    def peer(side: Side) -> None:
        side.until_done()  # connected, silent

    run_pair(victim, peer)


# ---------------------------------------------------------------- garbage


def _memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK, flags: int = 0) -> int:
    fd = os.memfd_create("peer", os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _tmpfile() -> int:
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.ftruncate(fd, P)
    return fd


def _unlinked_shm() -> int:
    path = Path("/dev/shm") / f"mmap_alloc_peer_{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    path.unlink()
    os.ftruncate(fd, P)
    return fd


def _header(size: int = P, magic: bytes = b"mmapshr1") -> bytes:
    return struct.pack("=8sQQ", magic, size, 0)


# what the peer sends (bytes, then a function making the descriptors), and what
# the victim must get: an exception type and words of its message
GARBAGE: dict[str, tuple[bytes, Callable[[], list[int]], type[Exception], str]] = {
    "random bytes": (os.urandom(24), list, ValueError, "not one of SharedRegion.send"),
    "a short message": (b"mmap", list, ValueError, "4 bytes and 0 file descriptor"),
    "a long message": (_header() * 5, list, ValueError, "0 file descriptor"),
    "the header alone": (_header(), list, ValueError, "24 bytes and 0 file descriptor"),
    "a wrong magic": (_header(magic=b"mmapshr9"), lambda: [_memfd(P)], ValueError, "not one of"),
    "two memfds": (_header(), lambda: [_memfd(P), _memfd(P)], ValueError, "2 file descriptor"),
    "a pipe": (_header(), lambda: [os.pipe()[0]], ValueError, "not a memfd (it is pipe:"),
    "a socket": (_header(), lambda: [socket.socket().detach()], ValueError, "(it is socket:"),
    "/dev/null": (_header(), lambda: [os.open("/dev/null", os.O_RDWR)], ValueError, "/dev/null"),
    "an O_PATH descriptor": (
        _header(),
        lambda: [os.open("/dev/shm", os.O_PATH)],
        ValueError,
        "not a memfd",
    ),
    "an O_TMPFILE file": (_header(), lambda: [_tmpfile()], ValueError, "it can never be"),
    "an unlinked /dev/shm file": (_header(), lambda: [_unlinked_shm()], ValueError, "never be"),
    "an unsealed memfd": (_header(), lambda: [_memfd(P, 0)], ValueError, "F_SEAL_SHRINK"),
    "an empty memfd": (_header(), lambda: [_memfd(0)], ValueError, "is empty"),
    "a 64 TiB memfd": (_header(64 * TiB), lambda: [_memfd(64 * TiB)], AllocError, "ever back"),
    "a read-only memfd": (
        _header(),
        lambda: [os.open(f"/proc/self/fd/{_memfd(P)}", os.O_RDONLY)],
        PermissionError,
        "open read-only: map it with readonly=True",
    ),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_from_a_peer_is_refused_clearly_and_leaves_nothing_open(kind: str) -> None:
    data, make, error, words = GARBAGE[kind]

    def victim(side: Side) -> None:
        before = open_fds()
        side.hear()  # sent
        with pytest.raises(error) as caught:
            SharedRegion.receive(side.sock).close()
        assert words in str(caught.value), str(caught.value)
        assert open_fds() == before

    def peer(side: Side) -> None:
        fds = make()
        if fds:
            socket.send_fds(side.sock, [data], fds)
        else:
            side.sock.sendall(data)
        side.say()
        side.until_done()

    run_pair(victim, peer)


# ---------------------------------------------------------------- the multiprocessing path


def test_a_peer_that_closes_the_region_after_pickling_it_is_a_clear_error() -> None:
    def victim(side: Side) -> None:
        blob = side.hear()
        with pytest.raises(OSError, match="no longer has it open"):
            pickle.loads(blob)
        side.say()

    def peer(side: Side) -> None:
        region = SharedRegion.create(P)
        blob = bytes(ForkingPickler.dumps(region))
        region.close()
        side.say(blob)
        side.until_done()

    run_pair(victim, peer)


def test_a_peer_that_ended_after_pickling_is_a_clear_error() -> None:
    def victim(side: Side) -> None:
        blob = side.hear()
        side.until_done()  # the peer is gone
        time.sleep(0.1)
        with pytest.raises(OSError, match="it must still be running"):
            pickle.loads(blob)

    def peer(side: Side) -> None:
        region = SharedRegion.create(P)
        side.say(bytes(ForkingPickler.dumps(region)))

    run_pair(victim, peer)


@needs_root
def test_a_stopped_peer_is_a_timeout_error_not_a_hang() -> None:
    def victim(side: Side) -> None:
        from mmap_alloc import _fdshare

        _fdshare.TIMEOUT = 1.0  # 30 s by default
        become(NOBODY)  # /proc of the peer refuses (non-dumpable): its sharer must answer
        blob = side.hear()
        pid = side.hear()
        os.waitpid(pid, os.WUNTRACED)  # the peer (a child of this process) has stopped
        start = time.monotonic()
        try:
            with pytest.raises(TimeoutError, match=rf"process {pid}, .* within 1 s"):
                pickle.loads(blob)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert time.monotonic() - start < 10

    def peer(side: Side) -> None:
        become(NOBODY)
        with SharedRegion.create(P) as region:
            side.say(bytes(ForkingPickler.dumps(region)))
            side.say(os.getpid())
            os.kill(os.getpid(), signal.SIGSTOP)
            side.until_done()

    run_pair(victim, peer)


@needs_root
def test_a_peer_of_another_user_loading_a_pickled_region_is_told_it_was_refused_by_uid() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.create(P) as region:
            side.say(bytes(ForkingPickler.dumps(region)))
            message = side.hear()
            assert f"process {os.getpid()} (uid 0)" in message, message
            assert "only to processes of its own user or root" in message, message
            assert f"runs as uid {NOBODY}" in message, message
            # and the victim's hand-overs to its own user work on
            with pickle.loads(ForkingPickler.dumps(region)) as mine:
                mine[0] = 1

    def peer(side: Side) -> None:
        blob = side.hear()
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        become(NOBODY)
        try:
            pickle.loads(blob)
        except PermissionError as exc:
            side.say(str(exc))
        else:
            side.say("loaded")

    run_pair(victim, peer)


def _loads_in_time(blob: bytes, times: int) -> bool:
    """A receiver of the victim's user: each load of the pickle under a second."""
    took = []
    for _ in range(times):
        start = time.monotonic()
        pickle.loads(blob).close()
        took.append(time.monotonic() - start)
    print("loads took", took)
    return max(took) < 1.0


@needs_root
@pytest.mark.parametrize("flooder", [NOBODY, NOBODY - 1], ids=["same user", "another user"])
def test_a_peer_flooding_the_sharer_with_idle_connections_does_not_stall_hand_overs(
    flooder: int,
) -> None:
    def victim(side: Side) -> None:
        become(NOBODY)  # the receivers below cannot open its /proc: its sharer hands over
        with SharedRegion.create(P) as region:
            blob = bytes(ForkingPickler.dumps(region))
            side.say(blob)
            side.hear()  # connected, and keeps connecting
            receiver = fork_child(lambda: _loads_in_time(blob, 10))
            status = wait_child(receiver, 60)
            side.say()
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status

    def peer(side: Side) -> None:
        address = str(_handle_of(side.hear())[2])
        become(flooder)
        held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        for conn in held:
            conn.connect(address)  # idle: they never send a token
        side.say()
        while not side.ctl.poll(0):
            with contextlib.suppress(OSError):
                held.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                held[-1].connect(address)
            if len(held) > 200:
                held.pop(3).close()

    run_pair(victim, peer)


def _handle_of(blob: bytes) -> tuple[Any, ...]:
    """The descriptor handle inside a pickled region (what multiprocessing carries)."""
    found: list[tuple[Any, ...]] = []

    class Finder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if name == "_rebuild":
                return lambda handle, size, flags: found.append(tuple(handle))
            return super().find_class(module, name)

    Finder(io.BytesIO(blob)).load()
    return found[0]


@needs_root
def test_a_peer_of_another_user_may_send_a_sealed_region_over_a_socket() -> None:
    def victim(side: Side) -> None:
        with SharedRegion.receive(side.sock) as region:
            assert region[:6] == b"nobody"

    def peer(side: Side) -> None:
        become(NOBODY)
        with SharedRegion.create(P) as region:
            region[:6] = b"nobody"
            region.send(side.sock)
            side.until_done()

    run_pair(victim, peer)


# ---------------------------------------------------------------- Ctrl-C


def _receive_interrupted_at_every_line() -> None:
    for k in range(1, 1000):
        a, b = socket.socketpair()
        with SharedRegion.create(P) as region:
            region.send(a)
        before = open_fds()
        received: list[SharedRegion] = []
        came = interrupted_at_line(k, partial(_receive_into, received, b))
        for region in received:
            region.close()
        gc.collect()
        assert open_fds() == before, f"an interrupt at line {k} left a descriptor open"
        a.close()
        b.close()
        if not came:
            assert k > 40
            return


def _receive_into(received: list[SharedRegion], sock: socket.socket) -> None:
    received.append(SharedRegion.receive(sock))


def test_an_interrupt_at_any_line_of_receive_leaves_no_descriptor_open() -> None:
    run_forked(_receive_interrupted_at_every_line, timeout=120)
