"""Region as a bytes-like object (API.md "Region as a bytes-like object"):
indexing, slicing and assignment as bytearray does them, a hypothesis run
against a bytearray, and iteration."""

from __future__ import annotations

import itertools
import random
import tracemalloc
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import Index, MiB, R, W, bytearray_error, outcome, region_error

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
