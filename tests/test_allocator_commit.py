"""MapAlloc: commit and uncommit: pages faulted in ahead of use and given back."""

from __future__ import annotations

import ctypes

import pytest

from allocator_support import MiB, R, W, X, allocator_for
from mmap_alloc import MapAlloc, Perm
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc.perm import ALL_PERMS
from support import RESIDENCY, emulated_skip, kernel_runs, pattern, rss

# ---------------------------------------------------------------- commit / uncommit


def test_uncommit_makes_pages_read_zero(alloc: MapAlloc) -> None:
    with alloc.alloc(4 * P) as region:
        region[:] = data = pattern(4 * P)
        alloc.uncommit(region, P, 2 * P)
        assert bytes(region) == data[:P] + bytes(2 * P) + data[3 * P :]


def test_uncommit_twice_is_fine(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        region[:] = pattern(2 * P)
        alloc.uncommit(region)
        alloc.uncommit(region)
        assert bytes(region) == bytes(2 * P)


def test_uncommit_gives_the_memory_back(alloc: MapAlloc) -> None:
    with alloc.alloc(32 * MiB) as region:
        region[:] = b"\x01" * (32 * MiB)
        before = rss()
        alloc.uncommit(region)
        assert before - rss() >= 31 * MiB


@emulated_skip(RESIDENCY)
def test_commit_faults_pages_in(alloc: MapAlloc) -> None:
    with alloc.alloc(32 * MiB) as region:
        before = rss()
        alloc.commit(region, 8 * MiB, 16 * MiB)
        assert rss() - before >= 15 * MiB
        assert bytes(region[8 * MiB : 8 * MiB + P]) == bytes(P)


def test_commit_keeps_the_contents(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = data = pattern(3 * P)
        alloc.commit(region)
        assert bytes(region) == data


@pytest.mark.parametrize("perms", [R, W, R | W, R | X, W | X, R | W | X], ids=str)
@emulated_skip(RESIDENCY)
def test_commit_works_on_readable_or_writable_regions(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(64 * P) as region:
        assert region._mincore(0, region.capacity) == bytes(64)
        alloc.commit(region)
        assert region._mincore(0, region.capacity) == b"\x01" * 64
        assert kernel_runs(region) == [(0, 64 * P, perms)]


@pytest.mark.parametrize("perms", [Perm.NONE, X], ids=str)
def test_commit_of_pages_without_read_or_write_is_value_error(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(P) as region, pytest.raises(ValueError, match="protect"):
        alloc.commit(region)


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_uncommit_works_with_every_permission_combination(perms: Perm) -> None:
    alloc = allocator_for(perms)
    with alloc.alloc(2 * P) as region:
        alloc.uncommit(region)
        assert kernel_runs(region) == [(0, 2 * P, perms)]


def test_uncommit_while_exported_is_allowed_and_the_buffer_reads_zero(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region, memoryview(region) as view:
        view[:] = pattern(P)
        alloc.uncommit(region)
        assert bytes(view) == bytes(P)


def test_commit_and_uncommit_default_to_the_whole_capacity(alloc: MapAlloc) -> None:
    with alloc.alloc(P + 1) as region:
        ctypes.memset(region.address, 1, 2 * P)
        alloc.uncommit(region)
        assert ctypes.string_at(region.address, 2 * P) == bytes(2 * P)
        alloc.commit(region)


def test_commit_length_rounds_up_to_whole_pages(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = data = pattern(3 * P)
        alloc.uncommit(region, P, 1)
        assert bytes(region) == data[:P] + bytes(P) + data[2 * P :]


def test_commit_of_an_empty_range_does_nothing(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region:
        region[0] = 7
        alloc.uncommit(region, P)
        alloc.uncommit(region, 0, 0)
        alloc.commit(region, P, 0)
        assert region[0] == 7


@pytest.mark.parametrize("method", ["commit", "uncommit"])
@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (1, None, "offset must be a non-negative multiple of the page size"),
        (P // 2, P, "offset must be a non-negative multiple"),
        (-P, None, "offset must be a non-negative multiple"),
        (3 * P, None, "lies outside the region"),
        (0, 2 * P + 1, "lies outside the region"),
        (P, 2 * P, "lies outside the region"),
        (0, -1, "length must not be negative"),
    ],
)
def test_commit_and_uncommit_refuse_ranges_outside_the_region_or_unaligned(
    alloc: MapAlloc, method: str, offset: int, length: int | None, message: str
) -> None:
    with alloc.alloc(2 * P) as region:
        region[:] = data = pattern(2 * P)
        with pytest.raises(ValueError, match=message):
            getattr(alloc, method)(region, offset, length)
        assert bytes(region) == data


@pytest.mark.parametrize("method", ["commit", "uncommit"])
@pytest.mark.parametrize(("offset", "length"), [(0.0, None), (True, None), (0, 1.0), (0, "1")])
def test_commit_and_uncommit_refuse_offsets_and_lengths_that_are_not_integers(
    alloc: MapAlloc, method: str, offset: object, length: object
) -> None:
    with alloc.alloc(P) as region, pytest.raises(TypeError, match=r"offset|length"):
        getattr(alloc, method)(region, offset, length)


@pytest.mark.parametrize("method", ["commit", "uncommit"])
def test_commit_and_uncommit_of_a_closed_region_are_value_error(
    alloc: MapAlloc, method: str
) -> None:
    region = alloc.alloc(P)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        getattr(alloc, method)(region)


@pytest.mark.parametrize("method", ["commit", "uncommit"])
def test_commit_and_uncommit_of_another_allocators_region_are_value_error(
    alloc: MapAlloc, method: str
) -> None:
    with MapAlloc().alloc(P) as region, pytest.raises(ValueError, match="another allocator"):
        getattr(alloc, method)(region)
