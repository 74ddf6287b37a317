"""Region as a bytes-like object: ``in``, find() and rfind(), as bytes does them."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from mmap_alloc import MapAlloc, Region
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import Index, MiB, bytearray_error, region_error

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
