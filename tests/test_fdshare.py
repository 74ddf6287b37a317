"""_fdshare: descriptors inside pickles for multiprocessing's queues and pools."""

from __future__ import annotations

import gc
import os
import socket
import sys
import time
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

import pytest

from mmap_alloc import _fdshare
from support import open_fds, run_forked


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
    monkeypatch.setattr(_fdshare.SharedFd, "_open_in_proc", lambda self: None)
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


def test_a_forked_child_forgets_the_owners_of_its_parent(owner: Owner) -> None:
    share(owner)
    run_forked(_forked_child_forgets)


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
    # all but the five lines of the bind failure and of a listener a hook started
    assert reentered >= len(targets) - 5, f"only {reentered} of {len(targets)} lines re-entered"


def test_sharing_from_a_hook_inside_sharing_neither_hangs_nor_mixes_owners() -> None:
    run_forked(_share_from_every_line_of_sharing, timeout=60)
