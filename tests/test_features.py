"""Kernel feature probes: each answers with a Feature, never raises, and is cached."""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import platform
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mmap_alloc import features
from mmap_alloc._linux import hugepage_pools, sysfs_choice
from mmap_alloc.features import Feature
from support import EMULATED, emulated_skip, run_in_pid_namespace

NAMES = [
    "memfd_secret",
    "madv_guard_install",
    "madv_populate",
    "madv_collapse",
    "memfd_exec",
    "shmem_thp",
    "pagemap_scan",
    "thp",
    "hugetlb",
]


def kernel() -> tuple[int, int]:
    """(major, minor) of the running kernel."""
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    assert match is not None
    return int(match.group(1)), int(match.group(2))


def needs_kernel(major: int, minor: int) -> pytest.MarkDecorator:
    """Linux of at least this version, reached directly: qemu-user (the arm64
    runs, which set ARM64_EMULATED) implements system calls itself."""
    if EMULATED:
        return emulated_skip("not the kernel's answer")
    return pytest.mark.skipif(
        sys.platform != "linux" or kernel() < (major, minor),
        reason=f"Linux {major}.{minor} or newer",
    )


@pytest.fixture(autouse=True)
def fresh_probes() -> Iterator[None]:
    """Each test probes anew and leaves no answer of a monkeypatched probe behind."""
    features.clear_cache()
    yield
    features.clear_cache()


def selected(path: Path) -> str:
    """The [bracketed] word of a sysfs choice file."""
    found = re.search(r"\[(\w+)\]", path.read_text())
    assert found is not None
    return found.group(1)


# ---------------------------------------------------------------- the shape of the answers


def test_all_features_lists_every_probe_in_order() -> None:
    assert [feature.name for feature in features.all_features()] == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_each_probe_answers_with_a_feature(name: str) -> None:
    feature = getattr(features, name)()
    assert isinstance(feature, Feature)
    assert feature.name == name
    assert isinstance(feature.available, bool)
    assert isinstance(feature.detail, str)


def test_every_missing_feature_says_why() -> None:
    for feature in features.all_features():
        assert feature.available or feature.detail, feature


def test_a_feature_is_frozen() -> None:
    feature = Feature("x", True, "")
    with pytest.raises(dataclasses.FrozenInstanceError):
        feature.available = False  # type: ignore[misc]


def test_a_feature_reads_available_or_missing_with_its_reason() -> None:
    assert str(Feature("thp", True, "enabled = madvise")) == "available (enabled = madvise)"
    assert str(Feature("thp", True, "")) == "available"
    assert str(Feature("thp", False, "enabled = never")) == "missing: enabled = never"


def test_a_probe_runs_once_per_process() -> None:
    assert features.thp() is features.thp()


def test_clear_cache_makes_the_next_call_probe_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "kernel_memfd_secret", fake_syscall(errno.ENOSYS))
    first = features.memfd_secret()
    monkeypatch.setattr(features, "kernel_memfd_secret", fake_syscall(errno.EMFILE))
    assert features.memfd_secret() is first
    features.clear_cache()
    assert "EMFILE" in features.memfd_secret().detail


# ---------------------------------------------------------------- this machine


@needs_kernel(6, 5)  # 5.14 has it, but off unless booted with secretmem.enable until 6.5
def test_memfd_secret_is_available_on_this_kernel() -> None:
    feature = features.memfd_secret()
    assert feature.available, feature.detail
    assert feature.detail == "system call 447"


@needs_kernel(6, 13)
def test_madv_guard_install_is_available_on_this_kernel() -> None:
    assert features.madv_guard_install().available, features.madv_guard_install().detail


@needs_kernel(5, 14)
def test_madv_populate_is_available_on_this_kernel() -> None:
    assert features.madv_populate().available, features.madv_populate().detail


@needs_kernel(6, 7)
def test_pagemap_scan_is_available_on_this_kernel() -> None:
    assert features.pagemap_scan().available, features.pagemap_scan().detail


def test_thp_reports_the_selected_mode() -> None:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not path.exists():
        pytest.skip("no THP")
    mode = selected(path)
    feature = features.thp()
    assert feature.detail.startswith(f"enabled = {mode}")
    assert feature.available == (mode in ("always", "madvise"))


def test_shmem_thp_reports_the_selected_mode() -> None:
    path = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    if not path.exists():
        pytest.skip("no shmem THP")
    mode = selected(path)
    feature = features.shmem_thp()
    assert feature.detail.startswith(f"shmem_enabled = {mode}")
    assert feature.available == (mode in ("always", "within_size", "advise"))


def test_hugetlb_lists_every_pool_with_its_free_pages() -> None:
    folders = list(Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB"))
    if not folders:
        pytest.skip("no hugetlb pools")
    feature = features.hugetlb()
    assert feature.detail.count(" free of ") == len(folders)
    free = sum(int((folder / "free_hugepages").read_text()) for folder in folders)
    assert feature.available == (free > 0)


def test_memfd_exec_follows_vm_memfd_noexec() -> None:
    path = Path("/proc/sys/vm/memfd_noexec")
    if not path.exists():
        pytest.skip("kernel before 6.3")
    value = int(path.read_text())
    feature = features.memfd_exec()
    assert feature.detail.startswith(f"vm.memfd_noexec = {value}: ")
    assert feature.available == (value < 2)


@pytest.mark.parametrize(
    ("value", "available", "words"),
    [
        (1, True, "noexec unless created with MFD_EXEC; MFD_EXEC accepted"),
        (2, False, "executable memfds refused; memfd_create(MFD_EXEC) failed: EACCES"),
    ],
)
def test_memfd_exec_in_a_pid_namespace_with_memfd_noexec(
    value: int, available: bool, words: str
) -> None:
    """vm.memfd_noexec belongs to the pid namespace: a child in its own sets it."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    if not Path("/proc/sys/vm/memfd_noexec").exists():
        pytest.skip("kernel before 6.3")
    code = (
        f"open('/proc/sys/vm/memfd_noexec', 'w').write('{value}')\n"
        "from mmap_alloc import features\n"
        "feature = features.memfd_exec()\n"
        "print(feature.available, feature.detail)\n"
    )
    done = run_in_pid_namespace(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{available} vm.memfd_noexec = {value}: ")
    assert words in done.stdout


# ---------------------------------------------------------------- simulated kernels


def fake_syscall(code: int) -> Callable[[int], int]:
    """Stands in for the C layer's memfd_secret: fails with errno ``code``."""

    def memfd_secret(flags: int) -> int:
        raise OSError(code, os.strerror(code))

    return memfd_secret


def test_memfd_secret_without_the_system_call_is_missing_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(features, "kernel_memfd_secret", fake_syscall(errno.ENOSYS))
    assert features.memfd_secret() == Feature(
        "memfd_secret",
        False,
        "kernel lacks memfd_secret (needs Linux 5.14 and secretmem.enable)",
    )


def test_memfd_secret_refused_otherwise_names_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "kernel_memfd_secret", fake_syscall(errno.EMFILE))
    feature = features.memfd_secret()
    assert not feature.available
    assert feature.detail.startswith("memfd_secret(0) failed: EMFILE")


def test_a_probe_that_breaks_reports_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(flags: int) -> int:
        raise RuntimeError("no kernel layer")

    monkeypatch.setattr(features, "kernel_memfd_secret", broken)
    feature = features.memfd_secret()
    assert not feature.available
    assert feature.detail.startswith("probe failed:")


@pytest.mark.parametrize(
    "probe_name", ["madv_guard_install", "madv_populate", "madv_collapse", "pagemap_scan"]
)
def test_a_probe_whose_mapping_breaks_reports_under_its_own_name(
    monkeypatch: pytest.MonkeyPatch, probe_name: str
) -> None:
    def broken(size: int) -> object:
        raise MemoryError("no address space")

    monkeypatch.setattr(features, "_anonymous", broken)
    feature = getattr(features, probe_name)()
    assert (feature.name, feature.available) == (probe_name, False)
    assert feature.detail == "probe failed: no address space"


def test_guard_advice_that_leaves_the_page_readable_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An emulator that answers success and does nothing (qemu-user does) is caught."""
    monkeypatch.setattr(features, "MADV_GUARD_INSTALL", mmap.MADV_NORMAL)
    monkeypatch.setattr(features, "MADV_GUARD_REMOVE", mmap.MADV_NORMAL)
    assert features.madv_guard_install() == Feature(
        "madv_guard_install", False, "MADV_GUARD_INSTALL was accepted but the page stayed readable"
    )


def test_madvise_probes_without_the_advice_are_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    class OldKernelMap:
        """A stdlib mmap whose madvise() knows no advice, as an old kernel."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            self._data = bytearray(4 << 20)

        def madvise(self, *args: object) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

        def __setitem__(self, index: int, value: int) -> None:
            self._data[index] = value

        def close(self) -> None:
            pass

    monkeypatch.setattr(features, "_anonymous", lambda size: OldKernelMap())
    monkeypatch.setattr(features, "_address", lambda mapping: 0)
    assert features.madv_guard_install() == Feature("madv_guard_install", False, "needs Linux 6.13")
    assert features.madv_populate() == Feature(
        "madv_populate", False, "kernel refuses MADV_POPULATE_READ: needs Linux 5.14"
    )
    assert features.madv_collapse().detail.startswith("kernel refuses MADV_COLLAPSE")


def test_thp_without_sysfs_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(features, "thp_mode", lambda: "unknown")
    monkeypatch.setattr(features, "shmem_thp_mode", lambda: None)
    assert not features.thp().available
    assert "kernel without THP" in features.thp().detail
    assert not features.shmem_thp().available


def test_shmem_thp_advise_is_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "shmem_enabled").write_text("always within_size [advise] never deny force\n")
    monkeypatch.setattr(
        features, "shmem_thp_mode", lambda: sysfs_choice(tmp_path / "shmem_enabled")
    )
    assert features.shmem_thp() == Feature("shmem_thp", True, "shmem_enabled = advise")


def test_hugetlb_with_empty_pools_is_missing_and_says_how_to_reserve(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pool = tmp_path / "hugepages-2048kB"
    pool.mkdir()
    (pool / "nr_hugepages").write_text("0\n")
    (pool / "free_hugepages").write_text("0\n")
    monkeypatch.setattr(features, "hugepage_pools", lambda: hugepage_pools(tmp_path))
    feature = features.hugetlb()
    assert not feature.available
    assert feature.detail.startswith("no free pages (2 MiB: 0 free of 0)")
    assert "nr_hugepages" in feature.detail


def test_hugetlb_with_free_pages_is_available(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for size, free in (("2048kB", 3), ("1048576kB", 0)):
        pool = tmp_path / f"hugepages-{size}"
        pool.mkdir()
        (pool / "nr_hugepages").write_text("4\n")
        (pool / "free_hugepages").write_text(f"{free}\n")
    monkeypatch.setattr(features, "hugepage_pools", lambda: hugepage_pools(tmp_path))
    assert features.hugetlb() == Feature("hugetlb", True, "2 MiB: 3 free of 4; 1 GiB: 0 free of 4")
