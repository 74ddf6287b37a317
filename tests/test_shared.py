"""SharedRegion: memfd-backed memory shared between processes."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import gc
import mmap
import multiprocessing
import os
import pickle
import random
import resource
import signal
import socket
import stat
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import pytest

import shared_workers
from mmap_alloc import AllocError, MapAlloc, Perm, Region, SharedRegion, _mman
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mapping_count, shmem_thp_mode, thp_size
from mmap_alloc.backings import Backing
from mmap_alloc.features import madv_collapse
from support import HUGETLB, THP, is_mapped, kernel_runs, open_fds, run_forked, skip_if_emulated

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


# ---------------------------------------------------------------- handing over


def test_send_and_receive_map_the_same_pages(pair: tuple[socket.socket, socket.socket]) -> None:
    with SharedRegion.create(10_000) as region:
        region[:5] = b"hello"
        region.send(pair[0])
        with SharedRegion.receive(pair[1]) as peer:
            assert peer.size == 10_000
            assert peer.address != region.address
            assert peer[:5] == b"hello"
            peer[5:10] = b"world"
            assert region[:10] == b"helloworld"
            assert os.fstat(peer.fd).st_ino == os.fstat(region.fd).st_ino


def test_two_spawned_processes_see_each_others_writes() -> None:
    ctx = spawn()
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    with SharedRegion.create(P) as region:
        child = ctx.Process(target=shared_workers.write_then_read, args=(region, ready, go, out))
        child.start()
        try:
            assert ready.wait(60)
            assert region[0:5] == b"child"
            region[5:11] = b"parent"
            go.set()
            assert out.get(timeout=60) == b"parent"
        finally:
            child.join(60)
        assert child.exitcode == 0


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_pool_worker_maps_a_region_passed_as_an_argument(method: str) -> None:
    with SharedRegion.create(3 * P) as region:
        region[:5] = b"pool!"
        with multiprocessing.get_context(method).Pool(1) as pool:
            for _ in range(3):
                assert pool.apply(shared_workers.describe, (region,)) == (
                    3 * P,
                    3 * P,
                    b"pool!",
                    False,
                    True,
                )


def test_a_region_put_on_a_queue_reaches_a_running_process() -> None:
    ctx = spawn()
    inbox, out = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=shared_workers.take_from_queue, args=(inbox, out))
    child.start()
    try:
        with SharedRegion.create(P) as region:
            region[:5] = b"queue"
            inbox.put(region)
            assert out.get(timeout=60) == b"queue"
            child.join(60)
            assert region[5:10] == b"taken"
    finally:
        child.join(60)
    assert child.exitcode == 0


def test_a_thousand_pickles_through_multiprocessing_leave_nothing_behind() -> None:
    from multiprocessing.reduction import ForkingPickler

    with SharedRegion.create(P) as region:
        pickle.loads(ForkingPickler.dumps(region)).close()
        fds, maps = open_fds(), mapping_count()
        for _ in range(1000):
            peer = pickle.loads(ForkingPickler.dumps(region))
            peer[0] = 1
            peer.close()
        # other tests' pools may still be closing their own descriptors meanwhile
        assert open_fds() - fds == set()
        assert mapping_count() <= maps


def test_a_region_pickled_for_a_queue_must_stay_open_until_it_is_received() -> None:
    from multiprocessing.reduction import ForkingPickler

    region = SharedRegion.create(P)
    blob = ForkingPickler.dumps(region)
    region.close()
    with pytest.raises(OSError, match="keep a region open until every process"):
        pickle.loads(blob)


def test_pickling_outside_multiprocessing_is_a_type_error() -> None:
    with SharedRegion.create(P) as region:
        with pytest.raises(TypeError, match="pickled only by multiprocessing"):
            pickle.dumps(region)
        with pytest.raises(TypeError, match="pickled only by multiprocessing"):
            pickle.dumps(region, protocol=5)


def test_from_fd_duplicates_and_the_caller_keeps_its_descriptor() -> None:
    fd = os.memfd_create("mine", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 5000)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with SharedRegion.from_fd(fd) as region:
            assert region.fd != fd
            assert region.size == 5000
            region[:2] = b"ok"
            assert os.pread(fd, 2, 0) == b"ok"
        os.fstat(fd)  # still open
    finally:
        os.close(fd)


def test_from_fd_refuses_files_that_are_not_memfds(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(bytes(P))
    read, write = os.pipe()
    shm = Path("/dev/shm") / f"mmap_alloc_test_{os.getpid()}"
    shm.write_bytes(bytes(P))
    try:
        with open(path, "r+b") as file, socket.socket(socket.AF_UNIX) as sock:
            for fd in (file.fileno(), read, sock.fileno()):
                with pytest.raises(ValueError, match=rf"fd {fd} is not a memfd"):
                    SharedRegion.from_fd(fd)
        with (
            open(shm, "r+b") as file,
            pytest.raises(ValueError, match=r"is not a memfd \(it is /dev/shm/"),
        ):
            SharedRegion.from_fd(file.fileno())
    finally:
        os.close(read)
        os.close(write)
        shm.unlink()


def test_from_fd_of_a_closed_descriptor_is_an_os_error() -> None:
    fd = os.memfd_create("gone")
    os.close(fd)
    with pytest.raises(OSError, match=f"fd {fd} is not an open file descriptor") as caught:
        SharedRegion.from_fd(fd)
    assert caught.value.errno == errno.EBADF


@pytest.mark.parametrize(("fd", "error"), [(-1, ValueError), ("3", TypeError), (3.0, TypeError)])
def test_from_fd_of_a_bad_value_is_refused(fd: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="fd must"):
        SharedRegion.from_fd(fd)  # type: ignore[arg-type]


def test_from_fd_of_an_empty_memfd_is_a_value_error() -> None:
    fd = os.memfd_create("empty")
    try:
        with pytest.raises(ValueError, match="empty"):
            SharedRegion.from_fd(fd)
    finally:
        os.close(fd)


def test_receive_on_a_closed_socket_is_a_value_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[1].close()
    with pytest.raises(ValueError, match="the socket is closed"):
        SharedRegion.receive(pair[1])
    with SharedRegion.create(P) as region, pytest.raises(ValueError, match="socket is closed"):
        region.send(pair[1])


def test_receive_after_the_peer_closed_the_socket_is_an_eof_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[0].close()
    with pytest.raises(EOFError, match="closed the socket"):
        SharedRegion.receive(pair[1])


def test_send_to_a_peer_that_closed_the_socket_is_a_broken_pipe(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[1].close()
    fds = open_fds()
    with SharedRegion.create(P) as region, pytest.raises(BrokenPipeError):
        region.send(pair[0])
    assert open_fds() == fds


def test_receive_of_a_message_without_a_descriptor_is_a_value_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[0].send(b"x" * 24)
    with pytest.raises(ValueError, match=r"not one of SharedRegion\.send"):
        SharedRegion.receive(pair[1])


def test_receive_closes_a_descriptor_that_came_with_a_foreign_message(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    fds = open_fds()
    fd = os.memfd_create("foreign")
    try:
        socket.send_fds(pair[0], [b"y" * 24], [fd])
        with pytest.raises(ValueError, match=r"not one of SharedRegion\.send"):
            SharedRegion.receive(pair[1])
    finally:
        os.close(fd)
    assert open_fds() == fds


def test_send_and_receive_need_unix_sockets() -> None:
    with socket.socket(socket.AF_INET) as sock, pytest.raises(ValueError, match="AF_UNIX"):
        SharedRegion.receive(sock)
    with pytest.raises(TypeError, match=r"sock must be a socket\.socket"):
        SharedRegion.receive(3)  # type: ignore[arg-type]


def test_readonly_maps_read_only_and_protect_cannot_add_write() -> None:
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd, readonly=True) as ro:
        region[:2] = b"hi"
        assert ro.readonly and not region.readonly
        assert ro[:2] == b"hi"
        assert kernel_runs(ro) == [(0, P, Perm.READ)]
        with pytest.raises(TypeError):
            ro[0] = 1
        with pytest.raises(PermissionError, match="mapped read-only"):
            ro.protect(Perm.READ | Perm.WRITE)
        with pytest.raises(PermissionError, match="mapped read-only"):
            ro.make_writable()
        assert kernel_runs(ro) == ro.protections() == [(0, P, Perm.READ)]
        with pytest.raises(PermissionError, match="read-only"):
            ro.resize(2 * P)
        assert ro.size == P


def test_a_read_only_region_sent_arrives_read_only(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd, readonly=True) as ro:
        ro.send(pair[0])
        with SharedRegion.receive(pair[1]) as peer:
            assert peer.readonly
            with pytest.raises(PermissionError):
                peer.protect(Perm.READ | Perm.WRITE)


def test_receive_readonly_maps_read_only(pair: tuple[socket.socket, socket.socket]) -> None:
    with SharedRegion.create(P) as region:
        region.send(pair[0])
        with SharedRegion.receive(pair[1], readonly=True) as peer:
            assert peer.readonly
            assert kernel_runs(peer) == [(0, P, Perm.READ)]


def test_a_read_only_descriptor_needs_readonly_true() -> None:
    with SharedRegion.create(P) as region:
        fd = os.open(f"/proc/self/fd/{region.fd}", os.O_RDONLY)
        try:
            with pytest.raises(PermissionError, match="readonly=True"):
                SharedRegion.from_fd(fd)
            with SharedRegion.from_fd(fd, readonly=True) as ro:
                assert ro.readonly
        finally:
            os.close(fd)


def test_a_pool_worker_gets_a_read_only_region_read_only() -> None:
    with (
        SharedRegion.create(P) as region,
        SharedRegion.from_fd(region.fd, readonly=True) as ro,
        spawn().Pool(1) as pool,
    ):
        assert pool.apply(shared_workers.describe, (ro,))[3] is True


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


def test_refresh_maps_the_growth_of_a_file_sealed_against_writing() -> None:
    with SharedRegion.create(P) as region:
        region.seal(write=True)
        os.ftruncate(region.fd, 3 * P)  # the write seal does not stop growth
        with blocked_after(region):
            assert region.refresh() == 3 * P
        assert region.protections() == kernel_runs(region) == [(0, 3 * P, Perm.READ)]
        assert region[:] == bytes(3 * P)


def test_a_spawned_child_that_gets_a_region_at_start_owns_a_close_on_exec_descriptor() -> None:
    ctx = spawn()
    ready, go, out = ctx.Event(), ctx.Event(), ctx.Queue()
    with SharedRegion.create(P) as region:
        child = ctx.Process(target=shared_workers.write_then_read, args=(region, ready, go, out))
        child.start()
        assert ready.wait(60)
        fds = os.listdir(f"/proc/{child.pid}/fd")
        memfds = [fd for fd in fds if "memfd:" in os.readlink(f"/proc/{child.pid}/fd/{fd}")]
        assert len(memfds) == 1
        flags = Path(f"/proc/{child.pid}/fdinfo/{memfds[0]}").read_text()
        assert int(flags.split("flags:")[1].split()[0], 8) & os.O_CLOEXEC
        go.set()
        out.get(timeout=60)
        child.join(60)


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
