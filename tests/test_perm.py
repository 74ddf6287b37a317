"""Perm: the read/write/execute flags and their /proc/self/maps notation."""

from __future__ import annotations

import pytest

from mmap_alloc import Perm, _mman
from mmap_alloc.perm import ALL_PERMS

NOTATION = {
    Perm.NONE: "---",
    Perm.READ: "r--",
    Perm.WRITE: "-w-",
    Perm.EXEC: "--x",
    Perm.READ | Perm.WRITE: "rw-",
    Perm.READ | Perm.EXEC: "r-x",
    Perm.WRITE | Perm.EXEC: "-wx",
    Perm.READ | Perm.WRITE | Perm.EXEC: "rwx",
}


def test_values_are_the_posix_prot_bits() -> None:
    assert Perm.NONE == _mman.PROT_NONE
    assert Perm.READ == _mman.PROT_READ
    assert Perm.WRITE == _mman.PROT_WRITE
    assert Perm.EXEC == _mman.PROT_EXEC


@pytest.mark.parametrize(("perm", "text"), NOTATION.items(), ids=NOTATION.values())
def test_str_is_the_proc_maps_notation(perm: Perm, text: str) -> None:
    assert str(perm) == text
    assert f"{perm}" == text


@pytest.mark.parametrize(("perm", "text"), NOTATION.items(), ids=NOTATION.values())
def test_parse_reads_the_proc_maps_notation(perm: Perm, text: str) -> None:
    assert Perm.parse(text) is perm


@pytest.mark.parametrize("text", ["", "rw", "rwxp", "wr-", "RW-", "r x", "rwz", "x--"])
def test_parse_rejects_other_text(text: str) -> None:
    with pytest.raises(ValueError, match="permissions must look like"):
        Perm.parse(text)


def test_of_sets_exactly_the_given_flags() -> None:
    assert Perm.of(read=False, write=False, exec=False) is Perm.NONE
    assert Perm.of(read=True, write=False, exec=True) == Perm.READ | Perm.EXEC
    assert Perm.of(read=True, write=True, exec=True) == Perm.READ | Perm.WRITE | Perm.EXEC


def test_of_takes_keywords_only() -> None:
    with pytest.raises(TypeError):
        Perm.of(True, True, False)  # type: ignore[call-arg]


def test_all_perms_lists_the_eight_combinations_in_order() -> None:
    assert tuple(Perm(value) for value in range(8)) == ALL_PERMS
    assert len(set(ALL_PERMS)) == 8
