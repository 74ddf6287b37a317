"""Races that the concurrency harness (test_reliability_concurrency.py) found,
each narrowed to a deterministic reproducer: one thread inside a library call
that released the GIL, another changing the same memory meanwhile.

Until a bug's fix is in, its reproducer is an expected failure (strict: it
must fail, so the marker goes when the fix lands); a fixed one stays as a
regression test. A crash of the harness is a failure whatever is known
(an unfixed bug is no excuse for it: the harness would hide a second one).
Each runs in a forked child: the bug is a crash.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

import pytest

from mmap_alloc import MapAlloc, MapAllocError, Perm, SharedRegion
from mmap_alloc._linux import PAGE_SIZE
from support import page_perms, read_maps, run_forked

PAGE = PAGE_SIZE
MIB = 1 << 20
R = Perm.READ


def realloc_moving_by_copy_racing_a_shrink() -> None:
    """One thread reallocs a region of two kernel mappings into a larger one
    (moved by copy, the old 64 MiB unmapped without the GIL); another thread,
    as soon as it sees the region moved but its size not yet set, shrinks it.
    Then every page of the capacity must be mapped as the record says."""
    sys.setswitchinterval(1e-4)
    alloc = MapAlloc()
    old, new = 64 * MIB, 128 * MIB
    region = alloc.alloc(old)
    alloc.commit(region)  # populated: unmapping it takes milliseconds
    region.protect(R, 0, PAGE)  # two kernel mappings: mremap cannot move it
    end = region.address + region.capacity
    blocker = None
    with contextlib.suppress(MapAllocError):  # else taken already
        blocker = alloc.alloc(PAGE, near=end, within=PAGE)  # no growth in place
    address = region.address
    done = threading.Event()

    def shrink() -> None:
        while not done.is_set():
            if region.address != address and region.size == old:  # moved, not finished
                alloc.realloc(region, PAGE)
                return

    shrinker = threading.Thread(target=shrink)
    shrinker.start()
    alloc.realloc(region, new)
    done.set()
    shrinker.join()
    assert region.size <= region.capacity, (region.size, region.capacity)
    recorded = [perms for _, length, perms in region.protections() for _ in range(length // PAGE)]
    kernel = page_perms(read_maps(), region.address, region.capacity, PAGE)
    assert kernel == recorded, ("record and kernel differ", kernel.count(None), "pages unmapped")
    with memoryview(region) as view:
        view[-1]  # SIGSEGV when the size lies
        view[old // 2]  # SIGSEGV in a hole
    region.close()
    if blocker is not None:
        blocker.close()


def grow_racing_a_shrink_through_another_region(attempts: int) -> None:
    """Region a grows its file by 128 MiB (fallocate without the GIL); a
    thread holding the GIL watches the file and, once it has grown but a has
    not mapped it yet, cuts it to 64 MiB through region b of the same file.
    An attempt counts when the cut was tried inside that window (a still
    unmapped right after it): the GIL may pass to a between the look and
    the cut, and a cut after a mapped its growth is a legitimate one."""
    libc = ctypes.PyDLL(None)  # its calls keep the GIL: the watcher sees the window
    libc.lseek.restype = ctypes.c_long
    libc.lseek.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_int]
    sys.setswitchinterval(1e-3)
    big, cut = 128 * MIB, 64 * MIB
    for _ in range(attempts):
        a = SharedRegion.create(PAGE, seal_shrink=False)
        b = SharedRegion.from_fd(a.fd, require_seal=False)
        inside: list[bool] = []
        done = threading.Event()

        def shrink(
            a: SharedRegion = a,
            b: SharedRegion = b,
            inside: list[bool] = inside,
            done: threading.Event = done,
        ) -> None:
            while not done.is_set():
                if libc.lseek(b.fd, 0, os.SEEK_END) == big and a.size == PAGE:
                    with contextlib.suppress(BufferError):  # refused: a is busy growing
                        b.resize(cut)
                    if a.capacity == PAGE:  # a had not mapped its growth yet
                        inside.append(True)
                    return

        shrinker = threading.Thread(target=shrink)
        shrinker.start()
        a.resize(big)
        done.set()
        shrinker.join()
        assert a.size <= a.file_size, ("a maps past the end of its file", a.size, a.file_size)
        a[a.size - 1]  # SIGBUS when it does
        a.close()
        b.close()
        if inside:
            return
    raise AssertionError(f"window not observed in {attempts} attempts")


def test_a_shrink_while_a_realloc_unmaps_the_old_pages_keeps_size_within_capacity() -> None:
    """A realloc that moved by copy pointed the mapping at the new pages and
    unmapped the old ones without the GIL before it committed the new
    capacity, not busy: a shrink in between cut the new mapping, and an
    export then reached a hole (SIGSEGV). Fixed in resize.c: the move commits
    the new capacity first and stays busy while it unmaps."""
    run_forked(realloc_moving_by_copy_racing_a_shrink, timeout=120)


def test_a_file_cut_while_another_region_grows_it_is_never_mapped_past_its_end() -> None:
    """Found by the harness as SIGBUS (issue 24 item 3): the grower mapped past a
    file that another region of it cut while the grower's fallocate ran. Fixed
    in the core: a busy peer refuses the cut, and the grower reads the file's
    size again after fallocate."""
    try:
        run_forked(grow_racing_a_shrink_through_another_region, 20, timeout=300)
    except AssertionError as exc:
        if "window not observed" in str(exc):
            pytest.skip("the thread never saw the file grown and not yet mapped (busy machine)")
        raise


def closing_a_large_secret_from_several_threads() -> None:
    """The wipe of a large secret runs without the GIL; other threads closing
    the same buffer meanwhile must find it closed, not wipe and unmap it
    again (before the fix: a second unmap of pages that could be another
    mapping's by then)."""
    from mmap_alloc import SecretBuffer, _mman

    for _ in range(20):
        before = _mman.mapped_bytes()
        buf = SecretBuffer(64 * MIB, lock="off", backend="anonymous")
        threads = [threading.Thread(target=buf.close) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert buf.closed
        assert _mman.mapped_bytes() == before, "unmapped twice, or not at all"


def test_a_secret_closed_by_several_threads_at_once_is_wiped_and_unmapped_once() -> None:
    run_forked(closing_a_large_secret_from_several_threads, timeout=120)
