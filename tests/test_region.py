"""Region: one live allocation, a bounds-checked buffer that pins its mapping."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import weakref
from collections.abc import Iterator

import pytest

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from support import SIGSEGV, pattern, run_in_child

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


def test_with_block_keeps_its_exception_when_the_region_cannot_close() -> None:
    region = MapAlloc().alloc(P)
    with pytest.raises(KeyError) as info, region:
        view = memoryview(region)
        raise KeyError("from the body")
    assert any("not closed" in note for note in info.value.__notes__)
    assert not region.closed
    view.release()
    region.close()
