"""numpy arrays on regions: views, pinning, read-only arrays, arrays that own their region."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mappings
from mmap_alloc.backings import Backing, thp_available
from support import THP, emulated_skip

np = pytest.importorskip("numpy")
mnp = pytest.importorskip("mmap_alloc.numpy")


def mapped(address: int) -> bool:
    return any(m.start <= address < m.end for m in mappings())


# ---------------------------------------------------------------- region.ndarray


def test_ndarray_views_the_regions_bytes(alloc: MapAlloc) -> None:
    region = alloc.alloc(64)
    array = region.ndarray(np.uint32, (4, 4))
    array[1, 2] = 0x01020304
    assert region[24:28] == (0x01020304).to_bytes(4, "little")
    del array
    region.close()


def test_ndarray_at_an_offset_starts_there(alloc: MapAlloc) -> None:
    with alloc.alloc(64) as region:
        region[16] = 7
        array = region.ndarray(np.uint8, 8, offset=16)
        assert array[0] == 7
        del array


def test_array_pins_its_region(alloc: MapAlloc) -> None:
    region = alloc.alloc(4096)
    array = region.ndarray(np.float64, 512)
    with pytest.raises(BufferError):
        alloc.dealloc(region)
    assert not region.closed
    del array
    alloc.dealloc(region)


def test_views_of_views_pin_the_region(alloc: MapAlloc) -> None:
    region = alloc.alloc(4096)
    array = region.ndarray(np.float64, (16, 32))
    view = array[1:][:, ::2].T
    del array
    gc.collect()
    with pytest.raises(BufferError):
        region.close()
    view[0, 0] = 1.5
    del view
    region.close()


def test_releasing_the_arrays_base_does_not_unpin_the_region(alloc: MapAlloc) -> None:
    region = alloc.alloc(4096)
    array = region.ndarray(np.uint8, 4096)
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base.release()
    with pytest.raises(BufferError):
        region.close()
    del array, base
    region.close()


def test_read_only_region_gives_a_read_only_array() -> None:
    alloc = MapAlloc(write=False)
    with alloc.alloc(4096) as region:
        array = region.ndarray(np.uint8, 4096)
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array.flags.writeable = True
        with pytest.raises(ValueError):
            array[0] = 1
        del array


def test_unreadable_region_gives_no_array() -> None:
    region = MapAlloc(read=False, write=False).alloc(4096)
    with region, pytest.raises(BufferError, match="not readable"):
        region.ndarray(np.uint8, 1)


@pytest.fixture
def guarded(alloc: MapAlloc) -> Iterator[Region]:
    """Four pages: a guard page (no access), two read/write pages, a read-only page."""
    region = alloc.alloc(4 * P)
    region.protect(Perm.NONE, 0, P)
    region.protect(Perm.READ, 3 * P, P)
    yield region
    region.close()


@pytest.mark.parametrize("make", [Region.ndarray, mnp.ndarray], ids=["method", "numpy.ndarray"])
def test_an_array_on_the_usable_middle_of_a_guarded_region_works(
    guarded: Region, make: Any
) -> None:
    with pytest.raises(BufferError):
        np.frombuffer(guarded, dtype=np.uint8)  # the whole region: the guard page is in it
    array = make(guarded, np.float64, (2, P // 8), P)
    array[1, -1] = 1.5
    assert guarded[3 * P - 8 : 3 * P] == np.float64(1.5).tobytes()
    assert array.flags.writeable
    with pytest.raises(BufferError):
        guarded.protect(Perm.READ, P, P)  # the array needs WRITE there
    with pytest.raises(BufferError):
        guarded.close()
    del array


@pytest.mark.parametrize("make", [Region.ndarray, mnp.ndarray], ids=["method", "numpy.ndarray"])
def test_an_array_touching_a_read_only_page_is_read_only(guarded: Region, make: Any) -> None:
    array = make(guarded, np.uint8, 16, 3 * P - 8)
    assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 1
    del array


@pytest.mark.parametrize("make", [Region.ndarray, mnp.ndarray], ids=["method", "numpy.ndarray"])
@pytest.mark.parametrize("offset", [0, P - 8], ids=["on-the-guard", "into-the-guard"])
def test_an_array_touching_an_unreadable_page_is_buffer_error(
    guarded: Region, make: Any, offset: int
) -> None:
    with pytest.raises(BufferError, match="not readable"):
        make(guarded, np.uint8, 16, offset)
    assert guarded._exports == 0


def test_an_array_on_pages_opened_in_a_reservation(alloc: MapAlloc) -> None:
    with alloc.reserve(64 * P) as reservation:
        reservation.protect(Perm.READ | Perm.WRITE, 16 * P, 4 * P)
        array = reservation.ndarray(np.int64, 4 * P // 8, 16 * P)
        array[:] = 7
        assert reservation[16 * P] == 7
        del array
        reservation.protect(Perm.NONE)


def test_ndarray_of_a_closed_region_is_a_value_error(alloc: MapAlloc) -> None:
    region = alloc.alloc(64)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        region.ndarray(np.uint8, 1)


def test_array_must_fit_in_the_region(alloc: MapAlloc) -> None:
    with alloc.alloc(100) as region:
        with pytest.raises(ValueError, match="do not fit in the region's 100 bytes"):
            region.ndarray(np.float64, 13)
        with pytest.raises(ValueError, match="do not fit"):
            region.ndarray(np.uint8, 10, offset=96)
        assert region._exports == 0


def test_offset_must_suit_the_dtypes_alignment(alloc: MapAlloc) -> None:
    with alloc.alloc(64) as region, pytest.raises(ValueError, match="alignment 8"):
        region.ndarray(np.float64, 2, offset=4)


def test_bad_offsets_and_shapes_are_errors_naming_them(alloc: MapAlloc) -> None:
    with alloc.alloc(64) as region:
        with pytest.raises(ValueError, match="offset must not be negative"):
            region.ndarray(np.uint8, 1, offset=-8)
        with pytest.raises(TypeError, match="offset must be an integer"):
            region.ndarray(np.uint8, 1, offset=1.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="negative dimensions"):
            region.ndarray(np.uint8, (2, -1))
        with pytest.raises(TypeError, match="shape must be an int or a tuple"):
            region.ndarray(np.uint8, 2.5)  # type: ignore[arg-type]


def test_object_dtypes_are_refused(alloc: MapAlloc) -> None:
    with alloc.alloc(64) as region, pytest.raises(TypeError, match="Python objects"):
        region.ndarray(object, 2)


def test_structured_dtypes_work(alloc: MapAlloc) -> None:
    with alloc.alloc(64) as region:
        array = region.ndarray([("x", np.int32), ("y", np.float32)], 4)
        array["x"][3] = 5
        assert region[24] == 5
        del array


def test_empty_arrays_are_allowed(alloc: MapAlloc) -> None:
    with alloc.alloc(8) as region:
        array = region.ndarray(np.float64, (0, 3), offset=8)
        assert array.shape == (0, 3)
        del array


# ---------------------------------------------------------------- empty / zeros


def test_zeros_gives_a_zeroed_array_of_the_shape_and_dtype() -> None:
    array = mnp.zeros((3, 5), np.int16)
    assert array.shape == (3, 5)
    assert array.dtype == np.int16
    assert not array.any()
    assert array.flags.c_contiguous and array.flags.writeable


def test_empty_is_backed_by_a_region_of_its_own() -> None:
    array = mnp.empty(1000)
    region = mnp.region_of(array)
    assert region is not None
    assert region.size == 8000
    assert mnp.region_of(array[::3]) is region
    assert mnp.region_of(np.zeros(3)) is None
    del region, array


def test_dropping_the_array_unmaps_its_region() -> None:
    array = mnp.zeros(1 << 20, np.uint8)
    view = array[10:20]
    address = mnp.region_of(array).address
    del array
    assert mapped(address)
    del view
    assert not mapped(address)


def test_zero_sized_arrays_work() -> None:
    array = mnp.empty((0,), np.float32)
    assert array.shape == (0,)


def test_zeros_with_write_false_is_read_only() -> None:
    array = mnp.zeros(10, write=False)
    assert not array.flags.writeable
    assert not array.any()


def test_empty_uses_the_allocator_given() -> None:
    alloc = MapAlloc()
    array = mnp.empty(10, alloc=alloc)
    assert mnp.region_of(array)._owner is alloc


def test_empty_refuses_an_allocator_with_options() -> None:
    with pytest.raises(TypeError, match="either alloc or allocator options"):
        mnp.empty(10, alloc=MapAlloc(), huge="thp")


def test_empty_refuses_unknown_options() -> None:
    with pytest.raises(TypeError):
        mnp.empty(10, color="red")


@pytest.mark.skipif(not thp_available(), reason="transparent huge pages unavailable")
@emulated_skip(THP)
def test_zeros_on_transparent_huge_pages() -> None:
    array = mnp.zeros((1024, 1024), huge="thp", commit=True)
    region = mnp.region_of(array)
    assert region is not None
    assert region.backing == Backing.THP
    assert region.stats().huge_bytes > 0
    del region, array


@pytest.mark.skipif(not thp_available(), reason="transparent huge pages unavailable")
def test_large_arrays_are_advised_for_huge_pages_by_default_as_numpy_does() -> None:
    def backing(array: Any) -> object:
        region = mnp.region_of(array)
        assert region is not None
        return region.backing

    assert backing(mnp.zeros(4 << 20, np.uint8)) == Backing.THP
    assert backing(mnp.zeros((4 << 20) - P, np.uint8)) == Backing.NORMAL
    assert backing(mnp.zeros(4 << 20, np.uint8, huge="normal")) == Backing.NORMAL


def test_the_core_does_not_import_numpy() -> None:
    code = (
        "import sys, mmap_alloc\n"
        "region = mmap_alloc.MapAlloc(huge='prefer').alloc(1)\n"
        "region.stats(); region.backing; region.close()\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
