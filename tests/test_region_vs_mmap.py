"""Region against the stdlib mmap.mmap: one test per row of the table in
docs/region.md."""

from __future__ import annotations

import contextlib
import mmap
import sys
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import Index, outcome
from support import SIGSEGV, emulated_skip, ignored_advice, run_in_child

# ---------------------------------------------------------------- Region against mmap.mmap
# One test per row of the table in docs/region.md; where the behaviour is the
# same, the test runs it on a real mmap.mmap too.


@contextlib.contextmanager
def twins(contents: bytes = b"0123456789") -> Iterator[tuple[Region, mmap.mmap]]:
    """A region and an anonymous mmap.mmap of the same size and contents."""
    region = MapAlloc().alloc(len(contents))
    stdlib = mmap.mmap(-1, len(contents))
    region[:] = contents
    stdlib[:] = contents
    try:
        yield region, stdlib
    finally:
        region.close()
        stdlib.close()


def raised(call: Callable[[], object]) -> type | None:
    try:
        call()
    except Exception as exc:
        return type(exc)
    return None


def test_mmap_row_closed_object() -> None:
    with twins() as (region, stdlib):
        region.close()
        stdlib.close()
        for use in (len, bool, lambda b: b[0], lambda b: b[0:2], lambda b: b.find(b"1")):
            assert raised(lambda: use(region)) is raised(lambda: use(stdlib)) is ValueError  # noqa: B023
        region.close()  # twice: fine in both
        stdlib.close()
        assert region.closed and stdlib.closed


def test_mmap_row_iter_of_a_closed_object() -> None:
    with twins() as (region, stdlib):
        region.close()
        stdlib.close()
        with pytest.raises(ValueError, match="mmap closed"):
            next(iter(stdlib))  # iter() itself succeeds
        with pytest.raises(ValueError, match="region is closed"):
            iter(region)


def test_mmap_row_close_or_resize_while_exported() -> None:
    with twins(bytes(P)) as (region, stdlib):
        mine, theirs = region.view(10, 10), memoryview(stdlib)[10:20]
        with pytest.raises(BufferError):
            stdlib.close()
        with pytest.raises(BufferError):
            region.close()
        with pytest.raises(BufferError):
            stdlib.resize(64 * P)
        with pytest.raises(BufferError):
            cast(MapAlloc, region._owner).realloc(region, 64 * P)  # would move
        mine.release()
        theirs.release()


@pytest.mark.parametrize("index", [0, 5, 9, -1, -10, 10, -11, 2**70, True], ids=repr)
def test_mmap_row_items(index: int) -> None:
    with twins() as (region, stdlib):
        assert outcome(lambda: region[index]) == outcome(lambda: stdlib[index])


@pytest.mark.parametrize(
    "key",
    [slice(None), slice(2, 5), slice(-3, None), slice(None, None, 2), slice(None, None, -1),
     slice(8, 1, -3), slice(5, 2), slice(-100, 100, 4)],
    ids=repr,
)  # fmt: skip
def test_mmap_row_slices(key: slice) -> None:
    with twins() as (region, stdlib):
        assert region[key] == stdlib[key]
        assert type(region[key]) is type(stdlib[key]) is bytes


@pytest.mark.parametrize("value", [0, 255, 256, -1, "a", b"a", 1.5], ids=repr)
def test_mmap_row_item_assignment(value: Any) -> None:
    with twins() as (region, stdlib):
        assert outcome(lambda: region.__setitem__(3, value)) == outcome(
            lambda: stdlib.__setitem__(3, value)
        )
        assert bytes(region) == stdlib[:]
    with twins() as (region, _stdlib):
        region[Index(3)] = Index(65)  # __index__ objects: as bytearray
        assert region[3] == 65


def test_mmap_row_slice_assignment() -> None:
    with twins() as (region, stdlib):
        for key, value in ((slice(2, 5), b"abc"), (slice(None, None, 3), bytearray(b"wxyz"))):
            region[key] = value
            stdlib[key] = value
        assert bytes(region) == stdlib[:]
        with pytest.raises(TypeError):
            cast(Any, stdlib)[0:3] = [1, 2, 3]
        region[0:3] = [1, 2, 3]  # iterables of ints and non-contiguous buffers, as bytearray
        region[3:5] = memoryview(b"a-b")[::2]
        assert region[:5] == b"\1\2\3ab"


def test_mmap_row_slice_assignment_of_the_wrong_size() -> None:
    with twins() as (region, stdlib):
        with pytest.raises(IndexError, match="wrong size"):
            stdlib[0:3] = b"ab"
        with pytest.raises(ValueError, match=r"2 byte\(s\) given for a slice of 3 byte\(s\)"):
            region[0:3] = b"ab"


@pytest.mark.parametrize("key", [0, slice(0, 2)], ids=repr)
def test_mmap_row_deletion(key: Any) -> None:
    with twins() as (region, stdlib):
        assert raised(lambda: region.__delitem__(key)) is TypeError
        assert raised(lambda: stdlib.__delitem__(key)) is TypeError


def test_mmap_row_in() -> None:
    with twins(bytes(10)) as (region, stdlib):
        assert b"\0" in region and b"\0" in stdlib  # one byte: both
        assert 0 in region and 0 not in stdlib  # mmap iterates 1-byte bytes
        assert b"\0\0" in region and b"\0\0" not in stdlib  # mmap never finds a subsequence
        assert not hasattr(mmap.mmap, "__contains__")


@pytest.mark.parametrize(
    "args",
    [(b"5",), (b"5", 6), (b"34", 2, 5), (b"5", -5), (b"9", 0, -1), (b"x",), (b"",), (b"", 3)],
    ids=repr,
)
def test_mmap_row_find_where_both_take_the_arguments(args: tuple[Any, ...]) -> None:
    with twins() as (region, stdlib):
        assert region.find(*args) == stdlib.find(*args)
        assert region.rfind(*args) == stdlib.rfind(*args)


def test_mmap_row_find_with_a_start_past_the_end() -> None:
    with twins() as (region, stdlib):
        assert region.find(b"", 11) == b"0123456789".find(b"", 11) == -1
        if sys.version_info >= (3, 15):  # mmap searches as bytes does
            assert stdlib.find(b"", 11) == -1
        else:  # mmap clips the start
            assert stdlib.find(b"", 11) == 10


def test_mmap_row_find_with_none_as_start() -> None:
    with twins() as (region, stdlib):
        assert region.find(b"5", None) == 5
        if sys.version_info >= (3, 14):  # mmap takes None as bytes does
            assert cast(Any, stdlib).find(b"5", None) == 5
        else:
            with pytest.raises(TypeError):
                cast(Any, stdlib).find(b"5", None)


def test_mmap_row_find_of_a_byte_value() -> None:
    with twins() as (region, stdlib):
        assert region.find(0x35) == 5
        with pytest.raises(TypeError):
            cast(Any, stdlib).find(0x35)


def test_mmap_row_iteration() -> None:
    with twins() as (region, stdlib):
        assert list(cast(Any, stdlib)) == [bytes([b]) for b in b"0123456789"]
        assert list(region) == list(b"0123456789")
        assert type(iter(region)).__name__ == "RegionIterator"


@pytest.mark.parametrize(
    "use",
    [lambda b: b[10], lambda b: b["x"], lambda b: b.__setitem__(0, 256), lambda b: b.find()],
    ids=["index", "key", "value", "arguments"],
)
def test_mmap_row_error_types(use: Callable[[Any], object]) -> None:
    with twins() as (region, stdlib):
        assert raised(lambda: use(region)) is raised(lambda: use(stdlib)) is not None


def test_mmap_row_protection() -> None:
    read_only = mmap.mmap(-1, P, prot=mmap.PROT_READ)
    with pytest.raises(TypeError, match="readonly"):
        read_only[0] = 1
    read_only.close()
    with MapAlloc(write=False).alloc(P) as region, pytest.raises(TypeError, match="read-only"):
        region[0] = 1

    def read_unreadable_mmap() -> None:
        print(mmap.mmap(-1, P, prot=0)[0])  # PROT_NONE

    assert run_in_child(read_unreadable_mmap) == SIGSEGV
    with MapAlloc().alloc(2 * P) as region:
        region.protect(Perm.NONE, P)
        with pytest.raises(BufferError):
            region[P]
        assert region[P - 1] == 0


def test_mmap_row_exporting_part() -> None:
    with twins(bytes(3 * P)) as (region, stdlib):
        theirs = memoryview(stdlib)[P : 2 * P]
        assert theirs.obj is stdlib  # the whole map's buffer, sliced
        mine = region.view(P, P)
        region.protect(Perm.NONE, 0, P)  # pages outside the view may change
        region.protect(Perm.READ, 2 * P, P)
        with pytest.raises(BufferError):
            region.protect(Perm.READ, P, P)  # not the view's own
        mine.release()
        theirs.release()


@emulated_skip(ignored_advice("MADV_DONTFORK"))
def test_mmap_row_advice() -> None:
    stdlib = mmap.mmap(-1, P)
    stdlib.madvise(mmap.MADV_DONTFORK)
    assert run_in_child(lambda: print(stdlib[0])) == SIGSEGV
    stdlib.close()
    with MapAlloc().alloc(P) as region:
        region[0] = 1
        region.advise("dontfork")
        assert run_in_child(lambda: print(region[0])) == 0
        with pytest.raises(ValueError, match="unknown advice"):
            region.advise("MADV_DONTFORK")


def test_mmap_row_locking() -> None:
    assert not hasattr(mmap.mmap, "lock") and not hasattr(mmap.mmap, "mlock")
    with MapAlloc().alloc(P) as region:
        region.lock()
        assert region.stats().locked_bytes == P
        region.unlock()
