"""The Linux adapter: errno translation, /proc and /sys readers."""

from __future__ import annotations

import errno
import os
import resource
import tracemalloc
from pathlib import Path

import pytest

from mmap_alloc import AllocError, MapAlloc, Perm, _linux, _mman
from mmap_alloc._linux import (
    PAGE_SIZE,
    HugePagePool,
    alloc_error,
    format_size,
    hugepage_dir,
    hugepage_pool,
    hugepage_pools,
    mapping_count,
    mappings,
    max_map_count,
    memlock_error,
    memlock_limit,
    overcommit_mode,
    read_int,
    read_text,
    thp_mode,
)

R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC

# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("code", [errno.ENOMEM, errno.EAGAIN])
def test_alloc_error_turns_a_memory_refusal_into_alloc_error(code: int) -> None:
    exc = alloc_error(OSError(code, "refused"), 12345)
    assert isinstance(exc, AllocError)
    assert isinstance(exc, MemoryError)
    assert exc.errno == code
    assert exc.size == 12345
    assert "cannot map 12345 bytes" in str(exc)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EPERM, errno.EFAULT])
def test_alloc_error_keeps_other_errors_as_they_are(code: int) -> None:
    original = OSError(code, "other")
    assert alloc_error(original, 1) is original


def test_alloc_error_for_huge_pages_says_how_to_reserve_them() -> None:
    exc = alloc_error(OSError(errno.ENOMEM, "refused"), 1, 2 << 20)
    assert "2 MiB huge pages" in str(exc)
    assert "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in str(exc)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1000, "1000 B"),
        (1024, "1 KiB"),
        (4096, "4 KiB"),
        (1536, "1536 B"),
        (2 << 20, "2 MiB"),
        (1 << 30, "1 GiB"),
        ((1 << 30) + 4096, "1048580 KiB"),
    ],
)
def test_format_size_uses_the_largest_exact_unit(n: int, text: str) -> None:
    assert format_size(n) == text


# ---------------------------------------------------------------- /proc and /sys


def test_page_size_is_the_kernels() -> None:
    assert resource.getpagesize() == PAGE_SIZE
    assert _mman.page_size() == PAGE_SIZE


def test_thp_mode_is_the_bracketed_word() -> None:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    assert f"[{thp_mode()}]" in text
    assert thp_mode() in {"always", "madvise", "never"}


def test_max_map_count_reads_the_sysctl() -> None:
    assert max_map_count() == int(Path("/proc/sys/vm/max_map_count").read_text())


def test_overcommit_mode_reads_the_sysctl() -> None:
    assert overcommit_mode() == int(Path("/proc/sys/vm/overcommit_memory").read_text())
    assert overcommit_mode() in {0, 1, 2}


def test_memlock_limit_is_the_rlimit() -> None:
    assert memlock_limit() == resource.getrlimit(resource.RLIMIT_MEMLOCK)


def test_read_text_and_read_int_fall_back_to_the_default(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert read_text(missing) == ""
    assert read_text(missing, "x") == "x"
    assert read_int(missing, -7) == -7
    garbage = tmp_path / "garbage"
    garbage.write_text("twelve\n")
    assert read_int(garbage, -7) == -7
    number = tmp_path / "number"
    number.write_text(" 12\n")
    assert read_text(number) == "12"
    assert read_int(number, -7) == 12


def test_hugepage_pools_list_the_sysfs_folders_smallest_first() -> None:
    folders = sorted(
        int(p.name[len("hugepages-") : -2]) * 1024
        for p in Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB")
    )
    pools = hugepage_pools()
    assert [pool.size for pool in pools] == folders
    for pool in pools:
        folder = hugepage_dir(pool.size)
        assert pool.reserved == int((folder / "nr_hugepages").read_text())
        assert 0 <= pool.free <= pool.reserved


def test_hugepage_dir_names_the_size_in_kib() -> None:
    assert hugepage_dir(2 << 20) == Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def test_hugepage_pool_finds_a_size_or_none() -> None:
    for pool in hugepage_pools():
        assert hugepage_pool(pool.size) == pool
    assert hugepage_pool(PAGE_SIZE) is None
    assert hugepage_pool(3) is None


def test_hugepage_pool_is_a_plain_record() -> None:
    pool = HugePagePool(2 << 20, 8, 3)
    assert (pool.size, pool.reserved, pool.free) == (2 << 20, 8, 3)


def test_mappings_parse_every_line_of_proc_self_maps() -> None:
    lines = Path("/proc/self/maps").read_text().splitlines()
    parsed = mappings()
    # the two reads may differ by a mapping or two made in between
    assert abs(len(parsed) - len(lines)) <= 2
    assert any(m.name == "[stack]" for m in parsed)
    for m in parsed:
        assert m.start < m.end
        assert m.start % PAGE_SIZE == 0
        assert m.end % PAGE_SIZE == 0


def test_mappings_show_a_region_with_its_perms(alloc: MapAlloc) -> None:
    with MapAlloc(write=False, exec=True).alloc(3 * PAGE_SIZE) as region:
        start, end = region.address, region.address + region.capacity
        covering = [m for m in mappings() if m.start <= start and end <= m.end]
        assert len(covering) == 1
        assert covering[0].perms == R | X
        assert covering[0].private
        assert covering[0].name == ""


def test_mappings_keep_names_with_spaces(tmp_path: Path) -> None:
    path = tmp_path / "a name with spaces"
    path.write_bytes(b"x" * PAGE_SIZE)
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[0] == ord("x")
        names = [mapping.name for mapping in mappings()]
    assert str(path) in names


def test_mapping_count_counts_the_lines() -> None:
    a = mapping_count()
    lines = len(Path("/proc/self/maps").read_text().splitlines())
    b = mapping_count()
    assert min(a, b) - 2 <= lines <= max(a, b) + 2


def test_mapping_count_takes_no_buffer_from_the_heap() -> None:
    """At vm.max_map_count the heap may not grow (the kernel counts a grown
    heap against the limit) and a new block cannot be mapped: the count reads
    into a buffer on the C stack, and only its result is an object."""
    tracemalloc.start()
    try:
        mapping_count()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256


def test_mapping_count_grows_by_one_for_a_separate_mapping() -> None:
    before = mapping_count()
    with MapAlloc().reserve(PAGE_SIZE) as region:  # PROT_NONE: merges with nothing here
        assert mapping_count() in (before, before + 1)
        assert any(m.start <= region.address < m.end and m.perms == Perm.NONE for m in mappings())


def test_a_lock_refused_without_a_memlock_limit_names_the_map_count() -> None:
    exc = memlock_error(OSError(errno.ENOMEM, "no"), 4096)
    assert isinstance(exc, AllocError)
    assert "vm.max_map_count" in str(exc)  # this suite runs as root: the limit does not bind


def test_other_lock_errors_stay_as_they_are() -> None:
    original = OSError(errno.EINVAL, "bad range")
    assert memlock_error(original, 4096) is original


# ---------------------------------------------------------------- memory and descriptors


def test_memory_available_is_positive_and_within_the_ceiling() -> None:
    available = _linux.memory_available()
    assert available is not None
    assert 0 < available <= _linux.memory_ceiling()


def test_meminfo_reads_kilobytes_as_bytes() -> None:
    info = _linux.meminfo()
    assert info["MemTotal"] % 1024 == 0
    assert info["MemTotal"] >= info["MemAvailable"] > 0


def test_fd_target_names_what_a_descriptor_is() -> None:
    fd = os.memfd_create("target")
    try:
        assert _linux.fd_target(fd).startswith("/memfd:target")
    finally:
        os.close(fd)
    assert _linux.fd_target(-1) == ""


def test_hugetlb_hint_says_how_to_reserve_pages() -> None:
    hint = _linux.hugetlb_hint(2 << 20)
    assert "echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in hint


def test_seal_names_are_the_kernels_bits() -> None:
    assert _linux.F_SEAL_NAMES["seal"] == 1
    assert _linux.F_SEAL_NAMES["shrink"] == 2
    assert _linux.F_SEAL_NAMES["grow"] == 4
    assert _linux.F_SEAL_NAMES["write"] == 8
