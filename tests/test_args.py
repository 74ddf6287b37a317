"""Argument checks: one clear message per mistake, naming the argument."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmap_alloc import AllocError
from mmap_alloc._args import MAX_SIZE, integer, power_of_two, size

P = 4096


class Index:
    """An integer-like object, as numpy's integers are."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_max_size_is_the_largest_ssize_t() -> None:
    assert sys.maxsize == MAX_SIZE


# ---------------------------------------------------------------- integer


@pytest.mark.parametrize("value", [0, 1, -5, 2**80])
def test_integer_returns_ints_as_they_are(value: int) -> None:
    assert integer(value, "x") == value


def test_integer_takes_objects_with_index() -> None:
    assert integer(Index(7), "x") == 7
    assert type(integer(Index(7), "x")) is int


@pytest.mark.parametrize("value", [True, False])
def test_integer_refuses_bools(value: bool) -> None:
    with pytest.raises(TypeError, match=r"^count must be an integer, not bool$"):
        integer(value, "count")


@pytest.mark.parametrize(
    ("value", "kind"),
    [(1.0, "float"), ("1", "str"), (None, "NoneType"), (b"1", "bytes"), ([1], "list")],
)
def test_integer_refuses_other_types_naming_the_argument_and_type(value: object, kind: str) -> None:
    with pytest.raises(TypeError, match=rf"^count must be an integer, not {kind}$"):
        integer(value, "count")


# ---------------------------------------------------------------- size


@given(n=st.integers(1, MAX_SIZE + 1 - P))
def test_size_accepts_positive_sizes_pages_can_hold(n: int) -> None:
    assert size(n, P) == n


@given(n=st.integers(max_value=0))
def test_size_refuses_sizes_that_are_not_positive(n: int) -> None:
    with pytest.raises(ValueError, match=rf"^new_size must be positive, got {n}$"):
        size(n, P, "new_size")


@given(n=st.integers(MAX_SIZE + 2 - P, 2**200))
def test_size_past_the_address_space_is_alloc_error(n: int) -> None:
    with pytest.raises(AllocError, match="exceeds the address space") as info:
        size(n, P)
    assert info.value.size == n


def test_size_names_the_argument_by_default_size() -> None:
    with pytest.raises(ValueError, match=r"^size must be positive"):
        size(0, P)


def test_size_checks_the_type_first() -> None:
    with pytest.raises(TypeError, match="size must be an integer, not float"):
        size(-1.0, P)


# ---------------------------------------------------------------- power_of_two


@given(k=st.integers(0, 100))
def test_power_of_two_accepts_powers_of_two(k: int) -> None:
    assert power_of_two(1 << k, "align") == 1 << k


@given(n=st.integers(-(2**70), 2**70).filter(lambda n: n <= 0 or n & (n - 1)))
def test_power_of_two_refuses_everything_else(n: int) -> None:
    with pytest.raises(ValueError, match=rf"^align must be a positive power of two, got {n}$"):
        power_of_two(n, "align")
