"""Protection of page ranges, W^X code, functions that pin their region, reservations.

Reservations: address space reserved without access, opened in parts."""

from __future__ import annotations

import ctypes

import pytest

from mmap_alloc import AllocError, MapAlloc, Region, _mman
from mmap_alloc._linux import hugepage_pools, mapping_count
from protection_support import NONE, RW, R
from support import RESIDENCY, emulated_skip, skip_if_emulated

# ---------------------------------------------------------------- reservations


def vm_flags(region: Region) -> set[str]:
    """The VmFlags of the kernel mapping holding the region's first page."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(part, 16) for part in head.split("-"))
                inside = lo <= region.address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError("mapping not found")


def test_reservation_is_inaccessible_address_space(alloc: MapAlloc, page: int) -> None:
    with alloc.reserve(10 * page + 1) as reservation:
        assert reservation.size == 10 * page + 1
        assert reservation.capacity == 11 * page
        assert reservation.perms == NONE
        with pytest.raises(BufferError):
            memoryview(reservation)


def test_reservation_is_not_charged_to_commit(alloc: MapAlloc, page: int) -> None:
    with alloc.reserve(1 << 30) as reservation:
        flags = vm_flags(reservation)
        assert "nr" in flags  # MAP_NORESERVE
        assert "ac" not in flags  # not accounted against the commit limit
        reservation.protect(RW, 0, page)
        assert "ac" not in vm_flags(reservation)  # nor once a piece is writable


def test_reservation_of_64_gib_takes_pages_at_both_ends(alloc: MapAlloc, page: int) -> None:
    size = 64 << 30
    with alloc.reserve(size) as reservation:
        last = size - page
        reservation.protect(RW, 0, page)
        reservation.protect(RW, last)
        ctypes.memset(reservation.address, 0xAB, page)
        ctypes.memset(reservation.address + last, 0xCD, page)
        alloc.commit(reservation)
        assert ctypes.string_at(reservation.address, 2) == b"\xab\xab"
        assert ctypes.string_at(reservation.address + size - 2, 2) == b"\xcd\xcd"
        assert reservation.protections() == [
            (0, page, RW),
            (page, last - page, NONE),
            (last, page, RW),
        ]
        assert reservation._mincore(0, page) == b"\x01"
        assert reservation._mincore(last, page) == b"\x01"


def test_released_piece_is_returned_and_reads_zero_when_taken_again(
    alloc: MapAlloc, page: int
) -> None:
    with alloc.reserve(64 * page) as reservation:
        reservation.protect(RW, 8 * page, 2 * page)
        ctypes.memset(reservation.address + 8 * page, 0xFF, 2 * page)
        alloc.uncommit(reservation, 8 * page, 2 * page)
        reservation.protect(NONE, 8 * page, 2 * page)
        assert reservation.protections() == [(0, 64 * page, NONE)]
        assert not reservation.mixed
        skip_if_emulated(RESIDENCY)
        assert reservation._mincore(8 * page, 2 * page) == b"\0\0"
        reservation.protect(RW, 8 * page, 2 * page)
        assert ctypes.string_at(reservation.address + 8 * page, 2 * page) == bytes(2 * page)


def test_commit_of_unreadable_reservation_is_an_error(alloc: MapAlloc, page: int) -> None:
    with alloc.reserve(8 * page) as reservation:
        with pytest.raises(ValueError, match="neither readable nor writable"):
            alloc.commit(reservation)
        reservation.protect(RW, 0, page)
        with pytest.raises(ValueError, match="neither readable nor writable"):
            alloc.commit(reservation, page, page)


@emulated_skip(RESIDENCY)
def test_commit_of_mixed_reservation_faults_in_only_accessible_pieces(
    alloc: MapAlloc, page: int
) -> None:
    with alloc.reserve(8 * page) as reservation:
        reservation.protect(RW, 2 * page, 2 * page)
        reservation.protect(R, 6 * page, page)
        alloc.commit(reservation)
        assert reservation._mincore(0, 8 * page) == b"\0\0\1\1\0\0\1\0"


def test_aligned_reservation(alloc: MapAlloc) -> None:
    with alloc.reserve(1 << 20, align=1 << 30) as reservation:
        assert reservation.address % (1 << 30) == 0
        assert reservation.protections() == [(0, 1 << 20, NONE)]


@pytest.mark.parametrize(
    ("size", "align", "error"),
    [
        (0, None, ValueError),
        (-1, None, ValueError),
        ("1", None, TypeError),
        (4096, 3, ValueError),
        (4096, 0, ValueError),
        (1 << 63, None, AllocError),
    ],
)
def test_bad_reservation_is_refused(
    alloc: MapAlloc, size: object, align: object, error: type[Exception]
) -> None:
    before = _mman.mapped_bytes()
    with pytest.raises(error):
        alloc.reserve(size, align)  # type: ignore[arg-type]
    assert _mman.mapped_bytes() == before


def test_reservation_needs_normal_pages() -> None:
    sizes = [pool.size for pool in hugepage_pools()]
    if not sizes:
        pytest.skip("this kernel has no hugetlb page sizes")
    with pytest.raises(ValueError, match="normal pages"):
        MapAlloc(huge_pagesize=sizes[0]).reserve(sizes[0])


def test_dealloc_of_reservation_unmaps_it(alloc: MapAlloc) -> None:
    before = mapping_count()
    reservation = alloc.reserve(1 << 30)
    reservation.protect(RW, 4096 * 10, 4096)
    alloc.dealloc(reservation)
    assert mapping_count() == before
