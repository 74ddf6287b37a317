"""SecretBuffer: guarded, locked, never dumped, zero in a child, wiped on close."""

from __future__ import annotations

import array
import contextlib
import copy
import ctypes
import errno
import gc
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmap_alloc import (
    AllocError,
    MapAlloc,
    MapAllocError,
    MemoryCorruptionError,
    Perm,
    SecretBuffer,
    _mman,
    features,
    secret,
)
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mapping_count, mappings, max_map_count
from mmap_alloc.features import Feature
from support import (
    FILLS_THE_MAP_COUNT,
    SIGSEGV,
    emulated_skip,
    ignored_advice,
    perms_at,
    run_forked,
    run_in_child,
    skip_if_emulated,
    status_kib,
    vm_flags,
)

KiB = 1 << 10
SIGABRT = -signal.SIGABRT
HAS_MEMFD_SECRET = features.memfd_secret().available
HAS_GUARD_INSTALL = features.madv_guard_install().available
needs_memfd_secret = pytest.mark.skipif(
    not HAS_MEMFD_SECRET, reason=f"memfd_secret: {features.memfd_secret().detail}"
)
needs_guard_install = pytest.mark.skipif(
    not HAS_GUARD_INSTALL, reason=f"MADV_GUARD_INSTALL: {features.madv_guard_install().detail}"
)

Make = Callable[..., SecretBuffer]


def missing(name: str) -> Callable[[], Feature]:
    return lambda: Feature(name, False, "missing for this test")


@pytest.fixture(
    params=[
        pytest.param("anonymous+madvise", marks=needs_guard_install),
        "anonymous+mprotect",
        pytest.param("memfd_secret", marks=needs_memfd_secret),
    ]
)
def make(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Make:
    """SecretBuffer() for each backend and guard mode this kernel offers."""
    kind: str = request.param
    if kind == "anonymous+mprotect":
        monkeypatch.setattr(secret, "madv_guard_install", missing("madv_guard_install"))
    backend = "memfd_secret" if kind == "memfd_secret" else "anonymous"

    def new(size: int, **options: Any) -> SecretBuffer:
        buf = SecretBuffer(size, backend=backend, **options)
        assert (buf.backend, buf.guard) == {
            "anonymous+madvise": ("anonymous", "madvise"),
            "anonymous+mprotect": ("anonymous", "mprotect"),
            "memfd_secret": ("memfd_secret", "mprotect"),
        }[kind]
        return buf

    return new


def skip_if_emulated_advice_does_it(make: Make, advice: str, guard: str | None = None) -> None:
    """Under emulation, skip a test of what ``advice`` does for this kind of
    buffer (anonymous, and with this ``guard`` mode if given): no effect there."""
    with make(1) as buf:
        backend, mode = buf.backend, buf.guard
    if backend == "anonymous" and guard in (None, mode):
        skip_if_emulated(ignored_advice(advice))


def no_core_dump() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def flip(address: int) -> None:
    """Change one byte in place (through ctypes, as a stray write would)."""
    byte = ctypes.c_ubyte.from_address(address)
    byte.value ^= 0x5A


def kernel_access(buf: SecretBuffer) -> Perm | None:
    """What /proc/self/maps says the secret pages allow."""
    return perms_at(buf._mapping[2])


ACCESS_PERMS = {"none": Perm.NONE, "read": Perm.READ, "readwrite": Perm.READ | Perm.WRITE}


# ---------------------------------------------------------------- creation


def test_a_new_buffer_is_zero_filled_readable_and_writable(make: Make) -> None:
    with make(100) as buf:
        assert (len(buf), buf.size, buf.access, buf.closed) == (100, 100, "readwrite", False)
        assert buf.locked
        with buf.open() as view:
            assert bytes(view) == bytes(100)
        assert kernel_access(buf) == Perm.READ | Perm.WRITE


def test_the_secret_ends_where_the_trailing_guard_begins(make: Make) -> None:
    for size in (1, 100, P - 16, P - 15, P, 3 * P + 1):
        with make(size) as buf:
            base, total, pages, inner = buf._mapping
            assert (pages, inner) == (base + P, secret.secret_pages(size))
            assert total == inner + 2 * P
            assert buf.address + size == base + total - P
            assert buf.address - secret.CANARY_SIZE >= pages


@needs_memfd_secret
def test_backend_auto_takes_memfd_secret_where_the_kernel_has_it() -> None:
    with SecretBuffer(32) as buf:
        assert (buf.backend, buf.guard, buf.locked) == ("memfd_secret", "mprotect", True)


def test_the_anonymous_backend_guards_with_madv_guard_install_where_available() -> None:
    with SecretBuffer(32, backend="anonymous") as buf:
        assert buf.backend == "anonymous"
        assert buf.guard == ("madvise" if HAS_GUARD_INSTALL else "mprotect")


def test_without_madv_guard_install_the_guards_are_prot_none_pages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secret, "madv_guard_install", missing("madv_guard_install"))
    with SecretBuffer(32, backend="anonymous") as buf:
        base, total, _pages, _inner = buf._mapping
        assert buf.guard == "mprotect"
        assert perms_at(base) == perms_at(base + total - 1) == Perm.NONE


def test_the_pages_start_out_read_write_and_every_access_change_reaches_the_kernel(
    make: Make,
) -> None:
    with make(64) as buf:
        for change, name in (
            (buf.noaccess, "none"),
            (buf.readonly, "read"),
            (buf.readwrite, "readwrite"),
            (buf.readonly, "read"),
            (buf.noaccess, "none"),
        ):
            change()
            assert buf.access == name
            assert kernel_access(buf) == ACCESS_PERMS[name]


def test_from_bytes_copies_any_bytes_like_object_and_takes_the_options() -> None:
    data = bytes(range(200))
    for source in (data, bytearray(data), memoryview(data), array.array("B", data)):
        with SecretBuffer.from_bytes(source, lock="best_effort") as buf:
            assert len(buf) == 200
            assert buf.compare(data)
    with SecretBuffer.from_bytes(b"key", backend="anonymous", lock="off") as buf:
        assert (buf.backend, buf.locked) == ("anonymous", False)


def test_from_bytes_of_a_readable_secret_buffer_copies_it() -> None:
    with SecretBuffer.from_bytes(b"secret") as first, SecretBuffer.from_bytes(first) as second:
        assert second.compare(first)


# ---------------------------------------------------------------- guards and canary


def test_one_byte_past_the_end_faults(make: Make) -> None:
    skip_if_emulated_advice_does_it(make, "MADV_GUARD_INSTALL", guard="madvise")
    for size in (1, 33, P - 16, P, 2 * P + 7):
        buf = make(size)

        def read_past(buf: SecretBuffer = buf) -> None:
            no_core_dump()
            ctypes.string_at(buf.address + buf.size, 1)

        def write_past(buf: SecretBuffer = buf) -> None:
            no_core_dump()
            ctypes.memset(buf.address + buf.size, 1, 1)

        def last_byte(buf: SecretBuffer = buf) -> None:  # the control: the secret's own end
            ctypes.memset(buf.address + buf.size - 1, 1, 1)
            assert ctypes.string_at(buf.address + buf.size - 1, 1) == b"\1"

        assert run_in_child(read_past) == SIGSEGV
        assert run_in_child(write_past) == SIGSEGV
        assert run_in_child(last_byte) == 0
        buf.close()


def test_the_byte_before_the_secret_pages_faults(make: Make) -> None:
    """The leading guard page: the last byte before the first secret page."""
    skip_if_emulated_advice_does_it(make, "MADV_GUARD_INSTALL", guard="madvise")
    with make(100) as buf:
        first_page = buf._mapping[2]

        def write_before() -> None:
            no_core_dump()
            ctypes.memset(first_page - 1, 1, 1)

        def read_before() -> None:
            no_core_dump()
            ctypes.string_at(first_page - 1, 1)

        def first_byte() -> None:  # the control: the secret pages themselves
            ctypes.memset(first_page, 1, 1)

        assert run_in_child(write_before) == SIGSEGV
        assert run_in_child(read_before) == SIGSEGV
        assert run_in_child(first_byte) == 0


def test_the_guards_fault_whatever_the_access_of_the_secret(make: Make) -> None:
    skip_if_emulated_advice_does_it(make, "MADV_GUARD_INSTALL", guard="madvise")
    with make(10) as buf:
        buf.readonly()

        def read_past() -> None:
            no_core_dump()
            ctypes.string_at(buf.address + buf.size, 1)

        assert run_in_child(read_past) == SIGSEGV


def test_an_overwritten_canary_aborts_the_process_at_close(make: Make) -> None:
    def overflow_then_close() -> None:
        no_core_dump()
        buf = make(48)
        flip(buf.address - 1)
        buf.close()

    def underflow_then_collect() -> None:
        no_core_dump()
        buf = make(48)
        flip(buf.address - secret.CANARY_SIZE)
        buf.noaccess()  # the check reads through whatever access there was
        del buf

    def intact_then_close() -> None:  # the control
        buf = make(48)
        buf.noaccess()
        buf.close()
        del buf

    assert run_in_child(overflow_then_close) == SIGABRT
    assert run_in_child(underflow_then_collect) == SIGABRT
    assert run_in_child(intact_then_close) == 0


def test_an_overwritten_canary_raises_memory_corruption_error_after_wiping_and_closing(
    make: Make,
) -> None:
    buf = make(48, on_corruption="raise")
    flip(buf.address - 3)
    buf.noaccess()
    mapped = _mman.mapped_bytes()
    with pytest.raises(MemoryCorruptionError, match="canary") as caught:
        buf.close()
    assert isinstance(caught.value, MapAllocError)
    assert buf.closed
    assert _mman.mapped_bytes() == mapped - mapping_size(48)
    buf.close()  # closed already: nothing more to report


def mapping_size(size: int) -> int:
    """Bytes a buffer of ``size`` maps: its secret pages and two guard pages."""
    return secret.secret_pages(size) + 2 * P


def test_a_canary_overwritten_in_a_collected_buffer_is_an_unraisable_error(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    reports: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    buf = make(20, on_corruption="raise")
    flip(buf.address - 1)
    mapped = _mman.mapped_bytes()
    del buf
    gc.collect()
    assert len(reports) == 1
    assert isinstance(reports[0].exc_value, MemoryCorruptionError)
    assert _mman.mapped_bytes() == mapped - mapping_size(20)


def test_a_buffer_inherited_over_fork_is_closed_in_the_child_without_a_false_alarm(
    make: Make,
) -> None:
    """The child's pages are zero, canary included: the child must not abort."""
    buf = make(64)
    buf.write(b"k" * 64)

    def child() -> None:
        assert buf._forked
        buf.close()

    run_forked(child)
    assert not buf._forked
    buf.close()


# ---------------------------------------------------------------- dumps, fork, lock


@emulated_skip(ignored_advice("MADV_DONTDUMP, MADV_WIPEONFORK"))
def test_anonymous_secret_pages_are_not_dumped_wiped_on_fork_and_locked() -> None:
    with SecretBuffer(100, backend="anonymous") as buf:
        flags = vm_flags(buf.address)
        assert {"dd", "wf", "lo"} <= flags, flags
        base, total, _pages, _inner = buf._mapping
        assert "lo" not in vm_flags(base)  # the guards are not locked
        assert "lo" not in vm_flags(base + total - 1)


@needs_memfd_secret
def test_memfd_secret_pages_are_secretmem_locked_not_dumped_and_not_forked() -> None:
    with SecretBuffer(100, backend="memfd_secret") as buf:
        flags = vm_flags(buf.address)
        assert {"dd", "lo", "dc"} <= flags, flags
        names = [m.name for m in mappings() if m.start <= buf.address < m.end]
        assert names and "secretmem" in names[0], names


@emulated_skip(ignored_advice("MADV_DONTDUMP, MADV_WIPEONFORK"))
def test_lock_off_leaves_the_pages_unlocked_but_still_never_dumped() -> None:
    with SecretBuffer(100, backend="anonymous", lock="off") as buf:
        assert not buf.locked
        flags = vm_flags(buf.address)
        assert "lo" not in flags
        assert {"dd", "wf"} <= flags


def test_locked_bytes_count_the_secret_pages_and_return_at_close() -> None:
    before = status_kib("VmLck")
    buf = SecretBuffer(3 * P, backend="anonymous")
    assert status_kib("VmLck") - before == secret.secret_pages(3 * P) // KiB
    buf.close()
    assert status_kib("VmLck") == before


def test_a_forked_child_reads_zeros_and_its_writes_never_reach_the_parent(make: Make) -> None:
    skip_if_emulated_advice_does_it(make, "MADV_WIPEONFORK")
    buf = make(300)
    buf.write(b"\xa7" * 300)
    view_before_fork = memoryview(buf)

    def child() -> None:
        assert bytes(view_before_fork) == bytes(300)
        with buf.open(write=True) as view:
            assert bytes(view) == bytes(300)
            view[:] = b"\x01" * 300
        assert not buf.locked  # locks are not inherited

    run_forked(child)
    assert bytes(view_before_fork) == b"\xa7" * 300
    view_before_fork.release()
    assert buf.locked
    buf.close()


def lower_memlock_and_drop_root() -> None:
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * KiB, 64 * KiB))
    os.setuid(65534)


MEMLOCK_BACKENDS = ["anonymous", pytest.param("auto", marks=needs_memfd_secret)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
@pytest.mark.parametrize("backend", MEMLOCK_BACKENDS)
def test_lock_required_past_rlimit_memlock_raises_naming_the_limit(backend: str) -> None:
    def child() -> None:
        lower_memlock_and_drop_root()
        with pytest.raises(AllocError, match=r"RLIMIT_MEMLOCK is 65536 bytes") as caught:
            SecretBuffer(128 * KiB, backend=backend, lock="required")
        assert caught.value.errno in (errno.ENOMEM, errno.EAGAIN, errno.EPERM)
        assert _mman.mapped_bytes() == mapped
        with SecretBuffer(8 * KiB, backend=backend) as small:  # within the limit: locked
            assert small.locked

    mapped = _mman.mapped_bytes()
    run_forked(child)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
@pytest.mark.parametrize("backend", MEMLOCK_BACKENDS)
def test_lock_best_effort_past_rlimit_memlock_carries_on_unlocked(backend: str) -> None:
    def child() -> None:
        lower_memlock_and_drop_root()
        with SecretBuffer(128 * KiB, backend=backend, lock="best_effort") as buf:
            assert (buf.locked, buf.backend) == (False, "anonymous")
            assert "lo" not in vm_flags(buf.address)
            buf.write(b"x" * buf.size)

    run_forked(child)


@needs_memfd_secret
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_memfd_secret_past_rlimit_memlock_raises_naming_the_limit_whatever_lock_says() -> None:
    def child() -> None:
        lower_memlock_and_drop_root()
        for lock in secret.LOCKS:
            with pytest.raises(AllocError, match=r"RLIMIT_MEMLOCK.*always locked"):
                SecretBuffer(128 * KiB, backend="memfd_secret", lock=lock)

    run_forked(child)


# ---------------------------------------------------------------- memfd_secret missing


def test_without_memfd_secret_that_backend_raises_and_auto_takes_anonymous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secret, "memfd_secret", missing("memfd_secret"))
    with pytest.raises(OSError, match="backend='memfd_secret' is not available") as caught:
        SecretBuffer(32, backend="memfd_secret")
    assert caught.value.errno == errno.ENOSYS
    with SecretBuffer(32) as buf:
        assert buf.backend == "anonymous"


SECCOMP_ENOSYS = 0x00050000 | errno.ENOSYS
SECCOMP_ALLOW = 0x7FFF0000


class SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    )


class SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter)))


def refuse_memfd_secret_with_seccomp() -> None:
    """A seccomp filter on this process: memfd_secret(2) fails with ENOSYS."""
    program = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),  # A = the system call number
        SockFilter(0x15, 0, 1, 447),  # A == memfd_secret ?
        SockFilter(0x06, 0, 0, SECCOMP_ENOSYS),
        SockFilter(0x06, 0, 0, SECCOMP_ALLOW),
    )
    prog = SockFprog(4, program)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP


@needs_memfd_secret
def test_when_the_kernel_refuses_memfd_secret_that_backend_raises_and_auto_falls_back() -> None:
    def child() -> None:
        refuse_memfd_secret_with_seccomp()
        # the system call itself fails, though the (cached) probe said it works
        assert features.memfd_secret().available
        with pytest.raises(OSError, match="memfd_secret failed") as caught:
            SecretBuffer(32, backend="memfd_secret")
        assert caught.value.errno == errno.ENOSYS
        with SecretBuffer(32) as buf:
            assert buf.backend == "anonymous"
        # and a fresh probe sees it missing
        features.clear_cache()
        assert not features.memfd_secret().available
        with pytest.raises(OSError, match="not available"):
            SecretBuffer(32, backend="memfd_secret")
        with SecretBuffer(32) as buf:
            assert buf.backend == "anonymous"

    run_forked(child)


# ---------------------------------------------------------------- access


def test_at_noaccess_every_way_of_reading_raises_and_nothing_crashes(make: Make) -> None:
    buf = make(64)
    buf.write(b"s" * 64)
    buf.noaccess()

    def try_everything() -> None:
        with pytest.raises(BufferError):
            memoryview(buf)
        with pytest.raises(BufferError):
            bytes(buf)
        with pytest.raises(BufferError):
            buf.compare(b"s" * 64)
        with pytest.raises(BufferError):
            SecretBuffer.from_bytes(buf)
        with pytest.raises(BufferError):
            buf.write(b"x")
        with pytest.raises(TypeError):
            buf[0]  # type: ignore[index]
        with pytest.raises(TypeError):
            list(buf)  # type: ignore[call-overload]
        with SecretBuffer(64) as other, pytest.raises(BufferError):
            other.compare(buf)
        assert kernel_access(buf) == Perm.NONE

    run_forked(try_everything)
    try_everything()
    assert buf.access == "none"
    buf.close()


def test_at_readonly_buffers_are_read_only_and_writes_raise(make: Make) -> None:
    with make(16) as buf:
        buf.write(b"0123456789abcdef")
        buf.readonly()
        view = memoryview(buf)
        assert view.readonly
        assert bytes(view) == b"0123456789abcdef"
        with pytest.raises(TypeError):
            view[0] = 1
        with pytest.raises(BufferError):
            buf.write(b"x")
        with pytest.raises(TypeError, match="not writable"):
            ctypes.c_char.from_buffer(buf)  # asks for a writable buffer
        assert buf.compare(b"0123456789abcdef")
        view.release()


def test_open_opens_the_pages_for_the_block_and_restores_the_access_after(make: Make) -> None:
    with make(32) as buf:
        buf.write(b"p" * 32)
        buf.noaccess()
        with buf.open() as view:
            assert (view.readonly, bytes(view), buf.access) == (True, b"p" * 32, "read")
            assert kernel_access(buf) == Perm.READ
        assert buf.access == "none"
        assert kernel_access(buf) == Perm.NONE
        with buf.open(write=True) as view:
            assert (view.readonly, buf.access) == (False, "readwrite")
            view[:4] = b"abcd"
        assert buf.access == "none"
        buf.readonly()
        with buf.open(write=True) as view:
            pass
        assert buf.access == "read"
        with buf.open() as inner:
            assert bytes(inner[:4]) == b"abcd"
        with pytest.raises(ValueError, match="released"):
            bytes(view)  # the view ended with its block


def test_open_without_write_gives_a_read_only_view_and_keeps_read_write_pages(
    make: Make,
) -> None:
    with make(8) as buf:
        with buf.open() as view:
            assert view.readonly
            assert buf.access == "readwrite"
            with pytest.raises(TypeError):
                view[0] = 1
        assert buf.access == "readwrite"


def test_open_restores_the_access_when_the_block_raises(make: Make) -> None:
    with make(32) as buf:
        buf.noaccess()
        with pytest.raises(KeyError), buf.open(write=True) as view:
            view[0] = 1
            raise KeyError("in the block")
        assert buf.access == "none"
        assert kernel_access(buf) == Perm.NONE


def test_a_buffer_made_from_the_view_alive_after_the_block_raises_buffer_error_and_keeps_access(
    make: Make,
) -> None:
    with make(32) as buf:
        buf.noaccess()
        kept: list[memoryview] = []
        with (
            pytest.raises(BufferError, match="cannot restore access 'none'"),
            buf.open() as view,
        ):
            kept.append(view[2:6])
        assert buf.access == "read"  # nothing changed: the slice can still be read
        assert bytes(kept[0]) == bytes(4)
        kept.pop().release()
        buf.noaccess()
        assert kernel_access(buf) == Perm.NONE


def test_open_blocks_ended_out_of_order_restore_the_access_before_the_first(
    make: Make,
) -> None:
    with make(32) as buf:
        buf.noaccess()
        first, second = buf.open(), buf.open()
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)  # the other block still reads
        assert buf.access == "read"
        second.__exit__(None, None, None)
        assert buf.access == "none"
        assert kernel_access(buf) == Perm.NONE


def test_access_cannot_be_removed_under_an_exported_buffer(make: Make) -> None:
    with make(32) as buf:
        writable = memoryview(buf)
        with pytest.raises(BufferError, match="exported"):
            buf.noaccess()
        with pytest.raises(BufferError, match="writable"):
            buf.readonly()
        assert buf.access == "readwrite"
        writable.release()
        buf.readonly()
        readable = memoryview(buf)
        with pytest.raises(BufferError):
            buf.noaccess()
        buf.readwrite()  # adding access is always allowed
        buf.readonly()  # the export is read-only: it needs READ only
        readable.release()
        buf.noaccess()


def test_close_refuses_while_a_buffer_is_exported_and_changes_nothing(make: Make) -> None:
    buf = make(32)
    with buf.open() as view:
        with pytest.raises(BufferError, match="exported"):
            buf.close()
        assert not buf.closed
        assert bytes(view) == bytes(32)
    buf.close()
    assert buf.closed


def test_write_copies_at_the_offset_from_any_bytes_like_object(make: Make) -> None:
    with make(16) as buf:
        buf.write(b"AAAA")
        buf.write(bytearray(b"BB"), 4)
        buf.write(memoryview(b"xxCCxx")[2:4], offset=6)
        buf.write(array.array("B", [68, 68]), 14)
        buf.write(data=b"E", offset=8)
        buf.write(b"")
        with buf.open() as view:
            assert bytes(view) == b"AAAABBCCE" + bytes(5) + b"DD"


def test_write_outside_the_buffer_raises_and_writes_nothing(make: Make) -> None:
    with make(16) as buf:
        for data, offset in ((b"x" * 17, 0), (b"x" * 2, 15), (b"x", 16), (b"", 17)):
            with pytest.raises(ValueError, match="outside the secret buffer"):
                buf.write(data, offset)
        with pytest.raises(ValueError, match="must not be negative"):
            buf.write(b"x", -1)
        assert buf.compare(bytes(16))


def test_write_of_the_buffer_into_itself_is_a_move(make: Make) -> None:
    with make(8) as buf:
        buf.write(b"abcdefgh")
        with buf.open() as view:
            buf.write(view[:4], 2)
        assert buf.compare(b"ababcdgh")


def test_compare_is_true_only_for_the_same_bytes_of_the_same_length(make: Make) -> None:
    with make(32) as buf, SecretBuffer.from_bytes(b"k" * 32) as other:
        buf.write(b"k" * 32)
        assert buf.compare(b"k" * 32)
        assert buf.compare(bytearray(b"k" * 32))
        assert buf.compare(other)
        assert other.compare(buf)
        assert buf.compare(buf)
        assert not buf.compare(b"k" * 31 + b"j")
        assert not buf.compare(b"j" + b"k" * 31)
        assert not buf.compare(b"k" * 31)
        assert not buf.compare(b"k" * 33)
        assert not buf.compare(b"")
        buf.readonly()
        assert buf.compare(b"k" * 32)


# ---------------------------------------------------------------- close


def test_close_is_idempotent_and_the_with_statement_closes(make: Make) -> None:
    mapped = _mman.mapped_bytes()
    with make(32) as buf:
        assert _mman.mapped_bytes() > mapped
    assert buf.closed
    assert _mman.mapped_bytes() == mapped
    buf.close()
    buf.close()
    assert _mman.mapped_bytes() == mapped


def test_a_buffer_closes_at_any_access(make: Make) -> None:
    for change in ("noaccess", "readonly", "readwrite"):
        buf = make(32)
        getattr(buf, change)()
        buf.close()
        assert buf.closed


def test_use_after_close_is_a_value_error(make: Make) -> None:
    buf = make(32)
    buf.close()
    for use in (
        lambda: buf.write(b"x"),
        lambda: buf.compare(b"x"),
        buf.noaccess,
        buf.readonly,
        buf.readwrite,
        lambda: buf.open().__enter__(),
        lambda: memoryview(buf),
        lambda: bytes(buf),
        lambda: buf.address,
        lambda: buf.access,
    ):
        with pytest.raises(ValueError, match="secret buffer is closed"):
            use()
    assert (len(buf), buf.size, buf.locked, buf.closed) == (32, 32, False, True)
    assert "closed" in repr(buf)


def test_a_collected_buffer_is_unmapped(make: Make) -> None:
    mapped = _mman.mapped_bytes()
    buf = make(5000)
    ref = weakref.ref(buf)
    buf.noaccess()
    del buf
    assert ref() is None
    assert _mman.mapped_bytes() == mapped


def test_a_view_keeps_its_buffer_alive(make: Make) -> None:
    buf = make(10)
    ref = weakref.ref(buf)
    opened = buf.open()
    view = opened.__enter__()
    del buf, opened
    gc.collect()
    assert ref() is not None
    assert bytes(view) == bytes(10)
    view.release()  # the exporter goes with the last memoryview of it
    assert ref() is None


WIPE_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* munmap, after looking for 256 bytes of MARK in what is about to go */
int munmap(void *addr, size_t len)
{
    static int (*real)(void *, size_t);
    static int mem = -1;
    static unsigned char page[4096];
    const char *mark = getenv("WIPE_SHIM_MARK");

    if (real == NULL)
        real = (int (*)(void *, size_t))dlsym(RTLD_NEXT, "munmap");
    if (mark != NULL) {
        unsigned char m = (unsigned char)strtol(mark, NULL, 16);
        if (mem < 0)
            mem = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
        for (size_t off = 0; off < len; off += sizeof page) {
            size_t run = 0;
            /* /proc/self/mem reads PROT_NONE pages too; guard pages fail */
            if (pread(mem, page, sizeof page, (off_t)((uintptr_t)addr + off)) != sizeof page)
                continue;
            for (size_t i = 0; i < sizeof page; i++) {
                run = page[i] == m ? run + 1 : 0;
                if (run == 256) {
                    dprintf(2, "WIPE_SHIM found %p\n", (void *)((char *)addr + off));
                    break;
                }
            }
        }
    }
    return real(addr, len);
}
"""

WIPE_CHILD = """
import ctypes, gc
from mmap_alloc import MapAlloc, SecretBuffer
from mmap_alloc._linux import PAGE_SIZE

def fill(address, size):
    ctypes.memset(address, 0xA5, size)  # no Python object ever holds the pattern

mode = {mode!r}
if mode == "region":  # the control: nothing wipes a region
    region = MapAlloc().alloc(2 * PAGE_SIZE)
    fill(region.address, region.size)
    region.close()
else:
    for backend, guard in (("anonymous", True), ("anonymous", False)):
        if not guard:
            from mmap_alloc import features
            features.madv_guard_install = lambda: features.Feature("g", False, "")
        for size in (300, 5000):
            buf = SecretBuffer(size, backend=backend)
            fill(buf.address, size)
            if mode == "close":
                buf.noaccess()
                buf.close()
            else:
                del buf
                gc.collect()
print("done")
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the munmap shim")
@pytest.mark.parametrize("mode", ["close", "collect"])
def test_the_secret_bytes_are_wiped_before_the_pages_are_unmapped(
    mode: str, tmp_path: Path
) -> None:
    """A munmap shim (LD_PRELOAD) reads every range before it is unmapped; the
    secret's pattern must be gone, though a region's stays (the control)."""
    shim = tmp_path / "wipe_shim.so"
    source = tmp_path / "wipe_shim.c"
    source.write_text(WIPE_SHIM)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(source), "-ldl"], check=True
    )
    env = dict(os.environ, LD_PRELOAD=str(shim), WIPE_SHIM_MARK="a5")

    def run(which: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", WIPE_CHILD.format(mode=which)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0 and "done" in done.stdout, done.stderr
        return done.stderr

    assert "WIPE_SHIM found" in run("region")
    assert "WIPE_SHIM found" not in run(mode)


# ---------------------------------------------------------------- no copies


def test_repr_and_str_show_no_contents(make: Make) -> None:
    with make(16) as buf:
        buf.write(b"TOPSECRETTOPSECR")
        for text in (repr(buf), str(buf), f"{buf}"):
            assert "TOPSECRET" not in text
            assert "16 bytes" in text


def test_a_secret_buffer_cannot_be_pickled_or_copied(make: Make) -> None:
    with make(16) as buf:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError, match="cannot be pickled"):
                pickle.dumps(buf, protocol)
        with pytest.raises(TypeError):
            copy.copy(buf)
        with pytest.raises(TypeError):
            copy.deepcopy(buf)


def test_equality_is_identity_not_contents(make: Make) -> None:
    with make(4) as a, make(4) as b:
        assert a == a  # noqa: PLR0124
        assert a != b
        same_bytes: object = bytes(4)
        assert a != same_bytes
        assert a.compare(b)
        assert len({a, b}) == 2


# ---------------------------------------------------------------- the mapping budget


def test_the_mapping_budget_refuses_before_anything_is_mapped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(secret, "max_map_count", lambda: mapping_count() + 10)
    secret._budget.reset()
    mapped = _mman.mapped_bytes()
    try:
        with pytest.raises(AllocError, match=r"vm\.max_map_count is \d+") as caught:
            SecretBuffer(32)
        assert caught.value.errno == errno.ENOMEM
        assert _mman.mapped_bytes() == mapped
    finally:
        secret._budget.reset()


@pytest.mark.skipif(max_map_count() > 1_000_000, reason="vm.max_map_count is too high to reach")
@FILLS_THE_MAP_COUNT
def test_at_the_real_mapping_limit_a_secret_buffer_is_an_alloc_error_naming_it() -> None:
    def child() -> None:
        rw, ro = MapAlloc(), MapAlloc(write=False)
        regions = []
        try:
            while True:  # alternating permissions: neighbours never merge
                regions.append(rw.alloc(P))
                regions.append(ro.alloc(P))
        except AllocError:
            pass
        for _ in range(4):  # room for a few mappings, not for the budget's spare
            regions.pop().close()
        secret._budget.reset()
        with pytest.raises(AllocError, match=r"vm\.max_map_count"):
            SecretBuffer(32)
        # with the budget's own reading stale, the kernel's refusal says the same
        secret._budget.credit = 10
        kept = []
        with pytest.raises(AllocError, match=r"vm\.max_map_count"):
            for _ in range(10):
                kept.append(SecretBuffer(32, backend="anonymous", lock="off"))
        for buf in kept:
            buf.close()
        for region in regions:
            region.close()

    run_forked(child, timeout=300)


# ---------------------------------------------------------------- many cycles


def cycles(count: int, seed: int) -> None:
    rng = random.Random(seed)
    gc.collect()
    maps_before, locked_before = mapping_count(), status_kib("VmLck")
    mapped = _mman.mapped_bytes()
    backends = ["anonymous", "auto"] if HAS_MEMFD_SECRET else ["anonymous"]
    live: list[SecretBuffer] = []
    for i in range(count):
        size = rng.choice((1, rng.randrange(1, 200), rng.randrange(1, 5 * P), P, P - 16))
        buf = SecretBuffer(size, backend=rng.choice(backends), lock=rng.choice(secret.LOCKS))
        buf.write(b"\x77" * min(size, 64))
        live.append(buf)
        if len(live) > 8 or i == count - 1:
            for old in live:
                if rng.random() < 0.3:
                    old.noaccess()
                old.close()
            live.clear()
    assert _mman.mapped_bytes() == mapped
    assert status_kib("VmLck") == locked_before
    assert mapping_count() <= maps_before + 2  # the interpreter may map an arena meanwhile


def test_500_create_close_cycles_give_back_every_mapping_and_locked_byte() -> None:
    cycles(500, seed=1)


@pytest.mark.stress
def test_10000_create_close_cycles_give_back_every_mapping_and_locked_byte() -> None:
    cycles(10_000, seed=2)


# ---------------------------------------------------------------- re-entrancy


def consistent(buf: SecretBuffer) -> None:
    """The access recorded is the kernel's, exactly."""
    if not buf.closed:
        assert kernel_access(buf) == ACCESS_PERMS[buf.access], (buf.access, kernel_access(buf))


def interrupt_at_random(seconds: float, steps: int, seed: int) -> None:
    """The main loop opens, writes, compares and closes buffers while a SIGALRM
    handler calls the same API on the same buffer at random moments."""
    rng = random.Random(seed)
    state: dict[str, SecretBuffer] = {"buf": SecretBuffer(64, backend="anonymous")}
    fired = [0]

    def handler(signum: int, frame: object) -> None:
        fired[0] += 1
        buf = state["buf"]
        action = rng.randrange(7)
        try:
            if action == 0:
                buf.noaccess()
            elif action == 1:
                buf.readonly()
            elif action == 2:
                buf.readwrite()
            elif action == 3:
                with buf.open(write=True) as view:
                    view[0] = 9
            elif action == 4:
                buf.write(b"h" * 8, 8)
            elif action == 5:
                buf.compare(b"x" * 64)
            else:
                buf.close()
        except (BufferError, ValueError):
            pass
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, seconds))

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        for _ in range(steps):
            buf = state["buf"]
            try:
                step = rng.randrange(5)
                if step == 0:
                    with buf.open(write=rng.random() < 0.5) as view:
                        bytes(view)
                elif step == 1:
                    buf.write(b"m" * 32, rng.randrange(33))
                elif step == 2:
                    buf.compare(b"m" * 64)
                elif step == 3:
                    buf.close()
                else:
                    buf.noaccess()
            except (BufferError, ValueError):
                pass
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
            try:
                consistent(buf)
                if buf.closed:
                    state["buf"] = SecretBuffer(64, backend="anonymous")
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGALRM])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # an alarm already on its way is dropped
        signal.signal(signal.SIGALRM, previous)
    consistent(state["buf"])
    state["buf"].close()
    assert fired[0] > 10, fired


def test_a_signal_handler_using_the_buffer_mid_call_cannot_crash_or_open_it_unrecorded() -> None:
    run_forked(interrupt_at_random, 0.0005, 600, 7)


@pytest.mark.stress
def test_a_signal_handler_using_the_buffer_mid_call_stress() -> None:
    run_forked(interrupt_at_random, 0.0002, 10_000, 8, timeout=600)


def test_a_garbage_collection_callback_using_the_buffer_mid_call_cannot_crash() -> None:
    def child() -> None:
        buf = SecretBuffer(64, backend="anonymous")
        rng = random.Random(3)

        quiet = [False]

        def meddle(phase: str, info: dict[str, int]) -> None:
            if quiet[0]:
                return
            with contextlib.suppress(BufferError, ValueError):
                rng.choice((buf.noaccess, buf.readonly, buf.readwrite))()

        def check() -> None:
            quiet[0] = True  # the check's own allocations would collect too
            gc.set_threshold(10**6, 10**6, 10**6)
            try:
                consistent(buf)
            finally:
                gc.set_threshold(1, 10**6, 10**6)
                quiet[0] = False

        gc.freeze()  # collections of the youngest objects only: fast, and very frequent
        gc.callbacks.append(meddle)
        gc.set_threshold(1, 10**6, 10**6)
        try:
            for _ in range(200):
                try:
                    with buf.open(write=rng.random() < 0.5) as view:
                        bytes(view)
                        check()
                    buf.write(b"q" * 4, 3)
                except (BufferError, ValueError):
                    pass
                check()
        finally:
            gc.callbacks.remove(meddle)
        buf.close()

    run_forked(child)


class Evil:
    """An integer whose ``__index__`` runs ``action`` first."""

    def __init__(self, value: int, action: Callable[[], object]) -> None:
        self.value, self.action = value, action

    def __index__(self) -> int:
        self.action()
        return self.value


@pytest.mark.parametrize("action", ["close", "noaccess", "readonly"])
def test_an_offset_whose_index_changes_the_buffer_cannot_crash_write(
    make: Make, action: str
) -> None:
    buf = make(32)

    def call() -> None:
        with pytest.raises((ValueError, BufferError)):
            buf.write(b"abc", Evil(4, getattr(buf, action)))  # type: ignore[arg-type]
        consistent(buf)

    run_forked(call)
    buf.close()


def test_writing_a_buffer_whose_index_closes_it_from_its_own_view_is_refused(make: Make) -> None:
    buf = make(32)
    with buf.open() as view, pytest.raises(BufferError):  # the view pins it: close refuses
        buf.write(view[:4], Evil(4, buf.close))  # type: ignore[arg-type]
    buf.close()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("size", [0, -1, -(1 << 70)])
def test_sizes_below_one_are_value_errors(size: int) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        SecretBuffer(size)


@pytest.mark.parametrize("size", [1 << 62, 1 << 70, sys.maxsize])
def test_sizes_no_address_space_holds_are_alloc_errors(size: int) -> None:
    mapped = _mman.mapped_bytes()
    with pytest.raises(AllocError):
        SecretBuffer(size, lock="off", backend="anonymous")
    assert _mman.mapped_bytes() == mapped


@pytest.mark.parametrize("size", ["10", 1.5, None, True, b"1"])
def test_sizes_that_are_not_integers_are_type_errors(size: object) -> None:
    with pytest.raises(TypeError, match="size must be an integer"):
        SecretBuffer(size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "choices"),
    [
        ("lock", "'required', 'best_effort', 'off'"),
        ("backend", "'auto', 'memfd_secret', 'anonymous'"),
        ("on_corruption", "'abort', 'raise'"),
    ],
)
@pytest.mark.parametrize("value", ["REQUIRED", "", None, 1])
def test_bad_options_are_value_errors_listing_the_choices(
    option: str, choices: str, value: object
) -> None:
    with pytest.raises(ValueError, match=f"{option} must be one of {choices}, got"):
        SecretBuffer(32, **{option: value})  # type: ignore[arg-type]


def test_options_are_keyword_only_and_unknown_ones_are_type_errors() -> None:
    with pytest.raises(TypeError):
        SecretBuffer(32, "required")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SecretBuffer(32, locked="off")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SecretBuffer.from_bytes(b"x", mode="off")


def test_wrong_argument_types_are_type_errors(make: Make) -> None:
    with make(8) as buf:
        for data in ("text", 5, None, [1, 2]):
            with pytest.raises(TypeError, match="data must be a bytes-like object"):
                buf.write(data)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="offset must be an integer"):
            buf.write(b"x", 1.0)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            buf.write(b"x", 0, 1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            buf.write(b"x", bogus=1)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            buf.write()  # type: ignore[call-arg]
        for other in ("text", 5, None):
            with pytest.raises(TypeError, match="compare"):
                buf.compare(other)  # type: ignore[arg-type]


def test_the_kernel_types_cannot_be_made_directly() -> None:
    with pytest.raises(TypeError):
        _mman.Secret()
    with pytest.raises(TypeError):
        _mman.View()  # open()'s exporter: the one View type of the kernel
    with pytest.raises(ValueError, match="bad secret buffer parameters"):
        _mman.Secret._create(32, 5, 0, 0, True)


def test_from_bytes_of_nothing_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        SecretBuffer.from_bytes(b"")


def test_open_blocks_cannot_be_entered_twice() -> None:
    with SecretBuffer(8) as buf:
        opened = buf.open()
        with opened, pytest.raises(RuntimeError, match="already"):
            opened.__enter__()


def test_the_public_names() -> None:
    import mmap_alloc

    assert mmap_alloc.SecretBuffer is secret.SecretBuffer
    assert mmap_alloc.MemoryCorruptionError is secret.MemoryCorruptionError
    assert issubclass(MemoryCorruptionError, MapAllocError)


def test_entering_a_closed_buffer_is_a_value_error(make: Make) -> None:
    buf = make(32)
    buf.close()
    with pytest.raises(ValueError, match="secret buffer is closed"), buf:
        pass


def test_with_block_keeps_its_exception_when_the_buffer_cannot_close(make: Make) -> None:
    buf = make(32)
    with pytest.raises(KeyError) as info, buf:
        view = memoryview(buf)
        raise KeyError("from the body")
    assert any("secret buffer was not closed" in note for note in info.value.__notes__)
    assert not buf.closed
    view.release()
    buf.close()
