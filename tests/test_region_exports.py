"""Region's buffers: the buffer protocol, the export rules (an exported buffer
pins the region), view() and pin()."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from typing import Any

import pytest

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import Index, R, W, X, allocator_for
from support import SIGSEGV, pattern, run_in_child

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
