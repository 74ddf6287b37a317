"""Perm: the read/write/execute flags and their /proc/self/maps notation."""

from __future__ import annotations

import pytest

from mmap_alloc import Perm, _mman
from mmap_alloc.perm import ALL_PERMS, PLATFORMS, effective_perms

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


# ---------------------------------------------------------------- platforms

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC

# The fallback table of every known platform, written out in full.
EXPECTED: dict[str, dict[Perm, Perm]] = {
    "linux": {p: p for p in ALL_PERMS},
    "darwin": {**{p: p for p in ALL_PERMS}, W: R | W, W | X: R | W | X},
    "win32": {**{p: p for p in ALL_PERMS}, W: R | W, W | X: R | W | X},
}
CASES = [(platform, perm) for platform in PLATFORMS for perm in ALL_PERMS]
CASE_IDS = [f"{platform}-{perm}" for platform, perm in CASES]


# ---------------------------------------------------------------- permissions


def test_the_known_platforms_are_linux_macos_and_windows() -> None:
    assert set(PLATFORMS) == {"linux", "darwin", "win32"}


@pytest.mark.parametrize(("platform", "requested"), CASES, ids=CASE_IDS)
def test_effective_perms_follows_the_platform_table(platform: str, requested: Perm) -> None:
    assert effective_perms(requested, platform) == EXPECTED[platform][requested]


@pytest.mark.parametrize(("platform", "requested"), CASES, ids=CASE_IDS)
def test_effective_perms_is_never_more_restrictive(platform: str, requested: Perm) -> None:
    granted = effective_perms(requested, platform)
    assert granted & requested == requested


@pytest.mark.parametrize(("platform", "requested"), CASES, ids=CASE_IDS)
def test_effective_perms_keeps_a_combination_the_platform_supports(
    platform: str, requested: Perm
) -> None:
    granted = effective_perms(requested, platform)
    assert effective_perms(granted, platform) == granted


@pytest.mark.parametrize(("platform", "requested"), CASES, ids=CASE_IDS)
def test_effective_perms_returns_a_perm(platform: str, requested: Perm) -> None:
    assert isinstance(effective_perms(requested, platform), Perm)


@pytest.mark.parametrize("requested", ALL_PERMS, ids=str)
def test_linux_gives_exactly_what_is_requested(requested: Perm) -> None:
    assert effective_perms(requested, "linux") is requested


def test_linux_with_a_version_suffix_is_linux() -> None:
    assert effective_perms(W, "linux2") == W


def test_windows_has_no_write_only_memory() -> None:
    assert effective_perms(W, "win32") == R | W
    assert effective_perms(W | X, "win32") == R | W | X


def test_effective_perms_defaults_to_this_platform() -> None:
    assert effective_perms(W) == W  # this suite runs on Linux


def test_effective_perms_accepts_a_plain_int() -> None:
    assert effective_perms(3, "win32") is R | W  # type: ignore[arg-type]


def test_effective_perms_rejects_an_unknown_platform() -> None:
    with pytest.raises(ValueError, match="unknown platform 'plan9'"):
        effective_perms(R, "plan9")
