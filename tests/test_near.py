"""The gap search behind near=: places nearest first, never over a mapping,
and what the mapping calls' refusals become."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmap_alloc import AllocError, _near
from mmap_alloc._linux import Mapping
from mmap_alloc._near import candidates, check_near, map_near
from mmap_alloc.perm import Perm

P = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def mapping(start: int, end: int) -> Mapping:
    return Mapping(start, end, Perm.READ, True, "")


MAPS = [mapping(0x10000000, 0x20000000), mapping(0x30000000, 0x40000000)]


def test_a_place_in_the_gap_holding_near_is_centred_on_it() -> None:
    assert candidates(0x28000000, GiB, 2 * P, P, MAPS, low=P, high=1 << 47)[0] == 0x27FFF000


def test_places_are_ordered_nearest_first() -> None:
    found = candidates(0x1FFFF000, GiB, P, P, MAPS, low=P, high=1 << 47)
    # the gap above the first mapping (one page of margin), then below it, then beyond
    assert found[:2] == [0x20001000, 0x0FFFE000]
    assert found[2] == 0x40001000


def test_a_margin_of_one_page_is_kept_next_to_every_mapping() -> None:
    maps = [mapping(0x10000000, 0x10004000), mapping(0x10008000, 0x10010000)]
    # the 4-page gap between them holds 2 pages at most, one page from each side
    found = candidates(0x10005000, 3 * P, 2 * P, P, maps, low=P, high=1 << 47)
    assert found == [0x10005000]
    assert candidates(0x10005000, 3 * P, 3 * P, P, maps, low=P, high=1 << 47) == []


def test_no_place_when_the_window_is_mapped() -> None:
    assert candidates(0x18000000, MiB, P, P, MAPS, low=P, high=1 << 47) == []


def test_no_place_when_the_window_is_smaller_than_the_size() -> None:
    assert candidates(0x28000000, 2 * P, 4 * P, P, MAPS, low=P, high=1 << 47) == []


def test_places_respect_the_alignment() -> None:
    found = candidates(0x28000123, GiB, P, 1 << 21, MAPS, low=P, high=1 << 47)
    assert found and all(address % (1 << 21) == 0 for address in found)


def test_places_respect_the_bounds_of_the_address_space() -> None:
    found = candidates(0x3000, GiB, 4 * P, P, [], low=0x10000, high=0x100000)
    assert found == [0x10000]
    found = candidates(0xFF000, GiB, 4 * P, P, [], low=0x10000, high=0x100000)
    assert found == [0xFC000]


@given(
    near=st.integers(0, 1 << 40),
    within=st.integers(1, 1 << 36),
    size=st.integers(1, 1 << 20).map(lambda n: -(-n // P) * P),
    align_shift=st.integers(12, 22),
    holes=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 1 << 30)), max_size=12),
)
def test_every_place_is_free_in_reach_and_aligned(
    near: int, within: int, size: int, align_shift: int, holes: list[tuple[int, int]]
) -> None:
    maps = [mapping(start // P * P, (start + length) // P * P + P) for start, length in holes]
    align = 1 << align_shift
    for address in candidates(near, within, size, align, maps, low=0x10000, high=1 << 47):
        assert address % align == 0
        assert address >= 0x10000 and address + size <= 1 << 47
        assert abs(address - near) < within and abs(address + size - 1 - near) < within
        assert not any(m.start - P < address + size and address < m.end + P for m in maps)


def test_map_near_reads_the_gaps_again_when_another_thread_took_a_place() -> None:
    tried: list[int] = []

    def map_at(address: int) -> int:
        tried.append(address)
        if len(tried) == 1:
            raise OSError(errno.EEXIST, "taken")
        return address

    assert map_near(1 << 44, GiB, P, P, map_at, "a test") == tried[-1]
    assert len(tried) == 2


def test_map_near_tries_the_next_place_after_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_near, "mappings", lambda: MAPS)
    tried: list[int] = []

    def map_at(address: int) -> int:
        tried.append(address)
        if len(tried) == 1:
            raise OSError(errno.ENOMEM, "no")
        return address

    assert map_near(0x1FFFF000, GiB, P, P, map_at, "a test") == 0x0FFFE000
    assert tried == [0x20001000, 0x0FFFE000]


def test_a_kernel_that_ignores_noreplace_is_named() -> None:
    def map_at(address: int) -> int:
        raise OSError(errno.EADDRNOTAVAIL, "elsewhere")

    with pytest.raises(AllocError, match=r"MAP_FIXED_NOREPLACE \(needs Linux 4\.17\)"):
        map_near(1 << 44, GiB, P, P, map_at, "a test")


def test_refusals_of_every_place_become_an_alloc_error() -> None:
    def map_at(address: int) -> int:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    with pytest.raises(AllocError, match=r"cannot map 4096 bytes.*a test less than 1 GiB"):
        map_near(1 << 44, GiB, P, P, map_at, "a test")


def test_other_errors_of_the_mapping_call_propagate() -> None:
    def map_at(address: int) -> int:
        raise PermissionError(errno.EACCES, "refused by policy")

    with pytest.raises(PermissionError, match="refused by policy"):
        map_near(1 << 44, GiB, P, P, map_at, "a test")


def test_places_taken_again_and_again_give_up_with_alloc_error() -> None:
    def map_at(address: int) -> int:
        raise OSError(errno.EEXIST, "taken")

    with pytest.raises(AllocError, match="other threads took every free place first"):
        map_near(1 << 44, GiB, P, P, map_at, "a test")


@pytest.mark.parametrize(
    ("near", "within", "error"),
    [(None, 1, TypeError), ("1", 1, TypeError), (-1, 1, ValueError), (0, 0, ValueError)],
)
def test_check_refuses_bad_arguments(near: object, within: object, error: type) -> None:
    with pytest.raises(error):
        check_near(near, within)


def test_check_accepts_index_objects() -> None:
    class Address:
        def __index__(self) -> int:
            return 0x1000

    assert check_near(Address(), 1 << 20) == (0x1000, 1 << 20)
