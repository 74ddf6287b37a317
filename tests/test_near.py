"""The gap search behind near=: places nearest first, never over a mapping,
and what the mapping calls' refusals become."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmap_alloc import AllocError, MapAlloc, _near
from mmap_alloc._linux import Mapping
from mmap_alloc._near import candidates, check_near, map_near
from mmap_alloc.perm import Perm
from support import adjacent_pair

P = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def mapping(start: int, end: int) -> Mapping:
    return Mapping(start, end, Perm.READ, True, "")


MAPS = [mapping(0x10000000, 0x20000000), mapping(0x30000000, 0x40000000)]


def test_a_place_that_cannot_start_at_near_is_centred_on_it() -> None:
    # 3 pages within 2 pages of near: only a place around near fits
    assert candidates(0x28000000, 2 * P, 3 * P, P, MAPS, low=P, high=1 << 47) == [0x27FFF000]


def test_places_are_ordered_nearest_first() -> None:
    found = candidates(0x1FFFF000, GiB, P, P, MAPS, low=P, high=1 << 47)
    # the gap above the first mapping (one page of margin), then below it, then beyond
    assert found[:2] == [0x20001000, 0x0FFFE000]
    assert found[2] == 0x40001000


def test_a_margin_of_one_page_is_kept_next_to_a_mapping_where_it_costs_at_most_a_page() -> None:
    maps = [mapping(0x10000000, 0x10004000), mapping(0x10008000, 0x10010000)]
    # near in the middle of the mapping below: the gap above it, one page up
    assert candidates(0x10002000, GiB, P, P, maps, low=P, high=1 << 47)[0] == 0x10005000


def test_a_free_near_fills_a_gap_to_its_neighbours() -> None:
    maps = [mapping(0x10000000, 0x10004000), mapping(0x10008000, 0x10010000)]
    # the 4-page gap between them: 3 pages at near fit, touching the mapping above
    assert candidates(0x10005000, 3 * P, 3 * P, P, maps, low=P, high=1 << 47) == [0x10005000]


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
        assert not any(m.start < address + size and address < m.end for m in maps)
    at = near // align * align
    if (
        at <= near < at + size
        and at >= max(0x10000, near - within + 1)
        and at + size <= min(near + within, 1 << 47)
        and not any(m.start < at + size and at < m.end for m in maps)
    ):
        assert candidates(near, within, size, align, maps, low=0x10000, high=1 << 47)[0] == at


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


# ---------------------------------------------------------------- the place at near itself
# "Closest" means: the range starting at `near` when it is free, else the
# smallest distance. A free `near` wins whatever its neighbours are.

BASE = 0x7F0000000000


@pytest.mark.parametrize("lower", ["free", "mapped"])
@pytest.mark.parametrize("upper", ["free", "mapped"])
def test_a_free_near_is_the_first_place_whatever_its_neighbours(lower: str, upper: str) -> None:
    maps = [mapping(BASE - 64 * P, BASE - 2 * P)]  # two free pages below BASE, then a mapping
    if lower == "mapped":
        maps.append(mapping(BASE - P, BASE))
    if upper == "mapped":
        maps.append(mapping(BASE + P, BASE + 2 * P))
    assert candidates(BASE, P, P, P, maps, low=P, high=1 << 47) == [BASE]
    assert candidates(BASE, GiB, P, P, maps, low=P, high=1 << 47)[0] == BASE


def test_an_unaligned_free_near_gets_the_place_that_holds_it() -> None:
    maps = [mapping(BASE + P, BASE + 2 * P)]
    assert candidates(BASE + 100, P, P, P, maps, low=P, high=1 << 47) == [BASE]


def test_a_place_next_to_a_mapping_counts_when_it_is_nearer_than_a_page() -> None:
    """near inside a mapping with a hole of two pages right above it and the
    next wide gap far away: the hole (no page left free beside its
    neighbours) is nearer, so it comes first."""
    maps = [mapping(BASE - 16 * P, BASE + P), mapping(BASE + 3 * P, BASE + 80 * P)]
    found = candidates(BASE, GiB, P, P, maps, low=P, high=1 << 47)
    assert found[0] == BASE + P


def test_a_page_left_free_beside_a_neighbour_is_preferred_when_it_costs_at_most_a_page() -> None:
    """Where the gap allows, the new mapping keeps a page from its neighbour
    (so it stays a line of its own in /proc/self/maps) if that moves it at
    most one page further."""
    maps = [mapping(BASE - 16 * P, BASE + P)]
    assert candidates(BASE, GiB, P, P, maps, low=P, high=1 << 47)[0] == BASE + 2 * P


@pytest.mark.parametrize("lower", ["free", "mapped"])
@pytest.mark.parametrize("upper", ["free", "mapped"])
def test_alloc_near_a_just_freed_page_lands_on_it(lower: str, upper: str) -> None:
    """The page at base just freed: alloc(1, near=base, within=page) and
    alloc(1, near=base) both land at base, whatever the neighbours."""
    alloc = MapAlloc()
    below, above = adjacent_pair(alloc, 2 * P, P)  # [lower][base] then [upper]
    base = below.address + P
    try:
        if lower == "mapped":
            alloc.shrink_in_place(below, P)  # frees the page at base only
        else:
            below.close()
        if upper == "free":
            above.close()
        with alloc.alloc(1, near=base, within=P) as region:
            assert region.address == base
        with alloc.alloc(1, near=base) as region:
            assert region.address == base
    finally:
        below.close()
        above.close()
