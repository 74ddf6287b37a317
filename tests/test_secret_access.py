"""SecretBuffer: the access of its pages (noaccess, readonly, open()), reading
and writing it, and no copies of its contents."""

from __future__ import annotations

import array
import copy
import ctypes
import pickle

import pytest

from mmap_alloc import Perm, SecretBuffer
from secret_support import Make, kernel_access
from support import run_forked

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
