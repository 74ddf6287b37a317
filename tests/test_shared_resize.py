"""SharedRegion: resize, refresh (another process's growth or shrinking),
discard, and signal handlers that resize meanwhile."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import multiprocessing
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Iterator

import pytest

import shared_workers
from mmap_alloc import AllocError, MapAlloc, Perm, Region, SharedRegion, _mman
from mmap_alloc._linux import PAGE_SIZE as P
from support import is_mapped, kernel_runs, open_fds, run_forked

MiB = 1 << 20


# ---------------------------------------------------------------- helpers


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FIXED_NOREPLACE = 0x100000


@contextlib.contextmanager
def blocked_after(region: Region, length: int = P) -> Iterator[None]:
    """A mapping right after the region, so that it cannot grow in place."""
    where = region.address + region.capacity
    got = _libc.mmap(
        where,
        length,
        0,  # PROT_NONE
        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
        -1,
        0,
    )
    if got != where:
        if got not in (None, ctypes.c_void_p(-1).value):
            _libc.munmap(got, length)
        assert is_mapped(where, where + P), "the pages after the region are free, yet not mapped"
        yield
        return
    try:
        yield
    finally:
        _libc.munmap(where, length)


def spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


# ---------------------------------------------------------------- resize, refresh


def test_resize_grows_keeping_the_bytes_and_new_bytes_read_as_zero() -> None:
    with SharedRegion.create(100) as region:
        region[:] = b"\1" * 100
        region.resize(3 * P + 5)
        assert (region.size, region.capacity, region.file_size) == (3 * P + 5, 4 * P, 3 * P + 5)
        assert region[:100] == b"\1" * 100
        assert region[100:] == bytes(3 * P + 5 - 100)
        assert region.backed_bytes == 4 * P


def test_bytes_written_past_the_end_of_the_file_read_as_zero_after_growth() -> None:
    with SharedRegion.create(100) as region:
        ctypes.memset(region.address + 100, 0xEE, P - 100)  # past size, in the last page
        region.resize(P)
        assert region[100:] == bytes(P - 100)


def test_growth_is_seen_by_another_region_after_refresh() -> None:
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd) as peer:
        region.resize(8 * P)
        region[8 * P - 1] = 3
        assert peer.size == P
        assert peer.file_size == 8 * P
        assert peer.refresh() == 8 * P
        assert (peer.size, peer.capacity) == (8 * P, 8 * P)
        assert peer[8 * P - 1] == 3


def test_growth_by_a_spawned_process_is_seen_after_refresh() -> None:
    with SharedRegion.create(P) as region:
        child = spawn().Process(target=shared_workers.grow, args=(region, 5 * MiB))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert region.size == P
        assert region.refresh() == 5 * MiB
        assert region[5 * MiB - 1] == 7


def test_resize_moves_the_region_when_it_cannot_grow_in_place() -> None:
    with SharedRegion.create(P) as region:
        region[:4] = b"move"
        before = region.address
        with blocked_after(region):
            region.resize(4 * P)
        assert region.address != before
        assert region[:4] == b"move"
        assert region.capacity == 4 * P


def room_after(size: int) -> SharedRegion:
    """A region of ``size`` bytes with free pages after it (mappings are made
    top down, so the pages after a new one are usually taken): made larger,
    then shrunk."""
    region = SharedRegion.create(64 * P, seal_shrink=False)
    region.resize(size)
    return region


def test_resize_with_an_export_grows_in_place_or_changes_nothing() -> None:
    with room_after(P) as region:
        address = region.address
        with memoryview(region) as view:
            with blocked_after(region):
                with pytest.raises(BufferError, match="keep it where it is"):
                    region.resize(4 * P)
                assert (region.size, region.capacity, region.address) == (P, P, address)
                assert region.file_size == P
            region.resize(4 * P)  # the next pages are free again: in place
            assert region.address == address
            view[0] = 1
        assert region[0] == 1


def test_resize_keeps_mixed_protections_in_place_and_when_moving() -> None:
    with SharedRegion.create(2 * P) as region:
        region.protect(Perm.READ, 0, P)
        region.resize(3 * P)
        expected = [(0, P, Perm.READ), (P, 2 * P, Perm.READ | Perm.WRITE)]
        assert region.protections() == kernel_runs(region) == expected
        with blocked_after(region):
            region.resize(5 * P)
        expected = [(0, P, Perm.READ), (P, 4 * P, Perm.READ | Perm.WRITE)]
        assert region.protections() == kernel_runs(region) == expected


def test_shrinking_a_sealed_region_is_a_permission_error_changing_nothing() -> None:
    with SharedRegion.create(2 * P) as region:
        with pytest.raises(PermissionError, match="sealed against shrinking"):
            region.resize(P)
        assert (region.size, region.capacity, region.file_size) == (2 * P, 2 * P, 2 * P)


def test_shrinking_an_unsealed_region_truncates_the_file() -> None:
    with (
        SharedRegion.create(4 * P, seal_shrink=False) as region,
        SharedRegion.from_fd(region.fd, require_seal=False) as peer,
    ):
        region[:3] = b"abc"
        region.resize(P + 1)
        assert (region.size, region.capacity, region.file_size) == (P + 1, 2 * P, P + 1)
        assert region[:3] == b"abc"
        assert peer.refresh() == P + 1
        assert peer.capacity == 2 * P


def test_shrinking_the_file_takes_its_lost_pages_from_every_region_of_this_process() -> None:
    with (
        SharedRegion.create(4 * P, seal_shrink=False) as region,
        SharedRegion.from_fd(region.fd, require_seal=False) as peer,
    ):
        region.resize(P)
        assert (peer.size, peer.capacity) == (P, P)
        assert kernel_runs(peer) == [(0, P, Perm.READ | Perm.WRITE)]
        assert peer[:] == bytes(P)  # every byte it still has is there: no SIGBUS


def test_a_buffer_of_another_region_keeps_the_file_from_shrinking() -> None:
    with (
        SharedRegion.create(4 * P, seal_shrink=False) as region,
        SharedRegion.from_fd(region.fd, require_seal=False) as peer,
    ):
        with memoryview(peer), pytest.raises(BufferError, match="another region of this process"):
            region.resize(P)
        assert (region.size, region.file_size, peer.capacity) == (4 * P, 4 * P, 4 * P)
        region.resize(2 * P)
        assert peer.capacity == 2 * P


def _cut_while_growing() -> None:
    """One region grows the file (fallocate, outside the GIL) while another
    region of the same file tries to cut it short; in a child, since a cut
    that went through would be SIGBUS at the grower's next touch."""
    with (
        SharedRegion.create(2 * P, seal_shrink=False) as grower,
        SharedRegion.from_fd(grower.fd, require_seal=False) as other,
    ):
        refused: BufferError | None = None
        for size in (256 * MiB, 1024 * MiB):  # long enough to be seen in progress
            thread = threading.Thread(target=grower.resize, args=(size,))
            thread.start()
            while thread.is_alive() and refused is None:
                if grower._busy:
                    try:
                        other.resize(P)
                    except BufferError as error:
                        refused = error
                    else:
                        raise AssertionError("the file was cut short under a growth")
            thread.join()
            if refused is not None:
                break
            grower.resize(2 * P)
        else:
            return  # never seen in progress (a fast fallocate): nothing to check
        assert "another region of this process" in str(refused)
        assert grower.size == size == grower.file_size
        grower[size - 1] = 1  # the last page is backed


def test_a_region_growing_its_file_keeps_another_region_from_cutting_it_short() -> None:
    run_forked(_cut_while_growing)


def test_shrinking_with_an_export_is_a_buffer_error() -> None:
    with SharedRegion.create(4 * P, seal_shrink=False) as region:
        with memoryview(region), pytest.raises(BufferError):
            region.resize(P)
        assert region.file_size == 4 * P


def test_resize_of_a_bad_size_is_refused() -> None:
    with SharedRegion.create(P) as region:
        with pytest.raises(ValueError, match="new_size must be positive"):
            region.resize(0)
        with pytest.raises(TypeError, match="new_size must be an integer"):
            region.resize(1.5)  # type: ignore[arg-type]
        with pytest.raises(AllocError, match="available"):
            region.resize(1 << 40)
        assert region.size == P


def _fsize_limited_growth(export: bool) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    region = room_after(P)  # with an export, growth must be in place
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * P, resource.RLIM_INFINITY))
    before = (region.address, region.size, region.capacity, region.file_size)
    view = memoryview(region) if export else None
    try:
        region.resize(32 * P)
    except AllocError as exc:
        assert "RLIMIT_FSIZE" in str(exc), exc
    else:
        raise AssertionError("grew past RLIMIT_FSIZE")
    assert (region.address, region.size, region.capacity, region.file_size) == before
    assert not is_mapped(region.address + P, region.address + 32 * P)  # nothing reserved is left
    if view is not None:
        view.release()
    fds = open_fds()
    try:
        SharedRegion.create(32 * P)
    except AllocError:
        pass
    else:
        raise AssertionError("created past RLIMIT_FSIZE")
    assert open_fds() == fds
    region.close()


def test_a_growth_the_kernel_refuses_is_an_alloc_error_changing_nothing() -> None:
    run_forked(_fsize_limited_growth, False)


def test_a_refused_growth_with_an_export_gives_back_the_pages_it_reserved() -> None:
    run_forked(_fsize_limited_growth, True)


def test_region_realloc_commit_and_uncommit_do_not_apply_to_shared_regions() -> None:
    alloc = MapAlloc()
    with SharedRegion.create(P) as region:
        with pytest.raises(ValueError):
            alloc.realloc(region, 2 * P)
        with pytest.raises(ValueError):
            alloc.uncommit(region)
        with pytest.raises(ValueError, match="resized with resize"):
            region._resize(2 * P, 0)
        with pytest.raises(ValueError):
            alloc.dealloc(region)
        assert not region.closed


def test_advise_dontneed_keeps_the_bytes_in_the_file() -> None:
    with SharedRegion.create(4 * P) as region:
        region[:] = b"\7" * (4 * P)
        region.advise("dontneed")
        assert region[:] == b"\7" * (4 * P)


def test_discard_gives_the_pages_back_and_they_read_as_zero_everywhere() -> None:
    with SharedRegion.create(8 * P) as region, SharedRegion.from_fd(region.fd) as peer:
        region[:] = b"\5" * (8 * P)
        region.discard(2 * P, 4 * P)
        assert region.backed_bytes == 4 * P
        assert peer[2 * P : 6 * P] == bytes(4 * P)
        assert peer[: 2 * P] == region[6 * P :] == b"\5" * (2 * P)
        region[3 * P] = 1  # backed again on demand
        assert peer[3 * P] == 1


def test_refresh_maps_the_growth_of_a_file_sealed_against_writing() -> None:
    with SharedRegion.create(P) as region:
        region.seal(write=True)
        os.ftruncate(region.fd, 3 * P)  # the write seal does not stop growth
        with blocked_after(region):
            assert region.refresh() == 3 * P
        assert region.protections() == kernel_runs(region) == [(0, 3 * P, Perm.READ)]
        assert region[:] == bytes(3 * P)


# ---------------------------------------------------------------- re-entrancy


def _signals_during_resizes() -> None:
    rng = random.Random(20240614)
    start_bytes = _mman.mapped_bytes()
    holder = [SharedRegion.create(P, seal_shrink=False)]
    views: list[memoryview] = []

    def sizes() -> int:
        return rng.choice([1, P - 1, P, 3 * P + 7, 64 * P, MiB + 1, 3 * MiB])

    def handler(signum: int, frame: object) -> None:
        region = holder[0]
        choice = rng.random()
        try:
            if choice < 0.1:
                region.close()
            elif choice < 0.2 and not region.closed:
                views.append(memoryview(region))
            elif choice < 0.3:
                for view in views:
                    view.release()
                views.clear()
            else:
                region.resize(sizes())
        except (ValueError, BufferError, PermissionError):
            pass

    signal.signal(signal.SIGALRM, handler)
    deadline = time.monotonic() + 3
    rounds = 0
    try:
        while time.monotonic() < deadline:
            rounds += 1
            if holder[0].closed:
                for view in views:
                    view.release()
                views.clear()
                holder[0] = SharedRegion.create(rng.choice([P, MiB]), seal_shrink=False)
            signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-5, 2e-3))
            region = holder[0]
            with contextlib.suppress(ValueError, BufferError, PermissionError):
                region.resize(sizes())
            signal.setitimer(signal.ITIMER_REAL, 0)
            if not region.closed:
                assert region.size <= region.capacity
                assert region.file_size == region.size
                assert region.protections() == kernel_runs(region)
                region[region.size - 1] = 1
                assert region[region.size - 1] == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    for view in views:
        view.release()
    holder[0].close()
    del region
    gc.collect()
    assert _mman.mapped_bytes() == start_bytes, (_mman.mapped_bytes(), start_bytes)
    assert rounds > 50


def test_a_signal_handler_resizing_or_closing_during_a_resize_cannot_crash() -> None:
    run_forked(_signals_during_resizes)
