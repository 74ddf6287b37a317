"""Region's pages of differing protections: every read and write through the
API checks each page it touches."""

from __future__ import annotations

import gc
import inspect
import sys
from collections.abc import Callable
from typing import Any

import pytest

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import MADV_GUARD_INSTALL
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import R, W, X, allocator_for
from support import run_forked

# ---------------------------------------------------------------- page protections


READS = {
    "item": lambda r, lo, hi: [r[i] for i in range(lo, hi)],
    "slice": lambda r, lo, hi: r[lo:hi],
    "find": lambda r, lo, hi: r.find(b"\xff", lo, hi),
    "rfind": lambda r, lo, hi: r.rfind(b"\xff", lo, hi),
    "view": lambda r, lo, hi: r.view(lo, hi - lo).release(),
}


@pytest.mark.parametrize("read", list(READS.values()), ids=list(READS))
@pytest.mark.parametrize(
    ("lo", "hi", "bad"),
    [
        (0, P, None),  # page 0: read/write
        (2 * P, 4 * P, None),  # read-only then read/write
        (P, P + 1, P),  # page 1: no access
        (P - 1, P + 1, P),  # crossing into it
        (2 * P - 1, 2 * P + 1, 2 * P - 1),  # crossing out of it
        (0, 4 * P, P),  # the whole region
    ],
    ids=["rw", "r-then-rw", "none", "into-none", "out-of-none", "all"],
)
def test_reading_checks_every_page_it_touches(
    mixed: Region, read: Callable[[Region, int, int], object], lo: int, hi: int, bad: int | None
) -> None:
    if bad is None:
        read(mixed, lo, hi)
    elif read is READS["view"]:
        with pytest.raises(BufferError, match="not readable"):
            read(mixed, lo, hi)
    else:
        with pytest.raises(BufferError, match=f"not readable at offset {bad}"):
            read(mixed, lo, hi)
    assert mixed._exports == 0


WRITES = {
    "item": lambda r, lo, hi: r.__setitem__(lo, 9),
    "slice": lambda r, lo, hi: r.__setitem__(slice(lo, hi), bytes(hi - lo)),
}


@pytest.mark.parametrize("write", list(WRITES.values()), ids=list(WRITES))
@pytest.mark.parametrize(
    ("lo", "hi", "bad", "kind"),
    [
        (0, P, None, ""),
        (3 * P, 4 * P, None, ""),
        (2 * P, 2 * P + 1, 2 * P, "read-only"),
        (2 * P - 1, 2 * P + 1, 2 * P - 1, "not writable"),  # no access, then read-only
        (3 * P - 1, 3 * P + 1, 3 * P - 1, "read-only"),  # read-only into read/write
    ],
    ids=["rw", "last-rw", "read-only", "none-then-r", "r-then-rw"],
)
def test_writing_checks_every_page_it_touches(
    mixed: Region,
    write: Callable[[Region, int, int], object],
    lo: int,
    hi: int,
    bad: int | None,
    kind: str,
) -> None:
    before = [mixed[0], mixed[3 * P], mixed[4 * P - 1]]
    if bad is None:
        write(mixed, lo, hi)
        return
    with pytest.raises(TypeError, match=f"cannot write to the region at offset {bad}: .*{kind}"):
        write(mixed, lo, hi)
    assert [mixed[0], mixed[3 * P], mixed[4 * P - 1]] == before  # nothing written


@pytest.mark.parametrize(
    ("key", "touches_page_1"),
    [
        (slice(0, 3 * P, 2 * P), False),  # elements on pages 0 and 2: steps over page 1
        (slice(2 * P, None, -2 * P), False),  # the same, backwards
        (slice(P - 1, 4 * P, 2 * P), False),  # P - 1 and 3P - 1: pages 0 and 2
        (slice(0, 3 * P, P), True),  # 0, P, 2P
        (slice(P + 5, P + 6, 7), True),
        (slice(4 * P - 1, None, -P), True),
        (slice(P - 1, None, -1), False),
    ],
    ids=repr,
)
def test_an_extended_slice_checks_the_pages_of_its_elements(
    mixed: Region, key: slice, touches_page_1: bool
) -> None:
    elements = range(4 * P)[key]
    if touches_page_1:
        first = next(i for i in sorted(elements) if P <= i < 2 * P)
        with pytest.raises(BufferError, match=f"not readable at offset {first}"):
            mixed[key]
    else:
        assert mixed[key] == bytes(i // P + 1 for i in elements)


def test_an_extended_slice_write_is_refused_at_its_read_only_element(mixed: Region) -> None:
    with pytest.raises(TypeError, match=f"offset {2 * P}: its pages are read-only"):
        mixed[0 : 3 * P : 2 * P] = b"ab"  # pages 0 and 2
    assert mixed[0] == 1
    mixed[0 : 4 * P : 3 * P] = b"ab"  # pages 0 and 3, both writable
    assert (mixed[0], mixed[3 * P]) == (ord("a"), ord("b"))
    with pytest.raises(TypeError, match=f"offset {2 * P - 1}: its pages are not writable"):
        mixed[4 * P - 1 : 0 : -P] = b"wxyz"  # 4P-1, 3P-1 (read-only), 2P-1 (none), P-1
    assert mixed[4 * P - 1] == 4


def test_in_over_a_region_with_an_unreadable_page_is_buffer_error(mixed: Region) -> None:
    with pytest.raises(BufferError, match=f"not readable at offset {P}"):
        b"\x03" in mixed  # noqa: B015
    assert mixed.find(b"\x03", 2 * P) == 2 * P  # searching only readable pages works
    assert mixed.rfind(b"\x01", 0, P) == P - 1


@pytest.mark.parametrize(
    "use",
    [
        lambda r: r[0],
        lambda r: r[-1],
        lambda r: r[:],
        lambda r: r[::-3],
        lambda r: b"" in r,
        lambda r: r.find(b"x"),
        lambda r: next(iter(r)),
        lambda r: r.view(0, 1),
    ],
    ids=["item", "last", "slice", "extended", "in", "find", "iter", "view"],
)
@pytest.mark.parametrize("perms", [Perm.NONE, W, X, W | X], ids=str)
def test_a_region_without_read_refuses_every_read(use: Any, perms: Perm) -> None:
    with allocator_for(perms).alloc(P) as r:
        with pytest.raises(BufferError, match="not readable"):
            use(r)
        assert r._exports == 0


@pytest.mark.parametrize(
    "use",
    [
        lambda r: r.__setitem__(0, 1),
        lambda r: r.__setitem__(-1, 1),
        lambda r: r.__setitem__(slice(0, 2), b"ab"),
        lambda r: r.__setitem__(slice(None, None, -2), bytes(P // 2)),
    ],
    ids=["item", "last", "slice", "extended"],
)
@pytest.mark.parametrize("perms", [R, R | X], ids=str)
def test_a_region_without_write_refuses_every_write(use: Any, perms: Perm) -> None:
    with allocator_for(perms).alloc(P) as r:
        with pytest.raises(TypeError, match="read-only"):
            use(r)
        assert r[:] == bytes(P)


def test_guard_pages_installed_by_madvise_are_unreadable(alloc: MapAlloc) -> None:
    from mmap_alloc.features import madv_guard_install

    if not madv_guard_install().available:
        pytest.skip("the kernel has no MADV_GUARD_INSTALL (Linux 6.13)")
    with alloc.alloc(3 * P) as region:
        region._madvise(MADV_GUARD_INSTALL, P, P)
        with pytest.raises(BufferError, match=f"not readable at offset {P}"):
            region[P]
        with pytest.raises(TypeError, match=f"offset {P}"):
            region[P] = 1
        with pytest.raises(BufferError):
            region.view(P - 1, 2)
        assert region[0 : 3 * P : 2 * P] == b"\0\0"
        with region.view(2 * P, P) as view:
            view[0] = 5
        assert region[2 * P] == 5


# ---------------------------------------------------------------- the record


def _protections_while_a_collection_reprotects() -> None:
    region = MapAlloc().alloc(3 * P)
    region.protect(R, P, P)
    source, first = inspect.getsourcelines(Region.protections)
    line = first + next(i for i, text in enumerate(source) if "self._runs()" in text)
    fired: list[bool] = []

    def reprotect(phase: str, info: object) -> None:
        caller = sys._getframe(1)
        inside_runs = caller.f_code.co_name == "protections" and caller.f_lineno == line
        if phase == "start" and not fired and inside_runs:
            fired.append(True)
            region.protect(R | W)

    tuples = [(i, i, i, i) for i in range(5000)]  # no free 4-tuples: each new one is GC-allocated
    gc.callbacks.append(reprotect)
    gc.set_threshold(1)
    try:
        runs = region.protections()
    finally:
        gc.set_threshold(700)
        gc.callbacks.remove(reprotect)
    assert len(tuples) == 5000
    assert runs in ([(0, P, R | W), (P, P, R), (2 * P, P, R | W)], [(0, 3 * P, R | W)]), runs
    # 3.12 on collects between bytecodes, not inside a C call: the callback may come after
    assert region.protections() == ([(0, 3 * P, R | W)] if fired else runs)


def test_protections_is_the_record_before_or_after_a_change_a_collection_makes_meanwhile() -> None:
    run_forked(_protections_while_a_collection_reprotects)
