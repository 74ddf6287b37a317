"""_fdshare: descriptors inside pickles for multiprocessing's queues and pools."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Iterator

import pytest

from mmap_alloc import _fdshare
from reliability_support import run_forked


def open_fds() -> set[int]:
    """The descriptors open now (not the one listing them used, closed by then)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.readlink(f"/proc/self/fd/{name}")
            found.add(int(name))
    return found


def settled(before: set[int] | None = None, timeout: float = 10.0) -> set[int]:
    """The open descriptors once the sharer's thread has closed what it was
    told to close (it does so after the receiver moved on): once no duplicate
    waits and, if given, the set is ``before`` again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (
        _fdshare._sharer.pending or (before is not None and open_fds() != before)
    ):
        time.sleep(0.01)
    return open_fds()


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("fdshare", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    yield fd
    os.close(fd)


def test_the_receiver_opens_the_file_through_proc_and_the_sender_closes_its_duplicate(
    memfd: int,
) -> None:
    handle = _fdshare.share(memfd, readonly=False)  # starts the sharer the first time
    os.close(handle.detach())
    before = settled()
    handle = _fdshare.share(memfd, readonly=False)
    assert len(open_fds() - before) == 1  # the duplicate, waiting
    fd = handle.detach()
    try:
        assert os.fstat(fd).st_ino == os.fstat(memfd).st_ino
        assert fd not in (memfd, handle.number)
        os.pwrite(fd, b"via proc", 0)
        assert os.pread(memfd, 8, 0) == b"via proc"
    finally:
        os.close(fd)
    assert settled(before) == before


def test_a_read_only_handle_opens_read_only(memfd: int) -> None:
    fd = _fdshare.share(memfd, readonly=True).detach()
    try:
        with pytest.raises(OSError):
            os.pwrite(fd, b"x", 0)
    finally:
        os.close(fd)


def test_where_proc_refuses_the_receiver_fetches_the_descriptor_over_the_socket(
    memfd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.close(_fdshare.share(memfd, readonly=False).detach())
    before = settled()
    monkeypatch.setattr(_fdshare.SharedFd, "_open_in_proc", lambda self: None)
    fd = _fdshare.share(memfd, readonly=False).detach()
    try:
        assert os.fstat(fd).st_ino == os.fstat(memfd).st_ino
    finally:
        os.close(fd)
    assert settled(before) == before


def test_a_handle_is_taken_once(memfd: int) -> None:
    handle = _fdshare.share(memfd, readonly=False)
    os.close(handle.detach())
    settled()
    with pytest.raises(OSError, match="did not hand it over"):
        handle.detach()


def test_a_handle_checks_the_file_it_gets(memfd: int) -> None:
    handle = dataclasses.replace(_fdshare.share(memfd, readonly=False), file=(0, 1))
    with pytest.raises(OSError, match="not of the file that was pickled"):
        handle.detach()


def test_a_stranger_without_the_token_gets_nothing(memfd: int) -> None:
    handle = _fdshare.share(memfd, readonly=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(handle.address)
        conn.sendall(os.urandom(16))
        data, fds, _flags = _fdshare.recv_fds(conn, 1)
    assert (data, fds) == (b"", [])
    os.close(handle.detach())  # still there for the right token


def _forked_child_forgets(number: int) -> None:
    assert _fdshare._sharer.pending == {}
    assert _fdshare._sharer.listener is None
    with pytest.raises(OSError):
        os.fstat(number)


def test_a_forked_child_forgets_the_duplicates_of_its_parent(memfd: int) -> None:
    handle = _fdshare.share(memfd, readonly=False)
    run_forked(_forked_child_forgets, handle.number)
    os.close(handle.detach())
