"""SharedRegion: memfd-backed memory shared between processes: creation,
seals, what is left behind, numpy. The hand-over is in
test_shared_handover.py, resizing in test_shared_resize.py, misbehaving
peers in test_shared_peers.py."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import multiprocessing
import os
import signal
import socket
import stat
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

import shared_workers
from mmap_alloc import AllocError, MapAlloc, Perm, Region, SharedRegion
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mapping_count, shmem_thp_mode, thp_size
from mmap_alloc.backings import Backing
from mmap_alloc.features import madv_collapse
from support import HUGETLB, THP, kernel_runs, open_fds, skip_if_emulated

MiB = 1 << 20
HUGE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
needs_numpy = pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")


# ---------------------------------------------------------------- helpers


def inode_mapped(inode: int) -> bool:
    """Whether any mapping of this process is of the file with this inode."""
    with open("/proc/self/maps") as maps:
        return any(line.split()[4] == str(inode) for line in maps if len(line.split()) > 4)


def inode_open(inode: int) -> bool:
    """Whether any descriptor of this process refers to the file with this inode."""
    for fd in open_fds():
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                return True
    return False


def children() -> set[int]:
    """The pids of this process's children, from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{entry}/stat").read_text()
                if int(text.rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(entry))
    return found


def spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def huge_2m() -> Iterator[int]:
    """Four free 2 MiB hugetlb pages, reserved for the test and given back after."""
    skip_if_emulated(HUGETLB)
    nr = HUGE_2M / "nr_hugepages"
    if os.geteuid() != 0 or not nr.exists():
        pytest.skip("reserving hugetlb pages needs root and 2 MiB huge pages")
    try:
        nr.write_text(str(int(nr.read_text()) + 4))
    except OSError as exc:
        pytest.skip(f"cannot reserve hugetlb pages: {exc}")
    try:
        if int((HUGE_2M / "free_hugepages").read_text()) < 4:
            pytest.skip("the kernel could not reserve 4 free 2 MiB pages")
        yield 2 * MiB
    finally:
        nr.write_text(str(max(0, int(nr.read_text()) - 4)))


# ---------------------------------------------------------------- creation


def test_create_maps_a_zero_filled_read_write_region_of_the_size_asked() -> None:
    with SharedRegion.create(10_000) as region:
        assert len(region) == region.size == 10_000
        assert region.capacity == 3 * P
        assert region.perms == Perm.READ | Perm.WRITE
        assert bytes(region) == bytes(10_000)
        assert kernel_runs(region) == [(0, 3 * P, Perm.READ | Perm.WRITE)]


def test_a_shared_region_is_a_region_with_buffers_views_and_protection() -> None:
    with SharedRegion.create(2 * P) as region:
        assert isinstance(region, Region)
        region[:3] = b"abc"
        with memoryview(region) as view:
            assert view[:3].tobytes() == b"abc"
        with region.view(1, 2) as view:
            assert view.tobytes() == b"bc"
        region.protect(Perm.READ, P, P)
        assert region.protections() == [(0, P, Perm.READ | Perm.WRITE), (P, P, Perm.READ)]
        assert kernel_runs(region) == region.protections()
        stats = region.stats()
        assert stats.backing == Backing.NORMAL
        assert stats.kernel_page_size == P


def test_the_file_is_exactly_the_size_asked_and_every_page_is_backed() -> None:
    with SharedRegion.create(10_000) as region:
        assert region.file_size == os.fstat(region.fd).st_size == 10_000
        assert region.backed_bytes == 3 * P


def test_the_descriptor_is_a_close_on_exec_memfd_named_as_asked() -> None:
    with SharedRegion.create(P, name="tiles") as region:
        assert os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:tiles")
        assert fcntl.fcntl(region.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert stat.S_ISREG(os.fstat(region.fd).st_mode)


def test_nothing_appears_in_dev_shm_and_no_resource_tracker_starts() -> None:
    shm, kids = set(os.listdir("/dev/shm")), children()
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd):
        assert set(os.listdir("/dev/shm")) == shm
    assert children() == kids


def test_sealed_against_shrinking_by_default() -> None:
    with SharedRegion.create(P) as region:
        assert region.seals == frozenset({"shrink"})
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)


def test_seal_shrink_false_leaves_the_file_unsealed() -> None:
    with SharedRegion.create(P, seal_shrink=False) as region:
        assert region.seals == frozenset()


@pytest.mark.parametrize("size", [0, -1, -P])
def test_a_size_that_is_not_positive_is_a_value_error(size: int) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        SharedRegion.create(size)


@pytest.mark.parametrize("size", [1.0, "4096", None, True])
def test_a_size_that_is_not_an_integer_is_a_type_error(size: object) -> None:
    with pytest.raises(TypeError, match="size must be an integer"):
        SharedRegion.create(size)  # type: ignore[arg-type]


def test_create_larger_than_memory_is_an_alloc_error_leaving_nothing_behind() -> None:
    fds, maps = open_fds(), mapping_count()
    with pytest.raises(AllocError, match="available") as caught:
        SharedRegion.create(1 << 40)
    assert caught.value.size == 1 << 40
    assert open_fds() == fds
    assert mapping_count() == maps


def test_a_size_beyond_any_address_space_is_an_alloc_error() -> None:
    with pytest.raises(AllocError):
        SharedRegion.create(1 << 62)


def test_a_wrong_huge_page_size_is_a_value_error_listing_the_sizes() -> None:
    with pytest.raises(ValueError, match=r"huge=12345 is not a huge page size .*supported"):
        SharedRegion.create(P, huge=12345)


@pytest.mark.parametrize("huge", ["huge", "THP", "prefer", ""])
def test_an_unknown_huge_mode_is_a_value_error(huge: str) -> None:
    with pytest.raises(ValueError, match="huge must be None, 'thp', 'hugetlb'"):
        SharedRegion.create(P, huge=huge)


@pytest.mark.parametrize("huge", [True, 2.0, b"thp"])
def test_a_huge_of_the_wrong_type_is_a_type_error(huge: object) -> None:
    with pytest.raises(TypeError, match="huge must be"):
        SharedRegion.create(P, huge=huge)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "error"), [("a\0b", ValueError), ("x" * 250, ValueError), (b"x", TypeError)]
)
def test_a_bad_name_is_refused(name: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="name must"):
        SharedRegion.create(P, name=name)  # type: ignore[arg-type]


def test_a_hugetlb_create_with_an_empty_pool_is_an_alloc_error_saying_how_to_reserve_pages() -> (
    None
):
    if not HUGE_2M.exists():
        pytest.skip("no 2 MiB hugetlb pages on this kernel")
    if int((HUGE_2M / "free_hugepages").read_text()) > 0:
        pytest.skip("the 2 MiB pool is not empty")
    fds = open_fds()
    with pytest.raises(AllocError, match=r"echo N > .*hugepages-2048kB/nr_hugepages"):
        SharedRegion.create(MiB, huge=2 * MiB)
    assert open_fds() == fds


def test_with_reserved_huge_pages_a_hugetlb_region_uses_them(huge_2m: int) -> None:
    with SharedRegion.create(MiB, huge=huge_2m) as region:
        assert region.size == MiB
        assert region.capacity == huge_2m
        assert region.address % huge_2m == 0
        assert region.backing == Backing.HUGETLB
        stats = region.stats()
        assert stats.kernel_page_size == huge_2m
        region[MiB - 1] = 9
        assert stats.backing == Backing.HUGETLB


def test_a_hugetlb_region_grows_by_huge_pages_and_travels_with_its_size(
    huge_2m: int, pair: tuple[socket.socket, socket.socket]
) -> None:
    with SharedRegion.create(MiB, huge="hugetlb") as region:
        region.resize(3 * MiB)
        assert (region.size, region.capacity, region.file_size) == (3 * MiB, 4 * MiB, 4 * MiB)
        region[3 * MiB - 1] = 5
        region.send(pair[0])
        # writable hugetlb: a holder could punch a hole (see test_shared_handover.py)
        with SharedRegion.receive(pair[1], require_seal=False) as peer:
            assert (peer.size, peer.capacity) == (3 * MiB, 4 * MiB)
            assert peer.backing == Backing.HUGETLB
            assert peer.stats().kernel_page_size == huge_2m
            assert peer[3 * MiB - 1] == 5
        with pytest.raises(ValueError, match="hugetlb"):
            region.discard()


def test_a_thp_region_is_aligned_advised_and_says_what_it_got() -> None:
    if shmem_thp_mode() in (None, "deny"):
        with pytest.raises(ValueError, match="shmem_enabled"):
            SharedRegion.create(4 * MiB, huge="thp")
        return
    with SharedRegion.create(4 * MiB, huge="thp") as region:
        assert region.backing == Backing.THP
        assert region.address % thp_size() == 0
        if madv_collapse().available:
            skip_if_emulated(THP)
            assert region.stats().huge_bytes > 0


# ---------------------------------------------------------------- seals


def test_seal_grow_refuses_growth() -> None:
    with SharedRegion.create(P) as region:
        region.seal(grow=True)
        assert region.seals == frozenset({"shrink", "grow"})
        with pytest.raises(PermissionError, match="sealed against growing"):
            region.resize(2 * P)
        assert region.size == P


def test_seal_write_remaps_read_only_and_freezes_the_contents() -> None:
    with SharedRegion.create(P) as region:
        region[:4] = b"done"
        address = region.address
        region.seal(write=True)
        assert region.seals == frozenset({"shrink", "write"})
        assert region.readonly
        assert region.address == address
        assert region.protections() == kernel_runs(region) == [(0, P, Perm.READ)]
        assert region[:4] == b"done"
        with pytest.raises(PermissionError):
            os.pwrite(region.fd, b"x", 0)
        with pytest.raises(PermissionError, match="read-only"):
            region.protect(Perm.READ | Perm.WRITE)
        with pytest.raises(PermissionError):
            SharedRegion.from_fd(region.fd)
        with SharedRegion.from_fd(region.fd, readonly=True) as ro:
            assert ro[:4] == b"done"


def test_seal_write_keeps_read_only_buffers_and_refuses_writable_ones() -> None:
    with SharedRegion.create(2 * P) as region:
        region[:2] = b"ro"
        with memoryview(region), pytest.raises(BufferError, match="writable"):
            region.seal(write=True)
        assert "write" not in region.seals
        region.protect(Perm.READ, 0, P)
        with region.view(0, 2) as view:  # read-only: its page is
            assert view.readonly
            region.seal(write=True)
            assert view.tobytes() == b"ro"
        assert region.protections() == kernel_runs(region) == [(0, 2 * P, Perm.READ)]


def test_seal_write_while_another_mapping_is_writable_changes_nothing() -> None:
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd) as peer:
        with pytest.raises(OSError, match="another mapping of the file is writable") as caught:
            region.seal(write=True)
        assert caught.value.errno == errno.EBUSY
        assert "write" not in region.seals
        assert region.protections() == kernel_runs(region) == [(0, P, Perm.READ | Perm.WRITE)]
        region[0] = 1
        assert peer[0] == 1


def test_seal_seal_forbids_further_seals() -> None:
    with SharedRegion.create(P) as region:
        region.seal(seal=True)
        assert region.seals == frozenset({"shrink", "seal"})
        with pytest.raises(PermissionError, match="sealed against sealing"):
            region.seal(grow=True)


def test_a_receivers_ftruncate_to_shrink_fails_with_eperm() -> None:
    ctx = spawn()
    out = ctx.Queue()
    with SharedRegion.create(4 * P) as region:
        region[:] = b"\3" * (4 * P)
        child = ctx.Process(target=shared_workers.truncate, args=(region, out))
        child.start()
        assert out.get(timeout=60) == errno.EPERM
        child.join(60)
        # no SIGBUS: every byte is still there
        assert region[:] == b"\3" * (4 * P)
        assert region.file_size == 4 * P


def test_without_the_shrink_seal_a_peer_can_truncate_and_refresh_drops_the_pages() -> None:
    with SharedRegion.create(4 * P, seal_shrink=False) as region:
        os.ftruncate(region.fd, P)
        assert region.refresh() == P
        assert region.capacity == P
        assert region[:] == bytes(P)


# ---------------------------------------------------------------- nothing left behind


def test_close_closes_the_descriptor_and_unmaps() -> None:
    region = SharedRegion.create(P)
    inode = os.fstat(region.fd).st_ino
    region.close()
    assert not inode_open(inode)
    assert not inode_mapped(inode)
    with pytest.raises(ValueError, match="region is closed"):
        _ = region.fd
    region.close()  # idempotent


def test_a_collected_region_closes_its_descriptor() -> None:
    region = SharedRegion.create(P)
    inode = os.fstat(region.fd).st_ino
    del region
    gc.collect()
    assert not inode_open(inode)
    assert not inode_mapped(inode)


def test_closing_a_region_with_exports_is_a_buffer_error() -> None:
    with SharedRegion.create(P) as region:
        view = memoryview(region)
        with pytest.raises(BufferError):
            region.close()
        assert not region.closed
        view.release()


def test_a_thousand_create_send_close_cycles_leave_descriptors_and_mappings_as_they_were(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    def cycle() -> None:
        region = SharedRegion.create(P)
        region.send(pair[0])
        peer = SharedRegion.receive(pair[1])
        peer[0] = 1
        peer.close()
        region.close()

    cycle()  # the first one imports what send/receive need
    fds, maps = open_fds(), mapping_count()
    for _ in range(1000):
        cycle()
    assert open_fds() == fds
    assert mapping_count() == maps


def test_a_peer_that_dies_mid_use_leaves_nothing_behind() -> None:
    ctx = spawn()
    ready = ctx.Event()
    shm = set(os.listdir("/dev/shm"))
    region = SharedRegion.create(P)
    inode = os.fstat(region.fd).st_ino
    child = ctx.Process(target=shared_workers.hold, args=(region, ready))
    child.start()
    try:
        assert ready.wait(60)
    finally:
        child.kill()
        child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert region[:4] == b"held"
    region.close()
    assert not inode_open(inode)
    assert not inode_mapped(inode)
    assert set(os.listdir("/dev/shm")) == shm


# ---------------------------------------------------------------- numpy


@needs_numpy
def test_numpy_empty_shared_makes_an_array_on_a_shared_region() -> None:
    import mmap_alloc.numpy as mnp

    array = mnp.zeros((100, 10), shared=True)
    region = mnp.region_of(array)
    assert isinstance(region, SharedRegion)
    assert region.size == 8000
    assert array.sum() == 0
    with pytest.raises(TypeError, match="allocator"):
        mnp.empty(10, alloc=MapAlloc(), shared=True)
    del array, region
    gc.collect()


@needs_numpy
def test_another_process_attaches_a_shared_array() -> None:
    import numpy as np

    import mmap_alloc.numpy as mnp

    array = mnp.empty(100_000, np.float64, shared=True)
    array[:] = np.arange(100_000)
    region = mnp.region_of(array)
    with spawn().Pool(1) as pool:
        assert pool.apply(shared_workers.array_sum, (region, 100_000)) == float(
            np.arange(100_000).sum()
        )
    del array, region
    gc.collect()


def test_repr_names_the_descriptor_and_seals() -> None:
    region = SharedRegion.create(P)
    assert repr(region).startswith(f"<SharedRegion rw- fd={region.fd} address=0x")
    assert repr(region).endswith(f"size={P} capacity={P} seals=shrink>")
    region.close()
    assert repr(region) == f"<SharedRegion closed size={P}>"
