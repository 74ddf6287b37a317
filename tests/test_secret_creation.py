"""SecretBuffer: guarded, locked, never dumped, zero in a child, wiped on close.

Making one: the backends and guard modes, the fallback without memfd_secret,
the mapping budget, and bad input."""

from __future__ import annotations

import array
import ctypes
import errno
import sys

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
from mmap_alloc._linux import mapping_count, max_map_count
from secret_support import (
    ACCESS_PERMS,
    HAS_GUARD_INSTALL,
    Make,
    kernel_access,
    missing,
    needs_memfd_secret,
)
from support import FILLS_THE_MAP_COUNT, perms_at, run_forked

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
