"""Protection of page ranges, W^X code, functions that pin their region, reservations.

protect() and what /proc/self/maps says after it, its failures, W^X and code,
function(), and deviations fixed."""

from __future__ import annotations

import ctypes
import gc
import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import mapping_count
from mmap_alloc.perm import ALL_PERMS
from protection_support import MACHINE, NONE, RW, RX, IntFunction, R, W, X, machine_code, run_child
from support import (
    FILLS_THE_MAP_COUNT,
    HOST_MAPS,
    SMALL_ALLOCATIONS_FROM_MALLOC,
    emulated_skip,
    skip_if_emulated,
)


def maps_perms(region: Region) -> list[Perm]:
    """The protection of each page of the region, parsed from /proc/self/maps here
    (independently of the library's reader)."""
    page = region._page
    start, end = region.address, region.address + region.capacity
    pages: list[Perm] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, flags = line.split()[:2]
            lo, hi = (int(part, 16) for part in span.split("-"))
            perms = Perm.of(read=flags[0] == "r", write=flags[1] == "w", exec=flags[2] == "x")
            pages += [perms] * (max(min(hi, end) - max(lo, start), 0) // page)
    assert len(pages) == region.capacity // page, "the region is not mapped in full"
    return pages


def expanded(runs: list[tuple[int, int, Perm]], page: int) -> list[Perm]:
    """Runs as one Perm per page."""
    return [perms for _offset, length, perms in runs for _ in range(length // page)]


def assert_agrees_with_maps(region: Region, expected: list[Perm] | None = None) -> None:
    """protections(), perms and mixed say what /proc/self/maps says."""
    page = region._page
    actual = maps_perms(region)
    runs = region.protections()
    assert sum(length for _o, length, _p in runs) == region.capacity
    assert all(a[2] != b[2] for a, b in itertools.pairwise(runs)), "runs not merged"
    assert expanded(runs, page) == actual
    if expected is not None:
        assert actual == expected
    assert region.mixed == (len(set(actual)) > 1)
    if not region.mixed:
        assert region.perms == actual[0]


@pytest.fixture
def region(alloc: MapAlloc, page: int) -> Iterator[Region]:
    """A read/write region of four pages."""
    with alloc.alloc(4 * page) as r:
        yield r


# ---------------------------------------------------------------- protect


@pytest.mark.parametrize("perms", ALL_PERMS, ids=str)
def test_protect_whole_region_sets_its_perms(region: Region, perms: Perm) -> None:
    region.protect(perms)
    assert region.perms == perms
    assert region.protections() == [(0, region.capacity, perms)]
    assert_agrees_with_maps(region)


def test_protect_middle_page_makes_region_mixed(region: Region, page: int) -> None:
    region.protect(R, page, page)
    assert region.mixed
    assert region.protections() == [(0, page, RW), (page, page, R), (2 * page, 2 * page, RW)]
    assert_agrees_with_maps(region, [RW, R, RW, RW])


def test_perms_of_mixed_region_raises_naming_protections(region: Region, page: int) -> None:
    region.protect(R, page, page)
    with pytest.raises(ValueError, match=r"protections\(\)"):
        _ = region.perms
    assert "mixed" in repr(region)


def test_protect_rest_alike_makes_region_uniform_again(region: Region, page: int) -> None:
    region.protect(R, page, page)
    region.protect(R, 0, page)
    region.protect(R, 2 * page)
    assert not region.mixed
    assert region.perms == R
    assert_agrees_with_maps(region, [R] * 4)


def test_protect_part_with_the_same_perms_keeps_region_uniform(region: Region, page: int) -> None:
    region.protect(RW, page, page)
    assert not region.mixed
    assert region.perms == RW


def test_protect_part_of_mixed_region_changes_only_that_part(region: Region, page: int) -> None:
    region.protect(R, page, page)
    region.protect(RX, 2 * page, page)
    region.protect(NONE, 3 * page)
    skip_if_emulated(HOST_MAPS)
    assert_agrees_with_maps(region, [RW, R, RX, NONE])


def test_protect_whole_mixed_region_makes_it_uniform(region: Region, page: int) -> None:
    region.protect(RX, page, 2 * page)
    region.protect(RW)
    assert not region.mixed
    assert_agrees_with_maps(region, [RW] * 4)


def test_protect_rounds_length_up_to_whole_pages(region: Region, page: int) -> None:
    region.protect(R, 0, page + 1)
    assert_agrees_with_maps(region, [R, R, RW, RW])


def test_protect_with_zero_length_changes_nothing(region: Region) -> None:
    region.protect(NONE, 0, 0)
    assert region.perms == RW


def test_protect_accepts_the_int_value_of_perms(region: Region) -> None:
    region.protect(1)
    assert region.perms == R


def test_read_only_region_reads_but_refuses_writes(region: Region) -> None:
    region[0] = 7
    region.protect(R)
    assert region[0] == 7
    with pytest.raises(TypeError):
        region[0] = 8


def test_unreadable_region_exports_no_buffer(region: Region) -> None:
    region.protect(NONE)
    with pytest.raises(BufferError):
        memoryview(region)


def test_mixed_region_exports_buffer_of_common_perms(region: Region, page: int) -> None:
    region.protect(R, page, page)
    with memoryview(region) as view:
        assert view.readonly


@pytest.mark.parametrize("perms", [R, W | X, NONE], ids=str)
def test_protect_refuses_to_remove_read_or_write_from_exported_region(
    region: Region, page: int, perms: Perm
) -> None:
    with memoryview(region):
        with pytest.raises(BufferError):
            region.protect(perms, page, page)
        assert_agrees_with_maps(region, [RW] * 4)


def test_protect_may_add_exec_while_buffer_is_exported(region: Region) -> None:
    with memoryview(region):
        region.protect(RW | X)
    assert region.perms == RW | X


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(ALL_PERMS), st.integers(0, 7), st.integers(0, 8)),
        min_size=1,
        max_size=12,
    )
)
@settings(max_examples=60, deadline=None)
@emulated_skip(HOST_MAPS)
def test_protections_agree_with_maps_after_every_protect(
    steps: list[tuple[Perm, int, int]],
) -> None:
    alloc = MapAlloc()
    page = alloc.page_size
    with alloc.alloc(8 * page) as region:
        model = [RW] * 8
        for perms, first, wanted in steps:
            count = min(wanted, 8 - first)
            region.protect(perms, first * page, count * page)
            model[first : first + count] = [perms] * count
            assert_agrees_with_maps(region, model)


# ---------------------------------------------------------------- failures


BAD_RANGES = [
    pytest.param(1, None, id="unaligned-offset"),
    pytest.param(-4096, None, id="negative-offset"),
    pytest.param(5 * 4096, None, id="offset-beyond-end"),
    pytest.param(0, -1, id="negative-length"),
    pytest.param(4096, 4 * 4096, id="end-beyond-capacity"),
    pytest.param(0, 2**70, id="huge-length"),
]


@pytest.mark.parametrize(("offset", "length"), BAD_RANGES)
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r, o, n: r.protect(R, o, n), id="protect"),
        pytest.param(lambda r, o, n: r.make_exec(o, n), id="make_exec"),
        pytest.param(lambda r, o, n: r.make_writable(o, n), id="make_writable"),
        pytest.param(lambda r, o, n: r.writable(o, n).__enter__(), id="writable"),
        pytest.param(lambda r, o, n: r.flush_icache(o, n), id="flush_icache"),
    ],
)
def test_bad_range_is_a_value_error_and_changes_nothing(
    region: Region, call: object, offset: int, length: int | None
) -> None:
    assert page_size_is(4096)
    region.protect(R, 4096, 4096)
    with pytest.raises(ValueError, match=r"offset|length"):
        call(region, offset, length)  # type: ignore[operator]
    assert_agrees_with_maps(region, [RW, R, RW, RW])


def page_size_is(size: int) -> bool:
    from mmap_alloc._linux import PAGE_SIZE

    if size != PAGE_SIZE:
        pytest.skip("these ranges are written for 4 KiB pages")
    return True


@pytest.mark.parametrize(
    ("perms", "error"),
    [(8, ValueError), (-1, ValueError), ("rw-", TypeError), (1.0, TypeError), (None, TypeError)],
)
def test_bad_perms_are_refused_and_change_nothing(
    region: Region, perms: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="perms"):
        region.protect(perms)  # type: ignore[arg-type]
    assert_agrees_with_maps(region, [RW] * 4)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.protect(R), id="protect"),
        pytest.param(lambda r: r.protections(), id="protections"),
        pytest.param(lambda r: r.make_exec(), id="make_exec"),
        pytest.param(lambda r: r.make_writable(), id="make_writable"),
        pytest.param(lambda r: r.writable().__enter__(), id="writable"),
        pytest.param(lambda r: r.flush_icache(), id="flush_icache"),
        pytest.param(lambda r: r.function(IntFunction), id="function"),
        pytest.param(lambda r: r.mixed, id="mixed"),
        pytest.param(lambda r: r.perms, id="perms"),
    ],
)
def test_closed_region_is_a_value_error(alloc: MapAlloc, call: object) -> None:
    region = alloc.alloc(1)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        call(region)  # type: ignore[operator]


@FILLS_THE_MAP_COUNT
def test_failed_mprotect_at_map_count_limit_leaves_protections_as_they_were() -> None:
    # In a child: exhaust vm.max_map_count with one-page mappings, then ask for
    # splits until enough mappings have been released for them to succeed.
    result = run_child(
        """
        from mmap_alloc import AllocError, MapAlloc, Perm
        from mmap_alloc._linux import PAGE_SIZE as page

        RW, R = Perm.READ | Perm.WRITE, Perm.READ
        alloc = MapAlloc()
        uniform = alloc.alloc(3 * page)
        mixed = alloc.alloc(4 * page)
        mixed.protect(R, page, page)
        before = {"uniform": uniform.protections(), "mixed": mixed.protections()}
        fillers = []
        makers = (MapAlloc(write=False), MapAlloc(read=False, write=False))
        try:
            while True:  # alternate protections so that neighbours never merge
                fillers.append(makers[len(fillers) % 2].alloc(page))
        except AllocError:
            pass
        failures = {"uniform": 0, "mixed": 0}
        for name, region, offset in (("uniform", uniform, page), ("mixed", mixed, 2 * page)):
            while True:
                try:
                    region.protect(Perm.READ | Perm.EXEC, offset, page)
                    break
                except AllocError:
                    failures[name] += 1
                    assert region.protections() == before[name], region.protections()
                    fillers.pop().close()
        RX = Perm.READ | Perm.EXEC
        assert uniform.protections() == [(0, page, RW), (page, page, RX), (2 * page, page, RW)]
        assert mixed.protections() == [
            (0, page, RW), (page, page, R), (2 * page, page, RX), (3 * page, page, RW)
        ]
        print(failures["uniform"], failures["mixed"], len(fillers))
        """,
        env=SMALL_ALLOCATIONS_FROM_MALLOC,
    )
    assert result.returncode == 0, result.stderr
    uniform_failures, mixed_failures, fillers = map(int, result.stdout.split())
    assert uniform_failures >= 1
    assert mixed_failures >= 1
    assert fillers > 60000


# ---------------------------------------------------------------- W^X and code


def test_make_exec_makes_region_read_exec(region: Region) -> None:
    region.make_exec()
    assert_agrees_with_maps(region, [RX] * 4)


def test_make_writable_makes_region_read_write(region: Region) -> None:
    region.make_exec()
    region.make_writable()
    assert_agrees_with_maps(region, [RW] * 4)


def test_make_exec_of_part_leaves_other_pages(region: Region, page: int) -> None:
    region.make_exec(page, page)
    assert_agrees_with_maps(region, [RW, RX, RW, RW])


def test_generated_code_returns_the_right_result(region: Region) -> None:
    code = machine_code("add")
    region[: len(code)] = code
    region.make_exec()
    add = region.function(IntFunction)
    assert add(2, 3) == 5
    assert add(-7, 7) == 0


def test_code_rewritten_under_writable_gives_the_new_result(region: Region) -> None:
    code = machine_code("add")
    region[: len(code)] = code
    region.make_exec()
    assert region.function(IntFunction)(7, 5) == 12
    with region.writable():
        assert region.perms == RW
        code = machine_code("sub")
        region[: len(code)] = code
    assert region.perms == RX
    assert region.function(IntFunction)(7, 5) == 2


def test_writable_makes_region_executable_again_when_block_raises(region: Region) -> None:
    region.make_exec()
    with pytest.raises(KeyError), region.writable():
        raise KeyError
    assert region.perms == RX


def test_writable_of_part_leaves_other_pages(region: Region, page: int) -> None:
    region.protect(RX, 0, 2 * page)
    with region.writable(page, page):
        assert_agrees_with_maps(region, [RX, RW, RW, RW])
    assert_agrees_with_maps(region, [RX, RX, RW, RW])


@pytest.mark.parametrize("middle", [False, True], ids=["whole-region", "middle-page"])
def test_ten_thousand_flips_keep_the_mapping_count(region: Region, page: int, middle: bool) -> None:
    # Flipping the middle page splits and re-merges kernel mappings each time.
    offset, length = (page, page) if middle else (0, None)
    region.make_exec(offset, length)
    before = mapping_count()
    for _ in range(10_000):
        region.make_writable(offset, length)
        region.make_exec(offset, length)
    assert mapping_count() == before
    assert_agrees_with_maps(region, [RW, RX, RW, RW] if middle else [RX] * 4)


def test_flush_icache_accepts_any_page_range(region: Region, page: int) -> None:
    region.flush_icache()
    region.flush_icache(page, page)
    region.flush_icache(page, 0)


def test_flush_icache_skips_unreadable_pages(alloc: MapAlloc, page: int) -> None:
    with alloc.reserve(4 * page) as reservation:
        reservation.flush_icache()
        reservation.make_exec(page, page)
        reservation.flush_icache()
        assert_agrees_with_maps(reservation, [NONE, RX, NONE, NONE])


# ---------------------------------------------------------------- function()


@pytest.fixture
def code_region(region: Region) -> Region:
    """The region holding ``add`` at offset 0, read/exec."""
    code = machine_code("add")
    region[: len(code)] = code
    region.make_exec()
    return region


def test_function_is_an_instance_of_its_prototype(code_region: Region) -> None:
    add = code_region.function(IntFunction)
    assert isinstance(add, IntFunction)
    # (ctypes.cast() would put the function in a reference cycle, pinning the region until gc)
    assert ctypes.c_void_p.from_buffer(add).value == code_region.address


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.close(), id="close"),
        pytest.param(lambda r: r._owner.dealloc(r), id="dealloc"),
        pytest.param(lambda r: r._owner.shrink_in_place(r, 1), id="shrink_in_place"),
        pytest.param(lambda r: r._owner.realloc(r, 64 * r.capacity), id="realloc-moving"),
    ],
)
def test_function_pins_its_region(code_region: Region, call: object) -> None:
    add = code_region.function(IntFunction)
    address = code_region.address
    with pytest.raises(BufferError, match=r"function|exported"):
        call(code_region)  # type: ignore[operator]
    assert code_region.address == address
    assert add(1, 2) == 3


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda r: r.make_writable(), id="make_writable"),
        pytest.param(lambda r: r.writable().__enter__(), id="writable"),
        pytest.param(lambda r: r.protect(R), id="protect-read"),
        pytest.param(lambda r: r.protect(NONE, r.capacity - 4096), id="protect-last-page"),
    ],
)
def test_function_keeps_exec_on_every_page(code_region: Region, call: object) -> None:
    add = code_region.function(IntFunction)
    with pytest.raises(BufferError, match=r"EXEC"):
        call(code_region)  # type: ignore[operator]
    assert_agrees_with_maps(code_region, [RX] * 4)
    assert add(1, 2) == 3


def test_function_allows_removing_write(alloc: MapAlloc, page: int) -> None:
    rwx = MapAlloc(exec=True)
    with rwx.alloc(page) as region:
        code = machine_code("add")
        region[: len(code)] = code
        add = region.function(IntFunction)
        region.make_exec()
        assert add(2, 2) == 4
        del add


def test_function_allows_removing_read_of_other_pages(code_region: Region, page: int) -> None:
    add = code_region.function(IntFunction)
    code_region.protect(X, page)
    assert add(1, 1) == 2


def test_deleting_the_function_releases_the_region(code_region: Region) -> None:
    add = code_region.function(IntFunction)
    del add
    gc.collect()
    assert code_region._exports == 0
    code_region.make_writable()


def test_function_keeps_its_region_alive(alloc: MapAlloc) -> None:
    code = machine_code("add")
    region = alloc.alloc(len(code))
    region[: len(code)] = code
    region.make_exec()
    add = region.function(IntFunction)
    del region
    gc.collect()
    assert add(20, 22) == 42
    assert add.region.perms == RX  # type: ignore[attr-defined]


def test_function_at_offset_in_reservation(alloc: MapAlloc, page: int) -> None:
    with alloc.reserve(16 * page) as reservation:
        reservation.protect(RW, 5 * page, page)
        code = machine_code("sub")
        ctypes.memmove(reservation.address + 5 * page + 64, code, len(code))
        reservation.make_exec(5 * page, page)
        sub = reservation.function(IntFunction, 5 * page + 64)
        assert sub(10, 4) == 6
        assert sub.offset == 5 * page + 64  # type: ignore[attr-defined]
        del sub


def test_function_runs_exec_only_code(code_region: Region) -> None:
    code_region.protect(X)
    add = code_region.function(IntFunction)
    assert add(4, 5) == 9
    assert_agrees_with_maps(code_region, [X] * 4)


def test_function_on_non_executable_memory_is_a_clear_error(region: Region) -> None:
    with pytest.raises(ValueError, match=r"not executable \(rw-\).*make_exec"):
        region.function(IntFunction)
    assert region._exports == 0


def test_function_on_non_executable_page_of_mixed_region_is_an_error(
    region: Region, page: int
) -> None:
    region.make_exec(0, page)
    with pytest.raises(ValueError, match="not executable"):
        region.function(IntFunction, page)


@pytest.mark.parametrize("offset", [-1, 4 * 4096, 2**64, "0", 1.0])
def test_function_at_bad_offset_is_refused(code_region: Region, offset: object) -> None:
    with pytest.raises((ValueError, TypeError), match="offset"):
        code_region.function(IntFunction, offset)  # type: ignore[arg-type]
    assert code_region._exports == 0


@pytest.mark.skipif(MACHINE not in ("aarch64", "arm64"), reason="arm64 instruction alignment")
def test_function_at_unaligned_offset_is_refused_on_arm64(code_region: Region) -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        code_region.function(IntFunction, 2)


@pytest.mark.parametrize("prototype", [ctypes.c_int, int, None, IntFunction(0)])
def test_function_needs_a_ctypes_function_type(code_region: Region, prototype: object) -> None:
    with pytest.raises(TypeError, match="ctypes function type"):
        code_region.function(prototype)  # type: ignore[arg-type]


# ---------------------------------------------------------------- deviations fixed


def test_protect_with_a_value_past_the_flags_is_a_value_error(region: Region) -> None:
    with pytest.raises(ValueError, match=r"perms must combine Perm\.READ, WRITE and EXEC"):
        region.protect(Perm(8))
    assert region.protections() == [(0, region.capacity, R | W)]


def test_writable_refuses_to_start_while_a_writable_buffer_covers_the_pages(
    region: Region,
) -> None:
    with memoryview(region):
        with pytest.raises(BufferError), region.writable():
            pytest.fail("the block ran")  # pragma: no cover
        assert region.protections() == [(0, region.capacity, R | W)]


def test_writable_keeps_the_blocks_exception_when_leaving_fails(region: Region) -> None:
    region.make_exec()
    with pytest.raises(KeyError) as info, region.writable():
        view = memoryview(region)  # a writable buffer still alive when the block ends
        raise KeyError("from the block")
    assert any("stay read/write" in note for note in info.value.__notes__)
    view.release()
    region.make_exec()


def test_a_function_blocks_writable_with_a_clear_error() -> None:
    import ctypes

    alloc = MapAlloc(exec=True)
    with alloc.alloc(4096) as code:
        function = code.function(ctypes.CFUNCTYPE(None))
        with pytest.raises(BufferError, match="function"), code.writable():
            pass  # pragma: no cover
        del function
