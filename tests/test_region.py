"""Region: one live allocation, a bounds-checked buffer that pins its mapping."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import itertools
import mmap
import os
import random
import resource
import subprocess
import sys
import textwrap
import tracemalloc
import weakref
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmap_alloc import AllocError, MapAlloc, Perm, Region, _mman
from mmap_alloc._linux import ADVICE, MADV_GUARD_INSTALL
from mmap_alloc._linux import PAGE_SIZE as P
from support import (
    EMULATED,
    FILLS_THE_MAP_COUNT,
    MLOCK,
    SIGSEGV,
    SMALL_ALLOCATIONS_FROM_MALLOC,
    emulated_skip,
    ignored_advice,
    pattern,
    run_in_child,
    skip_if_emulated,
    vm_flags,
)

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC


def allocator_for(perms: Perm) -> MapAlloc:
    return MapAlloc(read=bool(perms & R), write=bool(perms & W), exec=bool(perms & X))


@pytest.fixture
def region(alloc: MapAlloc) -> Iterator[Region]:
    """A 10-byte read/write region holding b"0123456789"; freed after the test."""
    r = alloc.alloc(10)
    r[:] = b"0123456789"
    yield r
    r.close()


def closed_region() -> Region:
    r = MapAlloc().alloc(10)
    r.close()
    return r


# ---------------------------------------------------------------- attributes


def test_regions_are_made_by_an_allocator_only() -> None:
    with pytest.raises(TypeError, match=r"made by MapAlloc\.alloc"):
        Region()


def test_size_capacity_and_len(region: Region) -> None:
    assert region.size == len(region) == 10
    assert region.capacity == P


def test_address_is_where_the_bytes_are(region: Region) -> None:
    assert ctypes.string_at(region.address, 10) == b"0123456789"


@pytest.mark.parametrize("perms", [R, R | W, R | X, Perm.NONE, W, X], ids=str)
def test_perms_are_those_in_force(perms: Perm) -> None:
    with allocator_for(perms).alloc(1) as r:
        assert r.perms == perms


def test_protections_cover_the_capacity(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as r:
        assert r.protections() == [(0, 3 * P, R | W)]
        r.protect(Perm(int(R)), P, P)
        assert r.protections() == [(0, P, R | W), (P, P, R), (2 * P, P, R | W)]


def test_repr_shows_perms_address_size_and_capacity(region: Region) -> None:
    assert repr(region) == f"<Region rw- address=0x{region.address:x} size=10 capacity={P}>"


def test_repr_of_a_closed_region() -> None:
    assert repr(closed_region()) == "<Region closed size=10>"


def test_regions_support_weak_references(region: Region) -> None:
    ref = weakref.ref(region)
    assert ref() is region


# ---------------------------------------------------------------- close


def test_close_unmaps_and_marks_the_region_closed(alloc: MapAlloc) -> None:
    r = alloc.alloc(1)
    assert not r.closed
    r.close()
    assert r.closed


def test_close_twice_is_a_no_op(alloc: MapAlloc) -> None:
    r = alloc.alloc(1)
    r.close()
    r.close()
    assert r.closed


def test_with_statement_gives_the_region_and_closes_it(alloc: MapAlloc) -> None:
    with alloc.alloc(1) as r:
        assert isinstance(r, Region)
        assert not r.closed
    assert r.closed


def test_with_statement_closes_on_an_exception(alloc: MapAlloc) -> None:
    with pytest.raises(KeyError), alloc.alloc(1) as r:
        raise KeyError
    assert r.closed


def test_closing_a_region_while_a_buffer_is_exported_is_buffer_error(region: Region) -> None:
    with memoryview(region):
        with pytest.raises(BufferError, match="1 exported buffer"):
            region.close()
        assert not region.closed
        assert region[0] == ord("0")


def test_with_statement_exit_while_exported_is_buffer_error(alloc: MapAlloc) -> None:
    r = alloc.alloc(1)
    view = memoryview(r)
    with pytest.raises(BufferError), r:
        pass
    assert not r.closed
    view.release()
    r.close()


def test_a_region_with_a_reference_cycle_is_freed_by_the_collector(alloc: MapAlloc) -> None:
    r = alloc.alloc(P)
    ref = weakref.ref(r)
    holder: list[object] = [r]
    holder.append(holder)
    del r, holder
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize(
    "use",
    [
        lambda r: r.address,
        lambda r: r.perms,
        lambda r: r.protections(),
        lambda r: r.__enter__(),
        lambda r: r[0],
        lambda r: r[0:2],
        lambda r: r.__setitem__(0, 1),
        lambda r: r.__setitem__(slice(0, 2), b"ab"),
        bytes,
        list,
        memoryview,
        lambda r: MapAlloc().realloc(r, 1),
    ],
    ids=[
        "address",
        "perms",
        "protections",
        "enter",
        "getitem",
        "getslice",
        "setitem",
        "setslice",
        "bytes",
        "iter",
        "memoryview",
        "realloc-foreign",
    ],
)
def test_every_use_of_a_closed_region_is_value_error(use: object) -> None:
    r = closed_region()
    with pytest.raises(ValueError, match=r"region is closed|another allocator"):
        use(r)  # type: ignore[operator]


@pytest.mark.parametrize(
    "method",
    ["realloc", "grow_in_place", "shrink_in_place", "commit", "uncommit"],
)
def test_every_allocator_method_on_a_closed_region_is_value_error(method: str) -> None:
    alloc = MapAlloc()
    r = alloc.alloc(P)
    r.close()
    args = (P,) if method in ("realloc", "grow_in_place", "shrink_in_place") else ()
    with pytest.raises(ValueError, match="region is closed"):
        getattr(alloc, method)(r, *args)


def test_ctypes_numpy_from_a_closed_region_is_value_error() -> None:
    np = pytest.importorskip("numpy")
    r = closed_region()
    with pytest.raises(ValueError, match="region is closed"):
        np.frombuffer(r, dtype=np.uint8)
    with pytest.raises(ValueError, match="region is closed"):
        (ctypes.c_char * 10).from_buffer(r)


# ---------------------------------------------------------------- indexing like bytearray


def test_indexing_gives_ints_like_bytearray(region: Region) -> None:
    reference = bytearray(b"0123456789")
    for i in range(-10, 10):
        assert region[i] == reference[i]


@pytest.mark.parametrize(
    "key",
    [
        slice(None),
        slice(2, 5),
        slice(-3, None),
        slice(None, -7),
        slice(5, 2),
        slice(0, 100),
        slice(-100, 3),
        slice(None, None, 2),
        slice(None, None, -1),
        slice(8, 1, -3),
    ],
    ids=repr,
)
def test_slicing_gives_bytes_like_bytearray(region: Region, key: slice) -> None:
    assert region[key] == bytes(bytearray(b"0123456789")[key])
    assert type(region[key]) is bytes


@pytest.mark.parametrize("index", [10, 11, -11, 2**70, -(2**70)])
def test_indexing_out_of_bounds_is_index_error(region: Region, index: int) -> None:
    with pytest.raises(IndexError):
        region[index]
    with pytest.raises(IndexError):
        region[index] = 1


@pytest.mark.parametrize("key", [1.0, "1", None, (1,), ..., True + 0.5], ids=repr)
def test_indexing_with_a_non_integer_is_type_error(region: Region, key: object) -> None:
    with pytest.raises(TypeError, match="region indices must be integers or slices"):
        region[key]  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="region indices must be integers or slices"):
        region[key] = 1  # type: ignore[index]


def test_indexing_accepts_objects_with_index(region: Region) -> None:
    np = pytest.importorskip("numpy")
    assert region[np.int64(1)] == ord("1")
    assert region[True] == ord("1")  # as bytearray: bool is an int


def test_item_assignment_writes_one_byte(region: Region) -> None:
    region[0] = 0x41
    region[-1] = 0x5A
    assert bytes(region) == b"A12345678Z"


@pytest.mark.parametrize("value", [256, -1])
def test_item_assignment_of_a_value_outside_a_byte_is_value_error(
    region: Region, value: int
) -> None:
    with pytest.raises(ValueError):
        region[0] = value
    assert region[0] == ord("0")


def test_item_assignment_of_bytes_is_type_error(region: Region) -> None:
    with pytest.raises(TypeError):
        region[0] = b"A"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (slice(2, 5), b"abc"),
        (slice(None), b"abcdefghij"),
        (slice(None, None, 2), b"abcde"),
        (slice(-2, None), bytearray(b"yz")),
        (slice(0, 3), memoryview(b"XYZ")),
        (slice(4, 4), b""),
    ],
    ids=repr,
)
def test_slice_assignment_of_the_same_length_works_like_bytearray(
    region: Region, key: slice, value: bytes
) -> None:
    reference = bytearray(b"0123456789")
    reference[key] = value
    region[key] = value
    assert bytes(region) == bytes(reference)


@pytest.mark.parametrize("value", [b"ab", b"abcd", b""], ids=repr)
def test_slice_assignment_of_another_length_is_value_error(region: Region, value: bytes) -> None:
    with pytest.raises(ValueError):
        region[2:5] = value
    assert bytes(region) == b"0123456789"


def test_iteration_gives_the_bytes_as_ints(region: Region) -> None:
    assert list(region) == list(b"0123456789")


def test_bytes_of_a_region_is_its_size_in_bytes(region: Region) -> None:
    assert bytes(region) == b"0123456789"


# ---------------------------------------------------------------- buffer protocol


def test_memoryview_covers_the_size_not_the_capacity(region: Region) -> None:
    with memoryview(region) as view:
        assert view.nbytes == 10
        assert view.format == "B"
        assert view.readonly is False
        assert view.contiguous


def test_memoryview_writes_through_to_the_region(region: Region) -> None:
    with memoryview(region) as view:
        view[1:3] = b"ab"
    assert bytes(region) == b"0ab3456789"


@pytest.mark.parametrize("perms", [R, R | X], ids=str)
def test_a_read_only_region_exports_a_read_only_buffer(perms: Perm) -> None:
    with allocator_for(perms).alloc(8) as r:
        with memoryview(r) as view:
            assert view.readonly
            assert bytes(view) == bytes(8)
            with pytest.raises(TypeError, match="read-only"):
                view[0] = 1
        with pytest.raises(TypeError, match="read-only"):
            r[0] = 1
        with pytest.raises(TypeError, match="read-only"):
            r[0:2] = b"ab"
        assert r[0] == 0


@pytest.mark.parametrize("perms", [Perm.NONE, W, X, W | X], ids=str)
def test_a_region_that_is_not_readable_refuses_to_export(perms: Perm) -> None:
    with allocator_for(perms).alloc(8) as r:
        with pytest.raises(BufferError, match="not readable"):
            memoryview(r)
        with pytest.raises(BufferError, match="not readable"):
            r[0]
        with pytest.raises(BufferError, match="not readable"):
            bytes(r)
        assert r._exports == 0


def test_writable_export_of_a_read_only_region_is_buffer_error() -> None:
    with MapAlloc(write=False).alloc(8) as r:
        with pytest.raises((BufferError, TypeError)):
            (ctypes.c_char * 8).from_buffer(r)
        assert r._exports == 0


def test_reading_an_unreadable_region_through_the_api_cannot_crash() -> None:
    def body() -> None:
        with MapAlloc(read=False, write=False).alloc(8) as r:
            for use in (bytes, memoryview, lambda r: r[0], lambda r: r[:]):
                with contextlib.suppress(BufferError):
                    use(r)

    assert run_in_child(body) == 0


def test_writing_a_read_only_region_through_ctypes_is_what_kills_a_process() -> None:
    def body() -> None:
        with MapAlloc(write=False).alloc(8) as r:
            ctypes.memset(r.address, 1, 1)

    assert run_in_child(body) == SIGSEGV


# ---------------------------------------------------------------- export rules


def exporters() -> list[tuple[str, object]]:
    """(name, make) pairs: ways to export a region's buffer."""
    result: list[tuple[str, object]] = [
        ("memoryview", memoryview),
        ("ctypes", lambda r: (ctypes.c_char * len(r)).from_buffer(r)),
    ]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return result
    result.append(("numpy", lambda r: np.frombuffer(r, dtype=np.uint8)))
    return result


EXPORTERS = exporters()
EXPORT_IDS = [name for name, _ in EXPORTERS]


@pytest.mark.parametrize("make", [make for _, make in EXPORTERS], ids=EXPORT_IDS)
def test_an_exported_buffer_pins_the_region(make: object) -> None:
    alloc = MapAlloc()
    r = alloc.alloc(3 * P)
    r[:] = data = pattern(3 * P)
    exported = make(r)  # type: ignore[operator]
    assert r._exports == 1
    before = (r.address, r.size, r.capacity)
    with pytest.raises(BufferError):
        alloc.dealloc(r)
    with pytest.raises(BufferError):
        r.close()
    with pytest.raises(BufferError):
        alloc.realloc(r, 4 * P)
    with pytest.raises(BufferError):
        alloc.shrink_in_place(r, P)
    assert (r.address, r.size, r.capacity) == before
    assert not r.closed
    assert bytes(exported) == data
    del exported
    gc.collect()
    assert r._exports == 0
    alloc.dealloc(r)
    assert r.closed


@pytest.mark.parametrize("make", [make for _, make in EXPORTERS], ids=EXPORT_IDS)
def test_an_exported_buffer_shares_the_regions_memory(make: object, region: Region) -> None:
    exported = make(region)  # type: ignore[operator]
    region[0] = 0x41
    assert bytes(exported)[:3] == b"A12"
    del exported


def test_each_export_is_counted(region: Region) -> None:
    first = memoryview(region)
    second = memoryview(region)
    third = first[2:5]  # a slice of a view shares the first export
    assert region._exports == 2
    first.release()
    assert region._exports == 2  # the slice still holds the export
    third.release()
    first.release()
    assert region._exports == 1
    second.release()
    assert region._exports == 0


def test_a_numpy_array_on_a_read_only_region_is_read_only() -> None:
    np = pytest.importorskip("numpy")
    with MapAlloc(write=False).alloc(16) as r:
        array = np.frombuffer(r, dtype=np.uint8)
        assert not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1
        del array


def test_a_numpy_view_of_a_numpy_array_keeps_the_pin() -> None:
    np = pytest.importorskip("numpy")
    alloc = MapAlloc()
    r = alloc.alloc(64)
    view = np.frombuffer(r, dtype=np.uint32)[4:8].reshape(2, 2)
    with pytest.raises(BufferError):
        alloc.dealloc(r)
    del view
    alloc.dealloc(r)


def test_a_clean_with_block_that_cannot_close_raises_buffer_error() -> None:
    region = MapAlloc().alloc(P)
    view = memoryview(region)
    refused = pytest.raises(BufferError, match="the region was not closed: cannot close")
    with refused as info, region:
        pass
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not region.closed
    view.release()
    region.close()


def test_with_of_a_closed_region_is_value_error() -> None:
    region = MapAlloc().alloc(P)
    region.close()
    with pytest.raises(ValueError, match="region is closed"), region:
        pass


def test_with_block_of_a_subclass_calls_its_close() -> None:
    from mmap_alloc import SharedRegion

    closed: list[bool] = []

    class Logged(SharedRegion):
        def close(self) -> None:
            closed.append(True)
            super().close()

    with Logged.create(P) as region:
        assert type(region) is Logged
    assert closed == [True] and region.closed


def test_with_block_keeps_its_exception_when_the_region_cannot_close() -> None:
    region = MapAlloc().alloc(P)
    with pytest.raises(KeyError) as info, region:
        view = memoryview(region)
        raise KeyError("from the body")
    assert any("not closed" in note for note in info.value.__notes__)
    assert not region.closed
    view.release()
    region.close()


# ================================================================ Region as a bytes-like object
# (API.md "Region as a bytes-like object"; docs/region.md compares it with mmap.mmap)

MiB = 1 << 20


def bytearray_error(call: Callable[[bytearray], object]) -> tuple[type, str] | None:
    """The exception ``call`` raises on a bytearray of b"0123456789", its message
    with "bytearray" read as "region"; None when it raises nothing."""
    try:
        call(bytearray(b"0123456789"))
    except Exception as exc:  # any exception is the answer
        return type(exc), str(exc).replace("bytearray", "region")
    return None


def region_error(region: Region, call: Callable[[Region], object]) -> tuple[type, str] | None:
    try:
        call(region)
    except Exception as exc:
        return type(exc), str(exc)
    return None


class Index:
    """An object with __index__ (as numpy integers have)."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


# ---------------------------------------------------------------- items and slices


@pytest.mark.parametrize(
    "key",
    [0, 9, -1, -10, True, Index(3), Index(-2), slice(Index(1), Index(8), Index(2))],
    ids=repr,
)
def test_every_index_form_reads_as_bytearray(region: Region, key: Any) -> None:
    assert region[key] == bytearray(b"0123456789")[key]


@pytest.mark.parametrize(
    "key",
    [1.0, "1", None, (1,), (1, 2), ..., b"1", [1], 2**70, -(2**70), 10, -11, Index(10), 1j],
    ids=repr,
)
@pytest.mark.parametrize("value", [1, 300, "x"], ids=repr)
def test_bad_indices_raise_what_bytearray_raises(region: Region, key: Any, value: Any) -> None:
    assert region_error(region, lambda r: r[key]) == bytearray_error(lambda b: b[key])
    expected = bytearray_error(lambda b: b.__setitem__(key, value))
    assert region_error(region, lambda r: r.__setitem__(key, value)) == expected
    assert bytes(region) == b"0123456789"


@pytest.mark.parametrize("value", [256, -1, 2**70, b"A", "A", 1.0, None, Index(300), [1]], ids=repr)
def test_bad_item_values_raise_what_bytearray_raises(region: Region, value: Any) -> None:
    expected = bytearray_error(lambda b: b.__setitem__(0, value))
    assert expected is not None
    assert region_error(region, lambda r: r.__setitem__(0, value)) == expected
    assert bytes(region) == b"0123456789"


def test_item_assignment_accepts_index_objects(region: Region) -> None:
    region[Index(1)] = Index(0x41)
    assert region[1] == 0x41


@pytest.mark.parametrize(
    "key",
    [slice(1.0, 2), slice(None, "a"), slice(0, 5, 0), slice(2**70, None), slice(None, -(2**70))],
    ids=repr,
)
def test_bad_slices_behave_as_bytearray(region: Region, key: slice) -> None:
    reference = bytearray(b"0123456789")
    if bytearray_error(lambda b: b[key]) is None:
        assert region[key] == reference[key]
    else:
        assert region_error(region, lambda r: r[key]) == bytearray_error(lambda b: b[key])


@pytest.mark.parametrize(
    "value",
    [
        [0x61, 0x62, 0x63],
        range(97, 100),
        (x for x in b"abc"),
        memoryview(b"xabcx")[1:4],
        memoryview(b"a-b-c")[::2],
        bytearray(b"abc"),
    ],
    ids=["list", "range", "generator", "memoryview", "non-contiguous", "bytearray"],
)
def test_slice_assignment_takes_any_bytes_like_object_or_iterable_of_ints(
    region: Region, value: Any
) -> None:
    region[2:5] = value
    assert bytes(region) == b"01abc56789"


def test_slice_assignment_takes_numpy_arrays_and_arrays(region: Region) -> None:
    import array

    np = pytest.importorskip("numpy")
    region[0:4] = np.arange(1, 5, dtype=np.uint8)
    region[4:8] = array.array("B", [5, 6, 7, 8])
    assert bytes(region) == bytes(range(1, 9)) + b"89"


@pytest.mark.parametrize(
    "value", [5, "abc", 1.5, None, object(), [1, 2, 300], [1, "a", 3]], ids=repr
)
def test_slice_assignment_of_what_is_not_bytes_raises_what_bytearray_raises(
    region: Region, value: Any
) -> None:
    expected = bytearray_error(lambda b: b.__setitem__(slice(2, 5), value))
    assert expected is not None
    if "cannot convert" in expected[1]:  # not iterable: bytearray names itself
        expected = (
            TypeError,
            "can assign only bytes, buffers, or iterables of ints in range(0, 256)",
        )
    assert region_error(region, lambda r: r.__setitem__(slice(2, 5), value)) == expected
    assert bytes(region) == b"0123456789"


@pytest.mark.parametrize(
    ("key", "value", "given", "wanted"),
    [
        (slice(2, 5), b"ab", 2, 3),
        (slice(2, 5), b"abcd", 4, 3),
        (slice(None, None, 2), b"abc", 3, 5),
        (slice(None, None, -3), b"", 0, 4),
    ],
    ids=repr,
)
def test_a_wrong_size_slice_assignment_is_a_value_error_naming_the_sizes(
    region: Region, key: slice, value: bytes, given: int, wanted: int
) -> None:
    with pytest.raises(
        ValueError, match=rf"wrong size: {given} byte\(s\) given for a slice of {wanted} byte"
    ):
        region[key] = value
    assert bytes(region) == b"0123456789"


@pytest.mark.parametrize("key", [0, -1, slice(0, 2), slice(None, None, 2)], ids=repr)
def test_deleting_items_is_a_type_error_as_for_bytes(region: Region, key: Any) -> None:
    with pytest.raises(TypeError, match="region does not support item deletion"):
        del region[key]
    with pytest.raises(TypeError, match=r"(doesn.t|does not) support item deletion"):
        del cast(Any, b"0123456789")[key]
    assert bytes(region) == b"0123456789"


@pytest.mark.parametrize(
    "key", [slice(1, 6), slice(None, None, 2), slice(6, 1, -1), slice(5, None, -2)], ids=repr
)
def test_assigning_the_regions_own_bytes_copies_them_first(region: Region, key: slice) -> None:
    reference = bytearray(b"0123456789")
    n = len(reference[key])
    reference[key] = bytes(reference[1 : 1 + n])
    with region.view(1, n) as source:
        region[key] = source
    assert bytes(region) == bytes(reference)


def test_an_index_that_closes_the_region_finds_it_closed() -> None:
    region = MapAlloc().alloc(10)

    class Closing:
        def __index__(self) -> int:
            region.close()
            return 1

    with pytest.raises(ValueError, match="region is closed"):
        region[Closing()]
    region = MapAlloc().alloc(10)
    with pytest.raises(ValueError, match="region is closed"):
        region[Closing()] = 1
    region = MapAlloc().alloc(10)
    with pytest.raises(ValueError, match="region is closed"):
        region[0] = Closing()
    region = MapAlloc().alloc(10)
    with pytest.raises(ValueError, match="region is closed"):
        region[: Closing()] = b"x"
    region = MapAlloc().alloc(10)
    with pytest.raises(ValueError, match="region is closed"):
        region.find(b"x", Closing())


def test_an_index_that_removes_write_access_is_checked_after() -> None:
    with MapAlloc().alloc(10) as region:

        class Protecting:
            def __index__(self) -> int:
                region.protect(Perm.READ)
                return 1

        with pytest.raises(TypeError, match="read-only"):
            region[Protecting()] = 1
        assert region[1] == 0


# ---------------------------------------------------------------- hypothesis: against bytearray

SIZE = 3 * P // 2  # crosses a page boundary
indices = st.one_of(st.integers(-SIZE - 10, SIZE + 10), st.sampled_from([2**63, -(2**63), 2**70]))
slice_bounds = st.one_of(st.none(), st.integers(-SIZE - 10, SIZE + 10), st.just(2**70))
slices = st.builds(slice, slice_bounds, slice_bounds, st.one_of(st.none(), st.integers(-9, 9)))
needles = st.one_of(
    st.binary(max_size=4),
    st.integers(0, 255),
    st.tuples(st.integers(0, SIZE), st.integers(0, 20)),  # a piece of the contents
)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("get"), indices),
        st.tuples(st.just("set"), indices, st.integers(-2, 257)),
        st.tuples(st.just("getslice"), slices),
        st.tuples(st.just("setslice"), slices, st.integers(0, 255)),
        st.tuples(st.sampled_from(["find", "rfind"]), needles, slice_bounds, slice_bounds),
        st.tuples(st.just("in"), needles),
    ),
    max_size=25,
)


def outcome(call: Callable[[], object]) -> object:
    """What a call gives: its result, or the type of the exception it raised."""
    try:
        return call()
    except Exception as exc:
        return type(exc)


@settings(deadline=None, max_examples=150)
@given(st.integers(0, 2**32), operations)
def test_a_region_behaves_as_a_bytearray_of_its_size(seed: int, ops: list[tuple[Any, ...]]) -> None:
    contents = bytes(random.Random(seed).choices(b"abc\0\xff", k=SIZE))  # needles recur
    reference = bytearray(contents)
    with MapAlloc().alloc(SIZE) as region:
        region[:] = contents
        for op in ops:
            name = op[0]
            if name == "get":
                key = op[1]
                assert outcome(lambda: region[key]) == outcome(lambda: reference[key])  # noqa: B023
            elif name == "set":
                key, value = op[1], op[2]
                assert outcome(lambda: region.__setitem__(key, value)) == outcome(  # noqa: B023
                    lambda: reference.__setitem__(key, value)  # noqa: B023
                )
            elif name == "getslice":
                key = op[1]
                assert outcome(lambda: region[key]) == outcome(lambda: bytes(reference[key]))  # noqa: B023
            elif name == "setslice":
                key, fill = op[1], op[2]
                try:
                    n = len(reference[key])
                except ValueError:  # step 0
                    assert outcome(lambda: region.__setitem__(key, b"")) is ValueError  # noqa: B023
                    continue
                data = bytes((fill + k) % 256 for k in range(n))
                region[key] = data
                reference[key] = data
            else:
                needle = op[1]
                if isinstance(needle, tuple):
                    needle = bytes(reference[needle[0] : needle[0] + needle[1]])
                if name == "in":
                    assert outcome(lambda: needle in region) == outcome(  # noqa: B023
                        lambda: needle in reference  # noqa: B023
                    )
                else:
                    args = (needle, *op[2:])
                    assert outcome(lambda: getattr(region, name)(*args)) == outcome(  # noqa: B023
                        lambda: getattr(reference, name)(*args)  # noqa: B023
                    )
        assert bytes(region) == bytes(reference)


# ---------------------------------------------------------------- in, find, rfind


def zero_filled(alloc: MapAlloc, size: int = 4 * P) -> Region:
    return alloc.alloc(size)


def test_a_zero_byte_is_in_a_zero_filled_region(alloc: MapAlloc) -> None:
    with zero_filled(alloc) as region:
        assert b"\x00" in region
        assert 0 in region
        assert bytes(16) in region
        assert b"\x01" not in region
        assert 1 not in region


@pytest.mark.parametrize(
    "needle",
    [b"345", b"", bytearray(b"9"), memoryview(b"01"), 0x35, b"x", b"98", Index(0x39)],
    ids=repr,
)
def test_in_is_a_subsequence_test_as_for_bytes(region: Region, needle: Any) -> None:
    assert (needle in region) == (needle in b"0123456789")


def test_a_numpy_integer_needle_is_read_as_bytes_reads_it(region: Region) -> None:
    np = pytest.importorskip("numpy")
    needle = np.int64(0x35)  # __index__ and a buffer of 8 bytes
    reference = b"5x" + needle.tobytes()  # the byte 0x35 at 0, the 8 bytes at 2
    region[:] = reference
    assert (needle in region) == (needle in reference) is True  # `in`: the byte value
    assert region.find(needle) == reference.find(needle) == 2  # find: the buffer
    assert region.rfind(needle) == reference.rfind(needle) == 2
    big = np.int64(0x3535)
    assert region_error(region, lambda r: big in r) == bytearray_error(lambda b: big in b)
    assert region.find(big) == reference.find(big) == -1


@pytest.mark.parametrize("needle", ["5", 1.5, None, [53], 256, -1], ids=repr)
def test_a_bad_needle_raises_what_bytes_raises(region: Region, needle: Any) -> None:
    assert region_error(region, lambda r: needle in r) == bytearray_error(lambda b: needle in b)
    assert region_error(region, lambda r: r.find(needle)) == bytearray_error(
        lambda b: b.find(needle)
    )
    assert region_error(region, lambda r: r.rfind(needle)) == bytearray_error(
        lambda b: b.rfind(needle)
    )


@pytest.mark.parametrize(
    "args",
    [
        (b"5",),
        (b"5", 6),
        (b"5", 2, 5),
        (b"5", -5),
        (b"5", None, -4),
        (b"5", None, None),
        (b"", 10),
        (b"", 11),
        (b"", 5, 2),
        (b"", -100, 100),
        (b"34", 3),
        (b"34", 2, 4),
        (b"34", 2, 5),
        (0x30, -(2**70), 2**70),
        (b"9", Index(9)),
        (b"0", 0, Index(-9)),
    ],
    ids=repr,
)
def test_find_and_rfind_take_start_and_end_as_bytes_find(
    region: Region, args: tuple[Any, ...]
) -> None:
    reference = b"0123456789"
    assert region.find(*args) == reference.find(*args)
    assert region.rfind(*args) == reference.rfind(*args)


@pytest.mark.parametrize("start", [1.0, "1", [1]], ids=repr)
def test_find_with_a_bad_start_raises_what_bytes_raises(region: Region, start: Any) -> None:
    assert region_error(region, lambda r: r.find(b"1", start)) == bytearray_error(
        lambda b: b.find(b"1", start)
    )
    assert region_error(region, lambda r: r.rfind(b"1", 0, start)) == bytearray_error(
        lambda b: b.rfind(b"1", 0, start)
    )


def test_find_takes_from_one_to_three_positional_arguments(region: Region) -> None:
    with pytest.raises(TypeError):
        region.find()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        region.find(b"1", 0, 1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="keyword"):
        region.find(b"1", start=1)  # type: ignore[call-arg]


def test_find_searches_a_large_region_without_copying_it(alloc: MapAlloc) -> None:
    with alloc.alloc(64 * MiB) as region:
        region[-16:] = b"needle at the end"[:16]
        region[5 * MiB] = 0x6E  # a first byte alone
        tracemalloc.start()
        try:
            assert region.find(b"needle at the en") == 64 * MiB - 16
            assert region.rfind(b"n") == 64 * MiB - 1
            assert b"needle" in region
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024  # nothing close to a copy of 64 MiB


def test_rfind_of_a_repeated_byte_pattern(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        region[:] = b"ab" * P
        reference = b"ab" * P
        for needle in (b"ab", b"ba", b"bab", b"abab", b"b", b"aa"):
            assert region.rfind(needle) == reference.rfind(needle)
            assert region.find(needle, 7) == reference.find(needle, 7)


# ---------------------------------------------------------------- iteration


def test_iteration_is_lazy_and_never_copies(alloc: MapAlloc) -> None:
    with alloc.alloc(64 * MiB) as region:
        tracemalloc.start()
        try:
            iterator = iter(region)
            assert next(iterator) == 0
            region[1] = 7  # written after iter(): seen, the iterator reads the region
            assert next(iterator) == 7
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 64 * 1024
        assert iterator.__length_hint__() == 64 * MiB - 2  # type: ignore[attr-defined]
        del iterator


def test_iteration_yields_ints_as_bytes_and_bytearray_do(region: Region) -> None:
    assert list(region) == list(b"0123456789") == list(bytearray(b"0123456789"))
    assert all(type(item) is int for item in region)


def test_an_iterator_of_a_region_closed_meanwhile_raises_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc(10)
    iterator = iter(region)
    next(iterator)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        next(iterator)


def test_an_iterator_stops_at_a_page_made_unreadable_meanwhile(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        iterator = iter(region)
        assert next(iterator) == 0
        region.protect(Perm.NONE, P, P)
        assert sum(1 for _ in itertools.islice(iterator, P - 1)) == P - 1
        with pytest.raises(BufferError, match=f"not readable at offset {P}"):
            next(iterator)
        region.protect(R | W)
        assert sum(1 for _ in iterator) == P
        assert list(iterator) == []


def test_an_iterator_ends_at_the_size_after_a_shrink(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        iterator = iter(region)
        alloc.shrink_in_place(region, 3)
        assert list(iterator) == [0, 0, 0]


# ---------------------------------------------------------------- closed regions

CLOSED_USES = {
    "len": len,
    "bool": bool,
    "getitem": lambda r: r[0],
    "getitem-neg": lambda r: r[-1],
    "getslice": lambda r: r[0:2],
    "getslice-step": lambda r: r[::2],
    "setitem": lambda r: r.__setitem__(0, 1),
    "setslice": lambda r: r.__setitem__(slice(0, 2), b"ab"),
    "setslice-list": lambda r: r.__setitem__(slice(0, 2), [1, 2]),
    "iter": iter,
    "in": lambda r: b"a" in r,
    "in-int": lambda r: 0 in r,
    "find": lambda r: r.find(b"a"),
    "rfind": lambda r: r.rfind(b"a", 0, 5),
    "view": lambda r: r.view(),
    "view-part": lambda r: r.view(0, 2),
    "advise": lambda r: r.advise("willneed"),
    "lock": lambda r: r.lock(),
    "unlock": lambda r: r.unlock(),
    "stats": lambda r: r.stats(),
}


@pytest.mark.parametrize("use", list(CLOSED_USES.values()), ids=list(CLOSED_USES))
def test_every_bytes_like_use_of_a_closed_region_is_value_error(use: Any) -> None:
    with pytest.raises(ValueError, match="region is closed"):
        use(closed_region())


def test_len_and_bool_of_a_closed_region_raise_as_for_a_closed_mmap() -> None:
    stdlib = mmap.mmap(-1, 10)
    stdlib.close()
    for use in (len, bool):
        with pytest.raises(ValueError, match="mmap closed"):
            use(stdlib)
        with pytest.raises(ValueError, match="region is closed"):
            use(closed_region())


# ---------------------------------------------------------------- page protections


@pytest.fixture
def mixed(alloc: MapAlloc) -> Iterator[Region]:
    """Four pages: read/write, no access, read-only, read/write; page k filled with k + 1."""
    region = alloc.alloc(4 * P)
    region[:] = b"".join(bytes([k + 1]) * P for k in range(4))
    region.protect(Perm.NONE, P, P)
    region.protect(R, 2 * P, P)
    yield region
    region.close()


READS = {
    "item": lambda r, lo, hi: [r[i] for i in range(lo, hi)],
    "slice": lambda r, lo, hi: r[lo:hi],
    "find": lambda r, lo, hi: r.find(b"\xff", lo, hi),
    "rfind": lambda r, lo, hi: r.rfind(b"\xff", lo, hi),
    "view": lambda r, lo, hi: r.view(lo, hi - lo).release(),
}


@pytest.mark.parametrize("read", list(READS.values()), ids=list(READS))
@pytest.mark.parametrize(
    ("lo", "hi", "bad"),
    [
        (0, P, None),  # page 0: read/write
        (2 * P, 4 * P, None),  # read-only then read/write
        (P, P + 1, P),  # page 1: no access
        (P - 1, P + 1, P),  # crossing into it
        (2 * P - 1, 2 * P + 1, 2 * P - 1),  # crossing out of it
        (0, 4 * P, P),  # the whole region
    ],
    ids=["rw", "r-then-rw", "none", "into-none", "out-of-none", "all"],
)
def test_reading_checks_every_page_it_touches(
    mixed: Region, read: Callable[[Region, int, int], object], lo: int, hi: int, bad: int | None
) -> None:
    if bad is None:
        read(mixed, lo, hi)
    elif read is READS["view"]:
        with pytest.raises(BufferError, match="not readable"):
            read(mixed, lo, hi)
    else:
        with pytest.raises(BufferError, match=f"not readable at offset {bad}"):
            read(mixed, lo, hi)
    assert mixed._exports == 0


WRITES = {
    "item": lambda r, lo, hi: r.__setitem__(lo, 9),
    "slice": lambda r, lo, hi: r.__setitem__(slice(lo, hi), bytes(hi - lo)),
}


@pytest.mark.parametrize("write", list(WRITES.values()), ids=list(WRITES))
@pytest.mark.parametrize(
    ("lo", "hi", "bad", "kind"),
    [
        (0, P, None, ""),
        (3 * P, 4 * P, None, ""),
        (2 * P, 2 * P + 1, 2 * P, "read-only"),
        (2 * P - 1, 2 * P + 1, 2 * P - 1, "not writable"),  # no access, then read-only
        (3 * P - 1, 3 * P + 1, 3 * P - 1, "read-only"),  # read-only into read/write
    ],
    ids=["rw", "last-rw", "read-only", "none-then-r", "r-then-rw"],
)
def test_writing_checks_every_page_it_touches(
    mixed: Region,
    write: Callable[[Region, int, int], object],
    lo: int,
    hi: int,
    bad: int | None,
    kind: str,
) -> None:
    before = [mixed[0], mixed[3 * P], mixed[4 * P - 1]]
    if bad is None:
        write(mixed, lo, hi)
        return
    with pytest.raises(TypeError, match=f"cannot write to the region at offset {bad}: .*{kind}"):
        write(mixed, lo, hi)
    assert [mixed[0], mixed[3 * P], mixed[4 * P - 1]] == before  # nothing written


@pytest.mark.parametrize(
    ("key", "touches_page_1"),
    [
        (slice(0, 3 * P, 2 * P), False),  # elements on pages 0 and 2: steps over page 1
        (slice(2 * P, None, -2 * P), False),  # the same, backwards
        (slice(P - 1, 4 * P, 2 * P), False),  # P - 1 and 3P - 1: pages 0 and 2
        (slice(0, 3 * P, P), True),  # 0, P, 2P
        (slice(P + 5, P + 6, 7), True),
        (slice(4 * P - 1, None, -P), True),
        (slice(P - 1, None, -1), False),
    ],
    ids=repr,
)
def test_an_extended_slice_checks_the_pages_of_its_elements(
    mixed: Region, key: slice, touches_page_1: bool
) -> None:
    elements = range(4 * P)[key]
    if touches_page_1:
        first = next(i for i in sorted(elements) if P <= i < 2 * P)
        with pytest.raises(BufferError, match=f"not readable at offset {first}"):
            mixed[key]
    else:
        assert mixed[key] == bytes(i // P + 1 for i in elements)


def test_an_extended_slice_write_is_refused_at_its_read_only_element(mixed: Region) -> None:
    with pytest.raises(TypeError, match=f"offset {2 * P}: its pages are read-only"):
        mixed[0 : 3 * P : 2 * P] = b"ab"  # pages 0 and 2
    assert mixed[0] == 1
    mixed[0 : 4 * P : 3 * P] = b"ab"  # pages 0 and 3, both writable
    assert (mixed[0], mixed[3 * P]) == (ord("a"), ord("b"))
    with pytest.raises(TypeError, match=f"offset {2 * P - 1}: its pages are not writable"):
        mixed[4 * P - 1 : 0 : -P] = b"wxyz"  # 4P-1, 3P-1 (read-only), 2P-1 (none), P-1
    assert mixed[4 * P - 1] == 4


def test_in_over_a_region_with_an_unreadable_page_is_buffer_error(mixed: Region) -> None:
    with pytest.raises(BufferError, match=f"not readable at offset {P}"):
        b"\x03" in mixed  # noqa: B015
    assert mixed.find(b"\x03", 2 * P) == 2 * P  # searching only readable pages works
    assert mixed.rfind(b"\x01", 0, P) == P - 1


@pytest.mark.parametrize(
    "use",
    [
        lambda r: r[0],
        lambda r: r[-1],
        lambda r: r[:],
        lambda r: r[::-3],
        lambda r: b"" in r,
        lambda r: r.find(b"x"),
        lambda r: next(iter(r)),
        lambda r: r.view(0, 1),
    ],
    ids=["item", "last", "slice", "extended", "in", "find", "iter", "view"],
)
@pytest.mark.parametrize("perms", [Perm.NONE, W, X, W | X], ids=str)
def test_a_region_without_read_refuses_every_read(use: Any, perms: Perm) -> None:
    with allocator_for(perms).alloc(P) as r:
        with pytest.raises(BufferError, match="not readable"):
            use(r)
        assert r._exports == 0


@pytest.mark.parametrize(
    "use",
    [
        lambda r: r.__setitem__(0, 1),
        lambda r: r.__setitem__(-1, 1),
        lambda r: r.__setitem__(slice(0, 2), b"ab"),
        lambda r: r.__setitem__(slice(None, None, -2), bytes(P // 2)),
    ],
    ids=["item", "last", "slice", "extended"],
)
@pytest.mark.parametrize("perms", [R, R | X], ids=str)
def test_a_region_without_write_refuses_every_write(use: Any, perms: Perm) -> None:
    with allocator_for(perms).alloc(P) as r:
        with pytest.raises(TypeError, match="read-only"):
            use(r)
        assert r[:] == bytes(P)


def test_guard_pages_installed_by_madvise_are_unreadable(alloc: MapAlloc) -> None:
    from mmap_alloc.features import madv_guard_install

    if not madv_guard_install().available:
        pytest.skip("the kernel has no MADV_GUARD_INSTALL (Linux 6.13)")
    with alloc.alloc(3 * P) as region:
        region._madvise(MADV_GUARD_INSTALL, P, P)
        with pytest.raises(BufferError, match=f"not readable at offset {P}"):
            region[P]
        with pytest.raises(TypeError, match=f"offset {P}"):
            region[P] = 1
        with pytest.raises(BufferError):
            region.view(P - 1, 2)
        assert region[0 : 3 * P : 2 * P] == b"\0\0"
        with region.view(2 * P, P) as view:
            view[0] = 5
        assert region[2 * P] == 5


# ---------------------------------------------------------------- view()


def test_a_view_is_exactly_the_bytes_asked_for(region: Region) -> None:
    with region.view(2, 5) as view:
        assert view.nbytes == 5
        assert bytes(view) == b"23456"
        assert not view.readonly
        view[0] = ord("A")
    assert bytes(region) == b"01A3456789"


@pytest.mark.parametrize(
    ("args", "expected"),
    [((), b"0123456789"), ((4,), b"456789"), ((10,), b""), ((3, 0), b""), ((0, 10), b"0123456789")],
    ids=repr,
)
def test_view_defaults_to_the_rest_of_the_size(
    region: Region, args: tuple[Any, ...], expected: bytes
) -> None:
    with region.view(*args) as view:
        assert bytes(view) == expected


def test_view_takes_keywords_and_index_objects(region: Region) -> None:
    with region.view(offset=Index(1), length=Index(2)) as view:
        assert bytes(view) == b"12"


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((-1,), ValueError, "offset must not be negative, got -1"),
        ((0, -1), ValueError, "length must not be negative, got -1"),
        ((11,), ValueError, r"offset 11 lies outside the region \(size 10\)"),
        ((2**70,), ValueError, "lies outside the region"),
        ((5, 6), ValueError, r"offset 5 \+ length 6 lies outside the region \(size 10\)"),
        ((0, 2**70), ValueError, "lies outside the region"),
        ((1.0,), TypeError, "offset must be an integer"),
        ((0, "1"), TypeError, "length must be an integer"),
    ],
    ids=repr,
)
def test_bad_view_arguments_name_the_argument(
    region: Region, args: tuple[Any, ...], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        region.view(*args)
    assert region._exports == 0


def test_a_view_past_the_size_is_refused_even_within_the_capacity(region: Region) -> None:
    with pytest.raises(ValueError, match="outside the region"):
        region.view(0, P)


def test_a_view_pins_the_region(alloc: MapAlloc) -> None:
    region = alloc.alloc(3 * P)
    view = region.view(P + 10, 20)
    assert region._exports == 1
    with pytest.raises(BufferError):
        region.close()
    with pytest.raises(BufferError):
        alloc.realloc(region, 64 * P)
    with pytest.raises(BufferError):
        region.protect(R, P, P)  # the view is writable: it needs WRITE of page 1
    region.protect(R, 0, P)  # other pages: fine
    region.protect(R, 2 * P, P)
    view.release()
    assert region._exports == 0
    region.close()


# ---------------------------------------------------------------- pin()


def test_a_pin_keeps_the_region_mapped_and_in_place_as_an_export_does(alloc: MapAlloc) -> None:
    region = alloc.alloc(3 * P)
    pin = region.pin()
    assert pin.address == region.address
    assert region._exports == 1
    with pytest.raises(BufferError, match="pin"):
        region.close()
    with pytest.raises(BufferError):
        alloc.dealloc(region)
    with pytest.raises(BufferError):
        alloc.realloc(region, 64 * P)
    with pytest.raises(BufferError):
        alloc.shrink_in_place(region, P)
    with pytest.raises(BufferError):
        region.protect(R)  # the pin holds the write access the region had
    del pin
    assert region._exports == 0
    region.close()


def test_a_pin_keeps_its_region_alive(alloc: MapAlloc) -> None:
    region = alloc.alloc(P)
    region[0] = 7
    pin = region.pin()
    address = pin.address
    del region
    gc.collect()
    assert ctypes.string_at(address, 1) == b"\x07"  # still mapped: the pin holds it
    del pin
    gc.collect()


def test_a_pin_of_a_read_only_region_allows_adding_write(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region:
        region.protect(R)
        pin = region.pin()
        region.protect(R | W)  # nothing the pin needs is taken
        with pytest.raises(BufferError):
            region.protect(Perm.NONE)
        del pin


def test_a_closed_region_cannot_be_pinned(alloc: MapAlloc) -> None:
    region = alloc.alloc(P)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        region.pin()


@pytest.mark.parametrize(
    ("offset", "length", "readonly"),
    [(0, P, False), (3 * P, P, False), (2 * P, P, True), (3 * P - 8, 16, True)],
    ids=["rw", "last-rw", "read-only", "r-and-rw"],
)
def test_a_view_is_read_only_if_a_page_it_touches_lacks_write(
    mixed: Region, offset: int, length: int, readonly: bool
) -> None:
    with mixed.view(offset, length) as view:
        assert view.readonly is readonly
        assert bytes(view) == bytes(mixed[offset : offset + length])
        if readonly:
            with pytest.raises(TypeError, match="read-only"):
                view[0] = 1


@pytest.mark.parametrize(
    ("offset", "length"), [(P, 1), (P - 8, 16), (2 * P - 8, 16), (0, 4 * P)], ids=repr
)
def test_a_view_touching_an_unreadable_page_is_buffer_error(
    mixed: Region, offset: int, length: int
) -> None:
    with pytest.raises(BufferError, match=f"bytes {offset} to {offset + length} .* not readable"):
        mixed.view(offset, length)
    assert mixed._exports == 0


def test_the_usable_middle_of_a_guarded_region_can_be_viewed(alloc: MapAlloc) -> None:
    with alloc.alloc(4 * P) as region:
        region.protect(Perm.NONE, 0, P)
        region.protect(Perm.NONE, 3 * P, P)
        with pytest.raises(BufferError):
            memoryview(region)
        with region.view(P, 2 * P) as view:
            view[:] = b"\x07" * (2 * P)
        assert region[P : 3 * P] == b"\x07" * (2 * P)


def test_pages_opened_in_a_reservation_can_be_viewed(alloc: MapAlloc) -> None:
    with alloc.reserve(64 * P) as reservation:
        reservation.protect(R | W, 8 * P, 2 * P)
        with reservation.view(8 * P, 2 * P) as view:
            view[-1] = 1
        assert reservation[10 * P - 1] == 1
        assert reservation.find(b"\x01", 8 * P, 10 * P) == 10 * P - 1
        with pytest.raises(BufferError):
            reservation.view(7 * P, 2 * P)
        with pytest.raises(BufferError):
            reservation[0]
        alloc.uncommit(reservation, 8 * P, 2 * P)
        reservation.protect(Perm.NONE)


# ---------------------------------------------------------------- advise()

DISCARDING = ("dontneed", "free", "pageout")


def advice_refused(name: str, exc: OSError) -> None:
    """Skip a test of advice the kernel refuses here, saying why."""
    pytest.skip(f"the kernel refuses {name!r} here: {exc}")


@pytest.mark.parametrize("name", list(ADVICE))
def test_every_advice_name_reaches_the_kernel(alloc: MapAlloc, name: str) -> None:
    populates = name in ("populate_read", "populate_write")
    with MapAlloc().alloc(4 * MiB, 2 * MiB) as region:
        if not populates:
            region[:] = b"\x05" * len(region)
        try:
            region.advise(name)
        except OSError as exc:
            assert exc.errno == errno.EINVAL
            assert repr(name) in str(exc)
            advice_refused(name, exc)
        if name == "dontneed":
            assert region.stats().resident_bytes == 0
            assert region[:P] == bytes(P)
        elif name == "free":
            assert set(region[:P]) <= {0, 5}  # freed lazily: old contents or zeros
        elif populates:  # every page faulted in by the advice alone
            skip_if_emulated(ignored_advice(f"MADV_{name.upper()}"))
            assert region.stats().resident_bytes == region.capacity
        else:
            assert region[:P] == b"\x05" * P and region[-1] == 5
        flag = {
            "random": "rr", "sequential": "sr", "hugepage": "hg", "nohugepage": "nh",
            "dontfork": "dc", "dontdump": "dd", "wipeonfork": "wf",
        }.get(name)  # fmt: skip
        if flag is not None:
            skip_if_emulated(ignored_advice(f"MADV_{name.upper()}"))
            assert flag in vm_flags(region.address)
        undo = {"dontfork": "dofork", "dontdump": "dodump", "wipeonfork": "keeponfork",
                "random": "normal", "sequential": "normal"}.get(name)  # fmt: skip
        if undo is not None:
            region.advise(undo)
            assert flag not in vm_flags(region.address)


def test_advice_applies_to_whole_pages_of_a_range(alloc: MapAlloc) -> None:
    with alloc.alloc(4 * P) as region:
        region[:] = b"\x01" * (4 * P)
        region.advise("dontneed", P, P + 1)  # rounds up to two pages
        assert region[:] == b"\x01" * P + bytes(2 * P) + b"\x01" * P
        region.advise("dontdump", 3 * P)
        skip_if_emulated(ignored_advice("MADV_DONTDUMP"))
        assert "dd" in vm_flags(region.address + 3 * P)
        assert "dd" not in vm_flags(region.address)


@pytest.mark.parametrize("name", ["bogus", "DONTNEED", "", 4, None], ids=repr)
def test_an_unknown_advice_is_a_value_error_listing_the_names(region: Region, name: object) -> None:
    with pytest.raises(ValueError, match="unknown advice") as info:
        region.advise(name)  # type: ignore[arg-type]
    for known in ADVICE:
        assert known in str(info.value)


@pytest.mark.parametrize(
    "args",
    [(1,), (P, 2 * P), (-P,), (2 * P,)],
    ids=["unaligned", "past-end", "negative", "outside"],
)
def test_advice_on_a_bad_range_is_a_value_error(region: Region, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="offset"):
        region.advise("willneed", *args)


@emulated_skip(ignored_advice("MADV_COLLAPSE"))
def test_advice_the_kernel_refuses_is_an_os_error_naming_it_and_its_kernel(
    alloc: MapAlloc,
) -> None:
    region = alloc.alloc(4 * P)  # no whole huge page: MADV_COLLAPSE refuses it
    with (
        region,
        pytest.raises(OSError, match=r"madvise\('collapse'\) failed: .*Linux 6\.1") as info,
    ):
        region.advise("collapse")
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", DISCARDING)
def test_discarding_advice_is_refused_on_pinned_code(name: str) -> None:
    code = b"\xc3"  # ret (x86-64); the function is never called
    with MapAlloc(exec=True).alloc(P) as region:
        region[:1] = code
        function = region.function(ctypes.CFUNCTYPE(None))
        with pytest.raises(BufferError, match="pinned code keeps its contents"):
            region.advise(name)
        assert region[:1] == code
        region.advise("willneed")  # advice that keeps contents is fine
        del function
        region.advise(name)


def test_discarding_advice_under_an_exported_buffer_is_allowed_as_uncommit(
    alloc: MapAlloc,
) -> None:
    with alloc.alloc(P) as region:
        region[:] = b"\x01" * P
        with region.view() as view:
            region.advise("dontneed")
            assert bytes(view) == bytes(P)


def test_dontfork_pages_read_as_zeros_through_an_inherited_view(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = b"\x01" * (3 * P)
        region.advise("dontfork", P, P)
        view = region.view()
        array = region.view(P, 8)

        def child() -> None:
            assert view[P : 2 * P] == bytes(P)  # a zero page, not a hole
            assert view[0] == 1 and view[2 * P] == 1
            assert bytes(array) == bytes(8)
            assert region[P] == 0
            view[P] = 9  # writable, as recorded
            assert region[P] == 9

        assert run_in_child(child) == 0
        assert region[P] == 1  # the parent keeps its pages
        view.release()
        array.release()


@emulated_skip(ignored_advice("MADV_DONTFORK"))
def test_a_stdlib_mmap_advised_dontfork_kills_a_child_that_reads_it() -> None:
    stdlib = mmap.mmap(-1, P)
    stdlib.madvise(mmap.MADV_DONTFORK)
    try:
        assert run_in_child(lambda: print(stdlib[0])) == SIGSEGV
    finally:
        stdlib.close()


@emulated_skip(ignored_advice("MADV_WIPEONFORK"))
def test_wipeonfork_pages_read_as_zeros_in_a_child(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region:
        region[:] = b"\x01" * P
        region.advise("wipeonfork")

        def child() -> None:
            assert region[:] == bytes(P)

        assert run_in_child(child) == 0
        assert region[0] == 1


def test_populate_advice_over_pages_without_the_access_names_the_page(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        region.protect(R, P, P)
        with pytest.raises(ValueError, match=f"page at offset {P} is not writable"):
            region.advise("populate_write")
        region.advise("populate_write", 0, P)
        region.protect(Perm.NONE, 0, P)
        with pytest.raises(ValueError, match="page at offset 0 is not readable"):
            region.advise("populate_read")


@FILLS_THE_MAP_COUNT
def test_unlock_and_advice_of_part_of_a_region_at_the_map_count_name_it() -> None:
    code = """
        from mmap_alloc import AllocError, MapAlloc
        from mmap_alloc._linux import PAGE_SIZE as page

        alloc = MapAlloc()
        locked = alloc.alloc(3 * page)
        locked.lock()
        plain = alloc.alloc(3 * page)
        fillers = []
        makers = (MapAlloc(write=False), MapAlloc(read=False, write=False))
        try:
            while True:  # alternate protections so that neighbours never merge
                fillers.append(makers[len(fillers) % 2].alloc(page))
        except AllocError:
            pass
        calls = {
            "unlock": lambda: locked.unlock(page, page),
            "dontdump": lambda: plain.advise("dontdump", page, page),
            "dontfork": lambda: plain.advise("dontfork", page, page),
            "hugepage": lambda: plain.advise("hugepage", page, page),
        }
        for name, call in calls.items():
            try:
                call()
            except AllocError as error:
                print(name, "|", error)
            else:
                print(name, "| done")
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **SMALL_ALLOCATIONS_FROM_MALLOC},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" | ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"unlock", "dontdump", "dontfork", "hugepage"}
    for name, message in lines.items():
        assert "vm.max_map_count" in message, (name, message)


@pytest.mark.parametrize("name", ["dontneed", "free", "pageout", "cold"])
def test_advice_refused_on_locked_pages_says_they_are_locked(alloc: MapAlloc, name: str) -> None:
    if name != "dontneed":
        skip_if_emulated(ignored_advice(f"MADV_{name.upper()}"))
    with alloc.alloc(P) as region:
        region[0] = 1
        region.lock()
        with pytest.raises(OSError, match=rf"madvise\('{name}'\) failed: .*lock") as info:
            region.advise(name)
        assert info.value.errno == errno.EINVAL
        assert region[0] == 1
        region.unlock()
        region.advise(name)


# ---------------------------------------------------------------- lock()


def test_lock_and_unlock_take_ranges_of_whole_pages(alloc: MapAlloc) -> None:
    with alloc.alloc(8 * P) as region:
        region.lock(2 * P, P + 1)
        assert region.stats().locked_bytes == 2 * P
        assert "lo" in vm_flags(region.address + 2 * P)
        region.unlock(2 * P, P)
        assert region.stats().locked_bytes == P
        region.unlock()
        assert region.stats().locked_bytes == 0
        region.unlock()  # unlocking unlocked pages does nothing


@pytest.mark.parametrize(
    "args",
    [(1,), (P, 8 * P), (-P,), (9 * P,)],
    ids=["unaligned", "past-end", "negative", "outside"],
)
def test_lock_on_a_bad_range_is_a_value_error(alloc: MapAlloc, args: tuple[Any, ...]) -> None:
    with alloc.alloc(8 * P) as region:
        with pytest.raises(ValueError, match="offset"):
            region.lock(*args)
        with pytest.raises(ValueError, match="offset"):
            region.unlock(*args)


def test_locking_beyond_rlimit_memlock_is_an_alloc_error_giving_the_limit() -> None:
    def child() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
        os.setgid(65534)
        os.setuid(65534)  # root's CAP_IPC_LOCK would bypass the limit
        with MapAlloc().alloc(MiB) as region:
            for on_fault in (False,) if EMULATED else (False, True):
                with pytest.raises(AllocError, match="RLIMIT_MEMLOCK is 65536 bytes") as info:
                    region.lock(on_fault=on_fault)
                assert info.value.errno in (errno.ENOMEM, errno.EPERM, errno.EAGAIN)
                assert str(MiB) in str(info.value)
            with pytest.raises(AllocError, match=f"cannot lock {32 * P} bytes"):
                region.lock(MiB - 32 * P)
            region.lock(0, 32 * 1024)  # within the limit
            region.unlock()

    assert run_in_child(child) == 0
    skip_if_emulated(MLOCK)  # what was not checked: mlock2(MLOCK_ONFAULT) past the limit


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


# ================================================================ the Region object itself


def test_regions_are_the_c_type_itself() -> None:
    with MapAlloc().alloc(P) as region:
        assert type(region) is Region
        assert isinstance(region, Region)
        assert type(region) is _mman.Region
        assert Region.__module__ == "mmap_alloc.region"


def test_a_region_object_is_at_most_144_bytes() -> None:
    with MapAlloc().alloc(P) as region:
        assert sys.getsizeof(region) <= 144  # a stdlib mmap object: 96


def test_a_region_made_after_others_died_starts_fresh() -> None:
    alloc = MapAlloc()
    for _ in range(200):  # dead regions, with exports, pins and weak references once
        region = alloc.alloc(2 * P)
        ref = weakref.ref(region)
        with memoryview(region):
            pass
        region.pin()
        region.protect(Perm.READ, P, P)
        alloc.dealloc(region)
        del region
        assert ref() is None
    fresh = alloc.alloc(3 * P)
    assert (fresh.size, fresh.capacity, fresh._exports, fresh._pins, fresh._busy) == (
        3 * P,
        3 * P,
        0,
        0,
        0,
    )
    assert fresh.protections() == [(0, 3 * P, Perm.READ | Perm.WRITE)]
    assert fresh._owner is alloc and not fresh.closed
    assert weakref.ref(fresh)() is fresh
    fresh[:] = b"\x01" * (3 * P)
    alloc.dealloc(fresh)


def test_the_python_members_are_attached_to_the_c_type() -> None:
    for name in ("perms", "backing", "protections", "advise", "lock", "stats", "ndarray"):
        assert name in vars(_mman.Region), name
