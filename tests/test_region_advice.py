"""Region.advise() and Region.lock(): madvise and mlock over whole pages of a range."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from mmap_alloc import AllocError, MapAlloc, Perm, Region
from mmap_alloc._linux import ADVICE
from mmap_alloc._linux import PAGE_SIZE as P
from region_support import MiB, R
from support import (
    EMULATED,
    FILLS_THE_MAP_COUNT,
    MLOCK,
    SIGSEGV,
    SMALL_ALLOCATIONS_FROM_MALLOC,
    emulated_skip,
    ignored_advice,
    run_in_child,
    skip_if_emulated,
    vm_flags,
)

# ---------------------------------------------------------------- advise()

DISCARDING = ("dontneed", "free", "pageout")


def advice_refused(name: str, exc: OSError) -> None:
    """Skip a test of advice the kernel refuses here, saying why."""
    pytest.skip(f"the kernel refuses {name!r} here: {exc}")


@pytest.mark.parametrize("name", list(ADVICE))
def test_every_advice_name_reaches_the_kernel(alloc: MapAlloc, name: str) -> None:
    populates = name in ("populate_read", "populate_write")
    with MapAlloc().alloc(4 * MiB, 2 * MiB) as region:
        if not populates:
            region[:] = b"\x05" * len(region)
        try:
            region.advise(name)
        except OSError as exc:
            assert exc.errno == errno.EINVAL
            assert repr(name) in str(exc)
            advice_refused(name, exc)
        if name == "dontneed":
            assert region.stats().resident_bytes == 0
            assert region[:P] == bytes(P)
        elif name == "free":
            assert set(region[:P]) <= {0, 5}  # freed lazily: old contents or zeros
        elif populates:  # every page faulted in by the advice alone
            skip_if_emulated(ignored_advice(f"MADV_{name.upper()}"))
            assert region.stats().resident_bytes == region.capacity
        else:
            assert region[:P] == b"\x05" * P and region[-1] == 5
        flag = {
            "random": "rr", "sequential": "sr", "hugepage": "hg", "nohugepage": "nh",
            "dontfork": "dc", "dontdump": "dd", "wipeonfork": "wf",
        }.get(name)  # fmt: skip
        if flag is not None:
            skip_if_emulated(ignored_advice(f"MADV_{name.upper()}"))
            assert flag in vm_flags(region.address)
        undo = {"dontfork": "dofork", "dontdump": "dodump", "wipeonfork": "keeponfork",
                "random": "normal", "sequential": "normal"}.get(name)  # fmt: skip
        if undo is not None:
            region.advise(undo)
            assert flag not in vm_flags(region.address)


def test_advice_applies_to_whole_pages_of_a_range(alloc: MapAlloc) -> None:
    with alloc.alloc(4 * P) as region:
        region[:] = b"\x01" * (4 * P)
        region.advise("dontneed", P, P + 1)  # rounds up to two pages
        assert region[:] == b"\x01" * P + bytes(2 * P) + b"\x01" * P
        region.advise("dontdump", 3 * P)
        skip_if_emulated(ignored_advice("MADV_DONTDUMP"))
        assert "dd" in vm_flags(region.address + 3 * P)
        assert "dd" not in vm_flags(region.address)


@pytest.mark.parametrize("name", ["bogus", "DONTNEED", "", 4, None], ids=repr)
def test_an_unknown_advice_is_a_value_error_listing_the_names(region: Region, name: object) -> None:
    with pytest.raises(ValueError, match="unknown advice") as info:
        region.advise(name)  # type: ignore[arg-type]
    for known in ADVICE:
        assert known in str(info.value)


@pytest.mark.parametrize(
    "args",
    [(1,), (P, 2 * P), (-P,), (2 * P,)],
    ids=["unaligned", "past-end", "negative", "outside"],
)
def test_advice_on_a_bad_range_is_a_value_error(region: Region, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="offset"):
        region.advise("willneed", *args)


@emulated_skip(ignored_advice("MADV_COLLAPSE"))
def test_advice_the_kernel_refuses_is_an_os_error_naming_it_and_its_kernel(
    alloc: MapAlloc,
) -> None:
    region = alloc.alloc(4 * P)  # no whole huge page: MADV_COLLAPSE refuses it
    with (
        region,
        pytest.raises(OSError, match=r"madvise\('collapse'\) failed: .*Linux 6\.1") as info,
    ):
        region.advise("collapse")
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("name", DISCARDING)
def test_discarding_advice_is_refused_on_pinned_code(name: str) -> None:
    code = b"\xc3"  # ret (x86-64); the function is never called
    with MapAlloc(exec=True).alloc(P) as region:
        region[:1] = code
        function = region.function(ctypes.CFUNCTYPE(None))
        with pytest.raises(BufferError, match="pinned code keeps its contents"):
            region.advise(name)
        assert region[:1] == code
        region.advise("willneed")  # advice that keeps contents is fine
        del function
        region.advise(name)


def test_discarding_advice_under_an_exported_buffer_is_allowed_as_uncommit(
    alloc: MapAlloc,
) -> None:
    with alloc.alloc(P) as region:
        region[:] = b"\x01" * P
        with region.view() as view:
            region.advise("dontneed")
            assert bytes(view) == bytes(P)


def test_dontfork_pages_read_as_zeros_through_an_inherited_view(alloc: MapAlloc) -> None:
    with alloc.alloc(3 * P) as region:
        region[:] = b"\x01" * (3 * P)
        region.advise("dontfork", P, P)
        view = region.view()
        array = region.view(P, 8)

        def child() -> None:
            assert view[P : 2 * P] == bytes(P)  # a zero page, not a hole
            assert view[0] == 1 and view[2 * P] == 1
            assert bytes(array) == bytes(8)
            assert region[P] == 0
            view[P] = 9  # writable, as recorded
            assert region[P] == 9

        assert run_in_child(child) == 0
        assert region[P] == 1  # the parent keeps its pages
        view.release()
        array.release()


@emulated_skip(ignored_advice("MADV_DONTFORK"))
def test_a_stdlib_mmap_advised_dontfork_kills_a_child_that_reads_it() -> None:
    stdlib = mmap.mmap(-1, P)
    stdlib.madvise(mmap.MADV_DONTFORK)
    try:
        assert run_in_child(lambda: print(stdlib[0])) == SIGSEGV
    finally:
        stdlib.close()


@emulated_skip(ignored_advice("MADV_WIPEONFORK"))
def test_wipeonfork_pages_read_as_zeros_in_a_child(alloc: MapAlloc) -> None:
    with alloc.alloc(P) as region:
        region[:] = b"\x01" * P
        region.advise("wipeonfork")

        def child() -> None:
            assert region[:] == bytes(P)

        assert run_in_child(child) == 0
        assert region[0] == 1


def test_populate_advice_over_pages_without_the_access_names_the_page(alloc: MapAlloc) -> None:
    with alloc.alloc(2 * P) as region:
        region.protect(R, P, P)
        with pytest.raises(ValueError, match=f"page at offset {P} is not writable"):
            region.advise("populate_write")
        region.advise("populate_write", 0, P)
        region.protect(Perm.NONE, 0, P)
        with pytest.raises(ValueError, match="page at offset 0 is not readable"):
            region.advise("populate_read")


@FILLS_THE_MAP_COUNT
def test_unlock_and_advice_of_part_of_a_region_at_the_map_count_name_it() -> None:
    code = """
        from mmap_alloc import AllocError, MapAlloc
        from mmap_alloc._linux import PAGE_SIZE as page

        alloc = MapAlloc()
        locked = alloc.alloc(3 * page)
        locked.lock()
        plain = alloc.alloc(3 * page)
        fillers = []
        makers = (MapAlloc(write=False), MapAlloc(read=False, write=False))
        try:
            while True:  # alternate protections so that neighbours never merge
                fillers.append(makers[len(fillers) % 2].alloc(page))
        except AllocError:
            pass
        calls = {
            "unlock": lambda: locked.unlock(page, page),
            "dontdump": lambda: plain.advise("dontdump", page, page),
            "dontfork": lambda: plain.advise("dontfork", page, page),
            "hugepage": lambda: plain.advise("hugepage", page, page),
        }
        for name, call in calls.items():
            try:
                call()
            except AllocError as error:
                print(name, "|", error)
            else:
                print(name, "| done")
        """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **SMALL_ALLOCATIONS_FROM_MALLOC},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" | ", 1) for line in result.stdout.splitlines())
    assert set(lines) == {"unlock", "dontdump", "dontfork", "hugepage"}
    for name, message in lines.items():
        assert "vm.max_map_count" in message, (name, message)


@pytest.mark.parametrize("name", ["dontneed", "free", "pageout", "cold"])
def test_advice_refused_on_locked_pages_says_they_are_locked(alloc: MapAlloc, name: str) -> None:
    if name != "dontneed":
        skip_if_emulated(ignored_advice(f"MADV_{name.upper()}"))
    with alloc.alloc(P) as region:
        region[0] = 1
        region.lock()
        with pytest.raises(OSError, match=rf"madvise\('{name}'\) failed: .*lock") as info:
            region.advise(name)
        assert info.value.errno == errno.EINVAL
        assert region[0] == 1
        region.unlock()
        region.advise(name)


# ---------------------------------------------------------------- lock()


def test_lock_and_unlock_take_ranges_of_whole_pages(alloc: MapAlloc) -> None:
    with alloc.alloc(8 * P) as region:
        region.lock(2 * P, P + 1)
        assert region.stats().locked_bytes == 2 * P
        assert "lo" in vm_flags(region.address + 2 * P)
        region.unlock(2 * P, P)
        assert region.stats().locked_bytes == P
        region.unlock()
        assert region.stats().locked_bytes == 0
        region.unlock()  # unlocking unlocked pages does nothing


@pytest.mark.parametrize(
    "args",
    [(1,), (P, 8 * P), (-P,), (9 * P,)],
    ids=["unaligned", "past-end", "negative", "outside"],
)
def test_lock_on_a_bad_range_is_a_value_error(alloc: MapAlloc, args: tuple[Any, ...]) -> None:
    with alloc.alloc(8 * P) as region:
        with pytest.raises(ValueError, match="offset"):
            region.lock(*args)
        with pytest.raises(ValueError, match="offset"):
            region.unlock(*args)


def test_locking_beyond_rlimit_memlock_is_an_alloc_error_giving_the_limit() -> None:
    def child() -> None:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
        os.setgid(65534)
        os.setuid(65534)  # root's CAP_IPC_LOCK would bypass the limit
        with MapAlloc().alloc(MiB) as region:
            for on_fault in (False,) if EMULATED else (False, True):
                with pytest.raises(AllocError, match="RLIMIT_MEMLOCK is 65536 bytes") as info:
                    region.lock(on_fault=on_fault)
                assert info.value.errno in (errno.ENOMEM, errno.EPERM, errno.EAGAIN)
                assert str(MiB) in str(info.value)
            with pytest.raises(AllocError, match=f"cannot lock {32 * P} bytes"):
                region.lock(MiB - 32 * P)
            region.lock(0, 32 * 1024)  # within the limit
            region.unlock()

    assert run_in_child(child) == 0
    skip_if_emulated(MLOCK)  # what was not checked: mlock2(MLOCK_ONFAULT) past the limit
