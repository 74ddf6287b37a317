"""The C layer: system calls, the exporting Region base type, and its byte accounting."""

from __future__ import annotations

import errno

import pytest

from mmap_alloc import MapAlloc, Perm, _mman
from mmap_alloc._platform import PAGE_SIZE as P
from support import mapped_intervals, subtract

MiB = 1 << 20


def exec_only() -> MapAlloc:
    """Pages that never merge with the interpreter's own (--x)."""
    return MapAlloc(read=False, write=False, exec=True)


def exec_intervals() -> list[tuple[int, int]]:
    return mapped_intervals(perms={Perm.EXEC})


def new_bytes(before: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in subtract(exec_intervals(), before))


def test_page_size() -> None:
    assert _mman.page_size() == P


def test_constants_are_the_kernels() -> None:
    assert (_mman.PROT_NONE, _mman.PROT_READ, _mman.PROT_WRITE, _mman.PROT_EXEC) == (0, 1, 2, 4)
    assert _mman.MADV_DONTNEED == 4
    assert _mman.MREMAP_MAYMOVE == 1


# ---------------------------------------------------------------- accounting


def test_mapped_bytes_follow_what_the_kernel_maps() -> None:
    alloc = exec_only()
    start, before = _mman.mapped_bytes(), exec_intervals()
    with alloc.alloc(3 * P) as region:
        assert _mman.mapped_bytes() - start == new_bytes(before) == 3 * P
        alloc.realloc(region, 10 * P)
        assert _mman.mapped_bytes() - start == new_bytes(before) == 10 * P
        alloc.realloc(region, P)
        assert _mman.mapped_bytes() - start == new_bytes(before) == P
        with alloc.alloc(P, 2 * MiB):
            assert _mman.mapped_bytes() - start == new_bytes(before) == 2 * P
    assert _mman.mapped_bytes() == start


def test_mapped_bytes_follow_raw_calls() -> None:
    start = _mman.mapped_bytes()
    address = _mman.mmap(P + 1, _mman.PROT_READ, 0)
    assert _mman.mapped_bytes() - start == 2 * P
    _mman.munmap(address + P, P)
    assert _mman.mapped_bytes() - start == P
    _mman.munmap(address, 1)
    assert _mman.mapped_bytes() == start


def test_failed_calls_change_no_count() -> None:
    start = _mman.mapped_bytes()
    with pytest.raises(OSError) as info:
        _mman.mmap(0, _mman.PROT_READ, 0)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        _mman.munmap(1, P)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        _mman.mmap(1 << 47, _mman.PROT_READ | _mman.PROT_WRITE, 0)
    assert info.value.errno == errno.ENOMEM
    assert _mman.mapped_bytes() == start


def test_a_region_freed_by_the_collector_is_counted_out() -> None:
    start = _mman.mapped_bytes()
    region = MapAlloc().alloc(5 * P)
    assert _mman.mapped_bytes() - start == 5 * P
    del region
    assert _mman.mapped_bytes() == start


# ---------------------------------------------------------------- raw functions


def test_raw_mmap_gives_private_anonymous_zeroed_memory() -> None:
    import ctypes

    address = _mman.mmap(P, _mman.PROT_READ | _mman.PROT_WRITE, 0)
    try:
        assert address % P == 0
        assert ctypes.string_at(address, P) == bytes(P)
    finally:
        _mman.munmap(address, P)


def test_raw_mprotect_and_madvise() -> None:
    address = _mman.mmap(P, _mman.PROT_NONE, 0)
    try:
        _mman.mprotect(address, P, _mman.PROT_READ)
        _mman.madvise(address, P, _mman.MADV_DONTNEED)
        with pytest.raises(OSError) as info:
            _mman.madvise(address + 1, P, _mman.MADV_DONTNEED)
        assert info.value.errno == errno.EINVAL
    finally:
        _mman.munmap(address, P)


@pytest.mark.parametrize(
    ("function", "args"),
    [
        (_mman.mmap, (P, 0)),
        (_mman.munmap, (0,)),
        (_mman.mprotect, (0, P)),
        (_mman.madvise, (0, P, 0, 0)),
    ],
)
def test_raw_functions_check_their_argument_count(function: object, args: tuple[int, ...]) -> None:
    with pytest.raises(TypeError, match="takes exactly"):
        function(*args)  # type: ignore[operator]


def test_raw_functions_refuse_negative_lengths() -> None:
    with pytest.raises(ValueError, match="negative size"):
        _mman.mmap(-1, 0, 0)


# ---------------------------------------------------------------- the Region base type


def test_region_base_type_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        _mman.Region()


def test_map_refuses_a_size_larger_than_the_capacity() -> None:
    from mmap_alloc import Region

    with pytest.raises(ValueError, match="size exceeds capacity"):
        Region._map(2 * P, P, 3, 0, None)


def test_adopt_refuses_a_null_address() -> None:
    from mmap_alloc import Region

    with pytest.raises(ValueError, match="bad mapping"):
        Region._adopt(0, P, P, 3, None)


def test_resize_refuses_a_size_larger_than_the_capacity() -> None:
    with MapAlloc().alloc(P) as region, pytest.raises(ValueError, match="bad size or capacity"):
        region._resize(2 * P, P, 0)


def test_private_range_methods_check_the_range() -> None:
    with MapAlloc().alloc(P) as region:
        for call in (
            lambda: region._zero(0, P + 1, 3),
            lambda: region._advise(P, 1, _mman.MADV_DONTNEED),
            lambda: region._mincore(2 * P, 0),
            lambda: region._protect(0, 2 * P, 1, 1, 0),
            lambda: region._flush_icache(0, P + 1),
        ):
            with pytest.raises(ValueError, match="range lies outside the region"):
                call()
        assert region.perms == Perm.READ | Perm.WRITE


def test_swap_and_copy_need_another_region() -> None:
    with MapAlloc().alloc(P) as region:
        with pytest.raises(TypeError, match="needs another region"):
            region._swap(b"x")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="needs another region"):
            region._copy_from(b"x", 1)  # type: ignore[arg-type]


def test_swap_exchanges_mappings_of_idle_regions() -> None:
    alloc = MapAlloc()
    with alloc.alloc(P) as a, alloc.alloc(2 * P) as b:
        a[0], b[0] = 1, 2
        a_address, b_address = a.address, b.address
        a._swap(b)
        assert (a.address, a.capacity, a[0]) == (b_address, 2 * P, 2)
        assert (b.address, b.capacity, b[0]) == (a_address, P, 1)
        with memoryview(b), pytest.raises(BufferError):
            a._swap(b)


def test_an_empty_mincore_range_is_empty() -> None:
    with MapAlloc().alloc(P) as region:
        assert region._mincore(P, 0) == b""


# ---------------------------------------------------------------- no lock on the fast paths
# protect(perms), make_exec() and make_writable() of a whole region run in C
# without the Python layer's lock; the calls below let the Python layer act on
# what it read without a window in which such a call could make it wrong.


def test_protect_with_a_stale_expectation_changes_nothing() -> None:
    rw = int(Perm.READ | Perm.WRITE)
    with MapAlloc().alloc(2 * P) as region:
        stale = int(Perm.READ)  # what the caller believed, uniform
        assert region._protect(0, P, int(Perm.NONE), int(Perm.NONE), 1, stale) is False
        assert region.protections() == [(0, 2 * P, Perm.READ | Perm.WRITE)]
        assert (region._prot, region._mixed) == (rw, False)
        assert region._protect(0, P, int(Perm.READ), int(Perm.READ), 1, rw) is True
        assert region.protections() == [(0, P, Perm.READ), (P, P, Perm.READ | Perm.WRITE)]


def test_zero_of_a_uniform_region_reads_its_protection_when_it_acts() -> None:
    with MapAlloc().alloc(P) as region:
        region[:] = b"\1" * P
        region.protect(Perm.READ)  # not writable: _zero lends WRITE for the memset
        region._zero(10, 20, -1)
        assert region[:40] == b"\1" * 10 + bytes(20) + b"\1" * 10
        assert region.protections() == [(0, P, Perm.READ)]


def test_zero_of_a_mixed_region_needs_the_protection() -> None:
    with MapAlloc().alloc(2 * P) as region:
        region.protect(Perm.READ, 0, P)
        with pytest.raises(ValueError, match="mixed"):
            region._zero(0, 10, -1)


def test_flush_icache_of_an_unreadable_region_does_nothing() -> None:
    with MapAlloc(read=False, write=False).alloc(P) as region:
        region._flush_icache(0, P)  # would fault on arm64 if it touched the page
        region.flush_icache()
