"""SecretBuffer: what keeps the secret: guard pages and a canary around it, no
core dumps, zeros in a forked child, locked pages."""

from __future__ import annotations

import ctypes
import errno
import gc
import os
import resource
import signal
import sys
from typing import Any

import pytest

from mmap_alloc import AllocError, MapAllocError, MemoryCorruptionError, SecretBuffer, _mman, secret
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mappings
from secret_support import Make, needs_memfd_secret
from support import (
    SIGSEGV,
    emulated_skip,
    ignored_advice,
    run_forked,
    run_in_child,
    skip_if_emulated,
    status_kib,
    vm_flags,
)

KiB = 1 << 10
SIGABRT = -signal.SIGABRT


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
