"""Region: one live allocation, a bounds-checked buffer that pins its mapping.

Its attributes, closing it (close(), the with statement, the collector), what
a closed region refuses, and the C type itself."""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
import weakref
from typing import Any

import pytest

from mmap_alloc import MapAlloc, Perm, Region, _mman
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import R, W, X, allocator_for, closed_region

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
