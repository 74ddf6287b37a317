"""_fdshare: descriptors inside pickles for multiprocessing's queues and pools."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest

from mmap_alloc import SharedRegion, _fdshare
from support import fork_child, interrupted_at_line, open_fds, run_forked, wait_child


class Owner:
    """Holds a memfd open, as a SharedRegion does."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("fdshare", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, 4096)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def dup(owner: Owner) -> int:
    if owner.fd < 0:
        raise ValueError("closed")
    return os.dup(owner.fd)


@pytest.fixture
def owner() -> Iterator[Owner]:
    owner = Owner()
    yield owner
    owner.close()


def share(owner: Owner, readonly: bool = False) -> _fdshare.SharedFd:
    return _fdshare.share(owner, owner.fd, readonly=readonly, dup=dup)


def test_the_receiver_opens_the_file_through_proc_and_the_sender_keeps_nothing(
    owner: Owner,
) -> None:
    os.close(share(owner).detach())  # the sharer starts the first time
    before = open_fds()
    handle = share(owner)
    assert open_fds() == before  # no duplicate waits in the sender
    fd = handle.detach()
    try:
        assert os.fstat(fd).st_ino == os.fstat(owner.fd).st_ino
        assert fd != owner.fd
        os.pwrite(fd, b"via proc", 0)
        assert os.pread(owner.fd, 8, 0) == b"via proc"
    finally:
        os.close(fd)
    assert open_fds() == before


def test_a_read_only_handle_opens_read_only(owner: Owner) -> None:
    fd = share(owner, readonly=True).detach()
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_where_proc_refuses_the_receiver_gets_a_duplicate_over_the_socket(
    owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.close(share(owner).detach())
    before = open_fds()
    monkeypatch.setattr(_fdshare.SharedFd, "_open_in_proc", lambda self, held: False)
    fd = share(owner).detach()
    try:
        assert os.fstat(fd).st_ino == os.fstat(owner.fd).st_ino
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.01)  # the sharer's thread closes its side after the receiver has it
    assert open_fds() == before


def test_a_handle_of_a_closed_owner_is_a_clear_error(owner: Owner) -> None:
    handle = share(owner)
    owner.close()
    with pytest.raises(OSError, match="no longer has it open"):
        handle.detach()


def _open_a_fifo_at(number: int, path: str) -> int:
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a reader, and no writer
    if fd != number:
        os.dup2(fd, number)
        os.close(fd)
    return number


def _handle_of_a_number_now_a_fifo(path: str) -> None:
    owner = Owner()
    handle = share(owner, readonly=True)
    owner.close()
    _open_a_fifo_at(handle.number, path)  # the number is another file now
    with pytest.raises(OSError, match="no longer has it open"):
        handle.detach()  # an open of the FIFO read-only would wait for a writer


def test_a_handle_whose_number_is_a_fifo_by_now_neither_hangs_nor_opens_it(
    tmp_path: Path,
) -> None:
    run_forked(_handle_of_a_number_now_a_fifo, str(tmp_path / "fifo"), timeout=20)


def test_a_handle_never_gives_another_file(owner: Owner) -> None:
    handle = share(owner)._replace(ino=1)
    with pytest.raises(OSError, match="not of the file that was pickled"):
        handle.detach()


def test_a_stranger_without_the_token_gets_no_descriptor(owner: Owner) -> None:
    handle = share(owner)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(handle.address)
        conn.sendall(os.urandom(16))
        data, fds, _flags = _fdshare.recv_fds(conn, 1)
    assert (data, fds) == (_fdshare._UNKNOWN, [])


def test_an_owner_has_one_token_which_goes_with_it() -> None:
    owner = Owner()
    first, second = share(owner), share(owner)
    assert first.token == second.token
    owner.close()
    del owner
    gc.collect()
    assert first.token not in _fdshare._sharer.owners


def _forked_child_forgets() -> None:
    assert len(_fdshare._sharer.owners) == 0
    assert _fdshare._sharer.listener is None
    assert _fdshare._sharer.selector is None
    assert _fdshare._sharer.waiting == {}


def test_a_forked_child_forgets_the_owners_of_its_parent(owner: Owner) -> None:
    share(owner)
    run_forked(_forked_child_forgets)


def _holds_a_copy_of(owner: Owner) -> bool:
    """Whether this process has a descriptor of the owner's file besides its own."""
    st = os.fstat(owner.fd)
    for fd in open_fds() - {owner.fd}:
        with contextlib.suppress(OSError):
            other = os.fstat(fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def _fork_while_the_sharer_holds_a_duplicate() -> None:
    owner = Owner()
    reached, proceed = threading.Event(), threading.Event()

    def slow_dup(owner: Owner) -> int:
        fd = dup(owner)
        reached.set()  # the duplicate is in the serving thread's hands
        proceed.wait(10)
        return fd

    handle = _fdshare.share(owner, owner.fd, readonly=False, dup=slow_dup)
    fetcher = fork_child(lambda: os.close(handle._fetch()))
    assert reached.wait(10)
    threading.Timer(0.3, proceed.set).start()
    child = fork_child(lambda: not _holds_a_copy_of(owner))
    assert os.waitstatus_to_exitcode(wait_child(child)) == 0  # 2: it kept a copy
    assert os.waitstatus_to_exitcode(wait_child(fetcher)) == 0
    owner.close()


def test_a_child_forked_while_the_sharer_hands_a_descriptor_over_keeps_no_copy() -> None:
    run_forked(_fork_while_the_sharer_holds_a_duplicate, timeout=60)


def _fork_while_the_sharer_drops_a_connection() -> None:
    owner = Owner()
    handle = share(owner)
    os.close(handle._fetch())  # the sharer serves
    before = open_fds()
    reached, proceed = threading.Event(), threading.Event()
    close = socket.socket.close

    def slow_close(conn: socket.socket) -> None:
        if threading.current_thread().name == "mmap_alloc fd sharer" and not reached.is_set():
            reached.set()  # out of `waiting`, not closed yet
            proceed.wait(10)
        close(conn)

    socket.socket.close = slow_close  # type: ignore[method-assign,assignment]
    connect(handle.address).close()  # the sharer drops it: no token
    assert reached.wait(10)
    threading.Timer(0.3, proceed.set).start()
    child = fork_child(lambda: open_fds() <= before)
    assert os.waitstatus_to_exitcode(wait_child(child)) == 0  # 2: it kept the connection
    owner.close()


def test_a_child_forked_while_the_sharer_drops_a_connection_keeps_no_copy() -> None:
    run_forked(_fork_while_the_sharer_drops_a_connection, timeout=60)


def _lines(code: CodeType) -> list[int]:
    return sorted({line for _, _, line in code.co_lines() if line and line > code.co_firstlineno})


def _share_with_a_hook_at(
    code: CodeType, line: int, outer: Owner, inner: Owner
) -> tuple[_fdshare.SharedFd, list[_fdshare.SharedFd]]:
    """Share ``outer`` while a trace hook shares ``inner`` when ``line`` of
    ``code`` first runs: the handle of each (none for ``inner`` if the line
    never ran)."""
    handles: list[_fdshare.SharedFd] = []

    def on_line(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and frame.f_lineno == line and not handles:
            handles.append(share(inner))
        return on_line

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return on_line if frame.f_code is code else None

    sys.settrace(tracer)
    try:
        return share(outer), handles
    finally:
        sys.settrace(None)


def _share_from_every_line_of_sharing() -> None:
    """A trace hook shares another owner at each line of the sharer's own code,
    as a signal handler or a finalizer on this thread may."""
    sharer = _fdshare._sharer
    codes = [type(sharer).token.__code__, type(sharer)._listen.__code__]
    targets = [(code, line) for code in codes for line in _lines(code)]
    reentered = 0
    for code, line in targets:
        sharer.forget()  # a sharer without its listener yet: _listen runs too
        outer, inner = Owner(), Owner()
        handle, handles = _share_with_a_hook_at(code, line, outer, inner)
        if handles:  # else a line of a branch not taken
            reentered += 1
        for owner, shared in ((outer, handle), *((inner, h) for h in handles)):
            fd = shared._fetch()  # through the listener: the one a hook started works too
            try:
                assert os.fstat(fd).st_ino == os.fstat(owner.fd).st_ino
            finally:
                os.close(fd)
        outer.close()
        inner.close()
    # all but the nine lines of a failure (the except clause) and the three of
    # a listener a hook started meanwhile (close, close, return)
    assert reentered >= len(targets) - 12, f"only {reentered} of {len(targets)} lines re-entered"


def test_sharing_from_a_hook_inside_sharing_neither_hangs_nor_mixes_owners() -> None:
    run_forked(_share_from_every_line_of_sharing, timeout=60)


def _sharers() -> int:
    return sum(thread.name == "mmap_alloc fd sharer" for thread in threading.enumerate())


def _share_interrupted_at(code: CodeType, line: int, owner: Owner) -> bool:
    """Share ``owner`` with a KeyboardInterrupt raised when ``line`` of
    ``code`` first runs; whether it was raised."""
    fired: list[int] = []

    def on_line(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and frame.f_lineno == line and not fired:
            fired.append(line)
            raise KeyboardInterrupt
        return on_line

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return on_line if frame.f_code is code else None

    sys.settrace(tracer)
    try:
        share(owner)
    except KeyboardInterrupt:
        assert fired
    finally:
        sys.settrace(None)
    return bool(fired)


def _interrupt_every_line_of_starting_the_sharer() -> None:
    sharer = _fdshare._sharer
    code = type(sharer)._listen.__code__
    interrupted = 0
    for line in _lines(code):
        sharer.forget()  # no sharer: share() starts one (a forgotten thread waits on)
        time.sleep(0.05)  # a thread that was closed before it served has returned
        before, threads = open_fds(), _sharers()
        owner = Owner()
        interrupted += _share_interrupted_at(code, line, owner)
        gc.collect()  # what the traceback kept
        time.sleep(0.05)
        if sharer.listener is None:  # none: nothing of one is left
            assert (open_fds() - {owner.fd}, _sharers()) == (before, threads), line
        else:  # one: recorded, and it serves
            assert _sharers() == threads + 1, line
            os.close(share(owner)._fetch())
        owner.close()
    assert interrupted >= 8, interrupted


def test_an_interrupt_while_the_sharer_starts_leaves_no_sharer_or_the_one_recorded() -> None:
    run_forked(_interrupt_every_line_of_starting_the_sharer, timeout=60)


def _interrupt_every_line_of_giving_a_token() -> None:
    code = _fdshare._Sharer.token.__code__
    interrupted = 0
    for line in _lines(code):
        owner = Owner()
        interrupted += _share_interrupted_at(code, line, owner)
        os.close(share(owner)._fetch())  # the sharer hands it over all the same
        owner.close()
    assert interrupted >= 8, interrupted


def test_an_interrupt_while_a_token_is_given_leaves_the_owner_shareable() -> None:
    run_forked(_interrupt_every_line_of_giving_a_token, timeout=60)


def _load_interrupted_at_every_line(blob: bytes) -> None:
    for k in range(1, 1000):
        before = open_fds()
        loaded: list[SharedRegion] = []
        came = interrupted_at_line(k, partial(_load_into, loaded, blob))
        for region in loaded:
            region.close()
        gc.collect()
        assert open_fds() == before, f"an interrupt at line {k} left a descriptor open"
        if not came:
            assert k > 20
            return


def _load_into(loaded: list[SharedRegion], blob: bytes) -> None:
    loaded.append(pickle.loads(blob))


@pytest.mark.parametrize("way", ["proc", "sharer"])
def test_an_interrupt_at_any_line_of_loading_a_region_leaves_no_descriptor_open(
    way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if way == "sharer":
        monkeypatch.setattr(_fdshare.SharedFd, "_open_in_proc", lambda self, held: False)
    with SharedRegion.create(4096) as region:
        blob = ForkingPickler.dumps(region)
        pickle.loads(blob).close()  # the sharer runs
        run_forked(_load_interrupted_at_every_line, bytes(blob), timeout=120)


# ---------------------------------------------------------------- no client delays another


def connect(address: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    conn.connect(address)
    return conn


def timed_fetch(handle: _fdshare.SharedFd) -> float:
    """Seconds one hand-over through the sharer takes (the descriptor is checked)."""
    start = time.monotonic()
    fd = handle._fetch()
    elapsed = time.monotonic() - start
    os.close(fd)
    return elapsed


def test_idle_connections_do_not_delay_a_hand_over(owner: Owner) -> None:
    handle = share(owner)
    timed_fetch(handle)  # the sharer runs
    idle = [connect(handle.address) for _ in range(3)]
    try:
        assert timed_fetch(handle) < 1.0  # was 10 s per idle connection before it
    finally:
        for conn in idle:
            conn.close()


def test_idle_connections_do_not_delay_unpickling_a_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fdshare.SharedFd, "_open_in_proc", lambda self, held: False)
    with SharedRegion.create(4096) as region:
        blob = ForkingPickler.dumps(region)
        pickle.loads(blob).close()
        idle = [connect(_fdshare._sharer.address) for _ in range(3)]
        try:
            start = time.monotonic()
            pickle.loads(blob).close()
            assert time.monotonic() - start < 1.0
        finally:
            for conn in idle:
                conn.close()


def _reconnect_for(address: str, seconds: float, keep: int) -> None:
    """Connect again and again, sending half a token or nothing, keeping the
    last ``keep`` connections open (more than the sharer lets wait)."""
    held: list[socket.socket] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            conn = connect(address)
        except OSError:
            continue
        if len(held) % 2:
            conn.send(b"x" * 8)
        held.append(conn)
        if len(held) > keep:
            held.pop(0).close()


def test_a_client_that_keeps_reconnecting_does_not_stall_hand_overs(owner: Owner) -> None:
    handle = share(owner)
    timed_fetch(handle)
    pid = fork_child(lambda: _reconnect_for(handle.address, 3.0, 2 * _fdshare._WAITING))
    try:
        times = [timed_fetch(handle) for _ in range(20)]
    finally:
        assert os.WEXITSTATUS(wait_child(pid, 30)) == 0
    assert max(times) < 1.0, times


def test_a_connection_that_sends_no_token_is_dropped_after_its_deadline(
    owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fdshare, "_DEADLINE", 0.2)
    handle = share(owner)
    with connect(handle.address) as conn:
        conn.settimeout(10)
        start = time.monotonic()
        assert conn.recv(1) == b""  # closed by the sharer, unanswered
        assert time.monotonic() - start < 5


def test_more_waiting_connections_than_the_limit_drop_the_oldest(owner: Owner) -> None:
    handle = share(owner)
    conns = [connect(handle.address) for _ in range(_fdshare._WAITING + 4)]
    try:
        for conn in conns[:4]:
            conn.settimeout(10)
            assert conn.recv(1) == b""  # dropped for the newer ones
        for conn in conns[4:]:
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)  # still waiting for its token
        assert timed_fetch(handle) < 1.0
    finally:
        for conn in conns:
            conn.close()


# ---------------------------------------------------------------- SIGPIPE, timeouts, strangers


def _sharer_answers_a_receiver_that_hung_up() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line programs have it
    owner = Owner()
    handle = share(owner)
    with _fdshare._sharer.lock:  # the sharer answers only once this is released
        with connect(handle.address) as conn:
            conn.sendall(handle.token)
        time.sleep(0.2)
    time.sleep(0.2)  # the answer went to a closed connection: EPIPE, and no SIGPIPE
    fd = handle._fetch()  # the sharer serves on
    os.close(fd)
    owner.close()


def test_the_sharer_survives_a_receiver_that_hung_up_with_sigpipe_at_its_default() -> None:
    run_forked(_sharer_answers_a_receiver_that_hung_up, timeout=30)


def test_a_sender_that_does_not_answer_is_a_timeout_error_naming_it(
    owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fdshare, "TIMEOUT", 0.3)
    address = f"\0mmap_alloc-test-silent-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(address)
        silent.listen(8)  # connections queue, and nobody answers them
        handle = share(owner)._replace(address=address)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"process {os.getpid()}, .* within 0.3 s"):
            handle._fetch()
        assert time.monotonic() - start < 5


def test_a_sender_that_is_gone_is_an_error_saying_it_must_be_running(owner: Owner) -> None:
    handle = share(owner)._replace(address=f"\0mmap_alloc-test-gone-{os.getpid()}")
    with pytest.raises(ConnectionRefusedError, match="it must still be running"):
        handle._fetch()


def _fetch_as_another_user(handle: _fdshare.SharedFd) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.setgid(65534)
    os.setuid(65534)
    with pytest.raises(PermissionError) as caught:
        handle.detach()  # /proc refuses first, then the sharer
    message = str(caught.value)
    assert f"process {handle.pid} (uid 0)" in message, message
    assert "only to processes of its own user or root" in message, message
    assert "this one runs as uid 65534" in message, message
    assert "send() and receive()" in message, message


def test_a_process_of_another_user_is_refused_and_told_why(owner: Owner) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing to another user needs root")
    handle = share(owner)
    run_forked(_fetch_as_another_user, handle, timeout=30)
    assert timed_fetch(handle) < 1.0  # and the sharer serves on


def test_importing_the_library_imports_neither_socket_nor_secrets() -> None:
    code = (
        "import sys, mmap_alloc\n"
        "print(sorted({'socket', 'secrets', 'hmac', '_hashlib'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
