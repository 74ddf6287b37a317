"""The C layer: the Region base type, its protection record, exports, pins,
views, byte accounting, and fork."""

from __future__ import annotations

import gc
import itertools
import re
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mmap_alloc import (
    CodeHeap,
    MapAlloc,
    ObjectPool,
    Perm,
    Region,
    SecretBuffer,
    SharedRegion,
    _mman,
)
from mmap_alloc._linux import PAGE_SIZE as P
from support import HOST_MAPS, emulated_skip, kernel_runs, run_in_child

MiB = 1 << 20
RW = Perm.READ | Perm.WRITE
ALLOC = MapAlloc()


def four_pages() -> Region:
    return ALLOC.alloc(4 * P)


def test_page_size() -> None:
    assert _mman.page_size() == P


def test_constants_are_the_kernels() -> None:
    assert (_mman.PROT_NONE, _mman.PROT_READ, _mman.PROT_WRITE, _mman.PROT_EXEC) == (0, 1, 2, 4)
    assert _mman.MADV_DONTNEED == 4
    assert (_mman.MADV_GUARD_INSTALL, _mman.MADV_GUARD_REMOVE) == (102, 103)


# ---------------------------------------------------------------- accounting


def test_mapped_bytes_follow_regions() -> None:
    start = _mman.mapped_bytes()
    with ALLOC.alloc(3 * P) as region:
        assert _mman.mapped_bytes() - start == 3 * P
        ALLOC.realloc(region, 10 * P)
        assert _mman.mapped_bytes() - start == 10 * P
        ALLOC.realloc(region, P)
        assert _mman.mapped_bytes() - start == P
        with ALLOC.alloc(P, 2 * MiB):
            assert _mman.mapped_bytes() - start == 2 * P
    assert _mman.mapped_bytes() == start


def test_a_region_freed_by_the_collector_is_counted_out() -> None:
    start = _mman.mapped_bytes()
    region = ALLOC.alloc(5 * P)
    assert _mman.mapped_bytes() - start == 5 * P
    del region
    assert _mman.mapped_bytes() == start


def test_a_refused_mapping_changes_no_count() -> None:
    start = _mman.mapped_bytes()
    with pytest.raises(MemoryError):
        ALLOC.alloc(1 << 47)
    assert _mman.mapped_bytes() == start


# ---------------------------------------------------------------- the Region base type


def test_region_base_type_cannot_be_instantiated() -> None:
    with pytest.raises(TypeError):
        _mman.Region()


@pytest.mark.parametrize(
    "args",
    [
        (2 * P, P, 3, 0, 0, 0, P, P),  # size past the capacity
        (0, P, 3, 0, 0, 0, P, P),  # empty
        (P, P + 1, 3, 0, 0, 0, P, P),  # capacity not whole pages
        (P, P, 8, 0, 0, 0, P, P),  # no such protection
        (P, P, 3, 0, 0, 0, P, 3 * P),  # alignment not a power of two
        (P, P, 3, 0, 0, 0, P, P // 2),  # alignment below the page
    ],
)
def test_map_refuses_bad_parameters(args: tuple[int, int, int, int, int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="bad mapping parameters"):
        Region._map(*args, None, None)


def test_map_reports_the_kernels_refusal_as_os_error() -> None:
    with pytest.raises(OSError) as info:
        Region._map(P, 1 << 47, 3, 0, 0, 0, P, P, None, None)
    assert info.value.errno == 12


def test_map_records_owner_backing_page_and_alignment() -> None:
    owner, backing = object(), "normal"
    region = Region._map(10, P, 3, 0, 0, 0, P, 1 << 21, owner, backing)
    with region:
        assert region._owner is owner and region._backing is backing
        assert (region.size, region.capacity, region._page, region._align) == (10, P, P, 1 << 21)
        assert region.address % (1 << 21) == 0


# ---------------------------------------------------------------- the record


def test_a_new_region_has_one_run() -> None:
    with four_pages() as region:
        assert region._runs() == [(0, 4 * P, 3, 0)]
        assert region._prot == 3 and not region.mixed


def test_protecting_the_middle_splits_the_record_in_three() -> None:
    with four_pages() as region:
        region.protect(Perm.READ, P, 2 * P)
        assert region._runs() == [(0, P, 3, 0), (P, 2 * P, 1, 0), (3 * P, P, 3, 0)]
        assert region._prot == -1 and region.mixed


def test_alike_neighbours_merge_back_into_one_run() -> None:
    with four_pages() as region:
        region.protect(Perm.READ, P, P)
        region.protect(Perm.NONE, 2 * P, P)
        region.protect(RW, P, 2 * P)
        assert region._runs() == [(0, 4 * P, 3, 0)]


@emulated_skip(HOST_MAPS)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.integers(1, 8)), max_size=12))
def test_the_record_matches_the_kernel_after_any_protects(
    changes: list[tuple[int, int, int]],
) -> None:
    with ALLOC.alloc(8 * P) as region:
        for prot, first, count in changes:
            region.protect(Perm(prot), first * P, min(count, 8 - first) * P)
        assert region.protections() == kernel_runs(region)
        runs = region._runs()
        assert all(a[2:] != b[2:] for a, b in itertools.pairwise(runs))  # merged
        assert sum(length for _, length, _, _ in runs) == 8 * P


def test_dontfork_is_a_flag_of_the_run() -> None:
    with four_pages() as region:
        region.advise("dontfork", P, P)
        assert region._runs() == [(0, P, 3, 0), (P, P, 3, 2), (2 * P, 2 * P, 3, 0)]
        assert not region.mixed  # the protection is the same everywhere
        region.advise("dofork", P, P)
        assert region._runs() == [(0, 4 * P, 3, 0)]


# ---------------------------------------------------------------- exports


def test_each_buffer_is_counted_once_and_released() -> None:
    with four_pages() as region:
        first = memoryview(region)
        second = region.view(10, 20)
        assert region._exports == 2
        first.release()
        assert region._exports == 1
        del second
        assert region._exports == 0


def test_an_export_blocks_only_the_access_it_needs() -> None:
    with four_pages() as region:
        with region.view(P, 10):  # writable: needs READ and WRITE of page 1
            region.protect(Perm.NONE, 2 * P, P)  # another page: fine
            with pytest.raises(BufferError, match="1 exported buffer"):
                region.protect(Perm.READ, P, P)
        region.protect(Perm.READ, P, P)
        with region.view(P, 10) as view:  # read-only now: needs READ only
            assert view.readonly
            region.protect(Perm.READ | Perm.EXEC, P, P)
            with pytest.raises(BufferError):
                region.protect(Perm.EXEC, P, P)


def test_the_exporter_of_a_view_cannot_reach_the_region() -> None:
    with four_pages() as region, region.view() as view:
        assert type(view.obj) is _mman.View
        assert not [name for name in dir(view.obj) if not name.startswith("__")]
        with pytest.raises(TypeError):
            _mman.View()


# ---------------------------------------------------------------- pins


def test_a_pin_counts_once_and_dies_with_its_last_reference() -> None:
    with MapAlloc(exec=True).alloc(P) as region:
        pin = region._pin(0)
        assert region._pins == 1
        assert pin.address == region.address
        with pytest.raises(BufferError):
            region.close()
        del pin
        assert region._pins == 0


def test_a_pin_needs_executable_code() -> None:
    with four_pages() as region:
        with pytest.raises(ValueError, match="not executable"):
            region._pin(0)
        assert region._pins == 0


def test_a_pin_in_a_reference_cycle_holds_until_collected() -> None:
    with MapAlloc(exec=True).alloc(P) as region:
        holder: list[object] = [region._pin(0)]
        holder.append(holder)
        del holder
        assert region._pins == 1
        gc.collect()
        assert region._pins == 0


def test_pins_cannot_be_made_directly() -> None:
    with pytest.raises(TypeError):
        _mman.Pin()


# ---------------------------------------------------------------- fork


def test_a_busy_count_does_not_survive_into_a_forked_child() -> None:
    import threading

    region = ALLOC.alloc(64 * MiB)
    started, release = threading.Event(), threading.Event()

    def busy() -> None:
        started.set()
        while not release.is_set():
            ALLOC.commit(region)  # the GIL is released while the kernel works

    thread = threading.Thread(target=busy)
    thread.start()
    started.wait()
    try:
        for _ in range(200):
            if region._busy:
                break
        status = run_in_child(region.close)  # the thread inside commit() is not in the child
    finally:
        release.set()
        thread.join()
    assert status == 0
    region.close()


def test_dontfork_pages_are_zero_pages_in_a_child() -> None:
    with four_pages() as region:
        region[:] = b"\1" * len(region)
        region.advise("dontfork", P, P)
        view = memoryview(region)

        def child() -> None:
            assert view[P : 2 * P] == bytes(P)  # mapped, zero, not a hole
            assert view[0] == 1 and view[2 * P] == 1
            assert region._runs() == [(0, 4 * P, 3, 0)]

        assert run_in_child(child) == 0
        view.release()
        assert region[P] == 1


# ---------------------------------------------------------------- page ranges
# Every method taking (offset, length) of whole pages reads them this way.


@given(
    capacity_pages=st.integers(1, 64),
    offset_pages=st.integers(0, 64),
    length=st.none() | st.integers(0, 64 * P),
)
def test_page_range_gives_whole_pages_within_the_capacity(
    capacity_pages: int, offset_pages: int, length: int | None
) -> None:
    capacity, offset = capacity_pages * P, offset_pages * P
    region = ALLOC.alloc(capacity)
    try:
        start, n = region._page_range(offset, length)
    except ValueError:
        rounded = 0 if length is None else -(-length // P) * P
        assert offset > capacity or offset + rounded > capacity
        return
    finally:
        region.close()
    assert start == offset
    assert n % P == 0
    assert start + n <= capacity
    if length is None:
        assert start + n == capacity
    else:
        assert n - P < length <= n or length == n == 0


@pytest.mark.parametrize("offset", [1, P - 1, P + 1, -P])
def test_page_range_refuses_offsets_that_are_not_aligned_or_negative(offset: int) -> None:
    with pytest.raises(ValueError, match="offset must be a non-negative multiple of the page size"):
        four_pages()._page_range(offset, None)


def test_page_range_refuses_a_negative_length() -> None:
    with pytest.raises(ValueError, match="length must not be negative, got -1"):
        four_pages()._page_range(0, -1)


def test_page_range_refuses_an_offset_past_the_capacity() -> None:
    with pytest.raises(ValueError, match=f"offset {5 * P} lies outside the region"):
        four_pages()._page_range(5 * P, None)


def test_page_range_refuses_a_length_past_the_capacity() -> None:
    with pytest.raises(ValueError, match="lies outside the region"):
        four_pages()._page_range(P, 3 * P + 1)


def test_page_range_at_the_end_is_empty() -> None:
    assert four_pages()._page_range(4 * P, None) == (4 * P, 0)
    assert four_pages()._page_range(4 * P, 0) == (4 * P, 0)


@pytest.mark.parametrize(("offset", "length"), [(0.0, None), (True, None), (0, 1.5), (0, "1")])
def test_page_range_refuses_values_that_are_not_integers(offset: object, length: object) -> None:
    with pytest.raises(TypeError, match=r"(offset|length) must be an integer"):
        four_pages()._page_range(offset, length)


# ---------------------------------------------------------------- tracemalloc


def traced_in_domain() -> int:
    """Bytes tracemalloc holds in the library's domain now."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.DomainFilter(inclusive=True, domain=_mman.TRACE_DOMAIN)]
    )
    return sum(trace.size for trace in snapshot.traces)


@pytest.fixture
def tracing() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def test_tracemalloc_counts_a_regions_bytes_in_the_library_domain_until_it_is_closed(
    tracing: None,
) -> None:
    region = MapAlloc().alloc(1 << 20)
    assert traced_in_domain() == 1 << 20
    region.close()
    assert traced_in_domain() == 0


def test_tracemalloc_follows_a_region_that_grows_moves_and_shrinks(tracing: None) -> None:
    alloc = MapAlloc()
    region = alloc.alloc(P)
    region = alloc.realloc(region, 64 * P)
    assert traced_in_domain() == 64 * P
    alloc.shrink_in_place(region, 2 * P)
    assert traced_in_domain() == 2 * P
    alloc.dealloc(region)
    assert traced_in_domain() == 0


def test_tracemalloc_counts_secrets_code_heaps_and_shared_regions(tracing: None) -> None:
    secret = SecretBuffer(100, lock="off")
    heap = CodeHeap(1 << 16)
    shared = SharedRegion.create(3 * P)
    # a secret's guard pages are part of its mapping; a heap's two views are one memory
    assert traced_in_domain() == secret._mapping[1] + (1 << 16) + 3 * P
    for each in (secret, heap, shared):
        each.close()
    assert traced_in_domain() == 0


def test_tracemalloc_counts_pool_slabs_until_they_are_unmapped(tracing: None) -> None:
    pool = ObjectPool(64)
    pool.free(pool.alloc())
    assert traced_in_domain() > 0
    pool.close()
    assert traced_in_domain() == 0


# ---------------------------------------------------------------- the kernel lock

KERNEL = Path(__file__).parent.parent / "src" / "mmap_alloc" / "_mman"
SOURCES = sorted([*KERNEL.glob("*.c"), *KERNEL.glob("*.h")])
UNLOCKED_SLOTS = {
    "tp_doc",
    "tp_methods",
    "tp_getset",
    "tp_members",
    "tp_traverse",  # called with the world stopped
    "tp_iter",  # PyObject_SelfIter
    "tp_new",  # the kernel's tp_new only allocates the object, or refuses
}


def _table_entries(text: str) -> Iterator[tuple[str, str]]:
    """(what, function) for every slot, method and getter a type table names."""
    for slot, function in re.findall(r"\{Py_(\w+),\s*([^,}]+)\s*\}", text):
        if slot not in UNLOCKED_SLOTS and not slot.startswith("mod_"):  # import-time slots
            yield slot, function.strip()
    for name, function in re.findall(
        r'\{"(\w+)",\s*(?:\(PyCFunction\)(?:\(void \(\*\)\(void\)\))?)?(\S+),\s*METH_', text
    ):
        yield name, function
    for name, function in re.findall(r'\{"(\w+)",\s*\(getter\)(\S+),', text):
        yield name, function


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_every_entry_point_of_a_kernel_file_runs_under_the_kernel_lock(source: Path) -> None:
    """A free-threaded build runs each entry point (tp_clear included: its
    collector clears garbage while other threads run) under the kernel lock;
    the headers' slot macros are read too."""
    unlocked = [
        f"{what}: {function}"
        for what, function in _table_entries(source.read_text())
        if not function.startswith("LOCKED(")
    ]
    assert unlocked == []


WRAPPER_OF_ENTRY = {
    "METHOD_FAST": "LOCKED_FAST",
    "METHOD_FASTKW": "LOCKED_FASTKW",
    "METHOD_O": "LOCKED_O",
    "METHOD_NOARGS": "LOCKED_O",
}


@pytest.mark.parametrize("source", SOURCES, ids=lambda path: path.name)
def test_every_method_entry_names_a_locked_wrapper_of_its_calling_convention(
    source: Path,
) -> None:
    """METHOD_FAST("name", f, doc) calls f through the wrapper LOCKED_FAST(f)
    defines: a wrapper of another convention would be cast to this one, and
    called with the wrong arguments, on free-threaded builds only."""
    text = source.read_text()
    wrappers = dict(
        (function, macro) for macro, function in re.findall(r"^(LOCKED_\w+)\((\w+)\)", text, re.M)
    )
    wrong = [
        f"{entry}({name!r}, {function}) wrapped by {wrappers.get(function)}"
        for entry, name, function in re.findall(r'\b(METHOD_\w+)\("(\w+)", (\w+),', text)
        if wrappers.get(function) != WRAPPER_OF_ENTRY[entry]
    ]
    assert wrong == []
