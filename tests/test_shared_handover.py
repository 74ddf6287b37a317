"""SharedRegion's hand-over: send and receive, multiprocessing, from_fd,
read-only regions; what a receiver accepts (require_seal, the size a machine
can back), what multiprocessing requires, and the errors that name the real
cause."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest

import shared_workers
from mmap_alloc import AllocError, Perm, SharedRegion, _fdshare, _mman
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mapping_count, memory_ceiling
from support import HUGETLB, kernel_runs, open_fds, run_forked, skip_if_emulated

TiB = 1 << 40
F_SEAL_FUTURE_WRITE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)


# ---------------------------------------------------------------- helpers


def memfd(size: int = P, seals: int = fcntl.F_SEAL_SHRINK, flags: int = 0) -> int:
    """A memfd of ``size`` bytes (sparse: ftruncate only) with ``seals``."""
    fd = os.memfd_create("peer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def tmpfile(size: int = P) -> int:
    """An O_TMPFILE file of /dev/shm: no name, but no seals either (F_SEAL_SEAL)."""
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


def unlinked_shm(size: int = P) -> int:
    """A file of /dev/shm that was unlinked once opened (F_SEAL_SEAL too)."""
    path = Path("/dev/shm") / f"mmap_alloc_test_{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    path.unlink()
    os.ftruncate(fd, size)
    return fd


def send_raw(sock: socket.socket, fds: list[int], size: int = P, flags: int = 0) -> None:
    """What SharedRegion.send() sends, for any descriptor: a peer may send anything."""
    socket.send_fds(sock, [struct.pack("=8sQQ", b"mmapshr1", size, flags)], fds)


def spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Descriptors a test opens, closed after it; and none may be left open."""
    opened: list[int] = []
    before = open_fds()
    yield opened
    for fd in opened:
        os.close(fd)
    assert open_fds() == before


def hugetlb_memfd(seals: int) -> int:
    """A hugetlb memfd of one 2 MiB page (no page taken: nothing maps it yet)."""
    skip_if_emulated(HUGETLB)
    try:
        return memfd(2 << 20, seals, os.MFD_HUGETLB)
    except OSError as exc:
        pytest.skip(f"no hugetlb memfd here: {exc}")


# ---------------------------------------------------------------- sending and receiving


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


@pytest.mark.parametrize("size", [2**63, 2**64 - 1])
def test_receive_of_a_size_no_region_can_have_names_it_and_closes_the_descriptor(
    pair: tuple[socket.socket, socket.socket], fds: list[int], size: int
) -> None:
    fds.append(fd := memfd())
    before = open_fds()
    send_raw(pair[0], [fd], size=size)
    with pytest.raises(ValueError, match=rf"the peer sent a size of {size} bytes"):
        SharedRegion.receive(pair[1])
    assert open_fds() == before


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


# ---------------------------------------------------------------- require_seal


def test_from_fd_refuses_a_memfd_not_sealed_against_shrinking(fds: list[int]) -> None:
    fds.append(fd := memfd(seals=0))
    mapped = _mman.mapped_bytes()
    with pytest.raises(ValueError, match=rf"fd {fd} is refused: .*F_SEAL_SHRINK") as caught:
        SharedRegion.from_fd(fd)
    message = str(caught.value)
    assert "SIGBUS" in message
    assert "seal(shrink=True)" in message  # what the sender does
    assert "require_seal=False" in message  # what the receiver may do
    assert _mman.mapped_bytes() == mapped


def test_receive_refuses_an_unsealed_memfd_and_closes_it(
    pair: tuple[socket.socket, socket.socket], fds: list[int]
) -> None:
    fds.append(fd := memfd(seals=0))
    before = open_fds()
    send_raw(pair[0], [fd])
    with pytest.raises(ValueError, match=r"the descriptor received is refused: .*F_SEAL_SHRINK"):
        SharedRegion.receive(pair[1])
    assert open_fds() == before


@pytest.mark.parametrize("make", [tmpfile, unlinked_shm], ids=["O_TMPFILE", "unlinked /dev/shm"])
def test_a_file_that_can_never_be_sealed_is_refused_saying_so(
    make: Callable[[], int], fds: list[int]
) -> None:
    fds.append(fd := make())
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == fcntl.F_SEAL_SEAL
    with pytest.raises(ValueError, match=r"F_SEAL_SHRINK\), and it can never be") as caught:
        SharedRegion.from_fd(fd)
    assert "O_TMPFILE" in str(caught.value)
    assert "MFD_ALLOW_SEALING" in str(caught.value)


@pytest.mark.parametrize("make", [tmpfile, unlinked_shm], ids=["O_TMPFILE", "unlinked /dev/shm"])
def test_receive_refuses_a_file_that_can_never_be_sealed(
    make: Callable[[], int], pair: tuple[socket.socket, socket.socket], fds: list[int]
) -> None:
    fds.append(fd := make())
    send_raw(pair[0], [fd])
    with pytest.raises(ValueError, match="it can never be"):
        SharedRegion.receive(pair[1])


def test_require_seal_false_maps_an_unsealed_memfd_or_tmpfile(
    pair: tuple[socket.socket, socket.socket], fds: list[int]
) -> None:
    fds.extend((unsealed := memfd(seals=0), tmp := tmpfile()))
    with SharedRegion.from_fd(unsealed, require_seal=False) as region:
        region[:2] = b"ok"
        assert os.pread(unsealed, 2, 0) == b"ok"
        assert region.seals == frozenset()
    send_raw(pair[0], [tmp])
    with SharedRegion.receive(pair[1], require_seal=False) as region:
        assert region.seals == frozenset({"seal"})
        assert region[:2] == b"\0\0"


def test_the_peers_word_does_not_count_only_the_seals_do(
    pair: tuple[socket.socket, socket.socket], fds: list[int]
) -> None:
    fds.append(fd := memfd(seals=0))
    send_raw(pair[0], [fd], flags=0xFF)  # every flag bit the message has, and more
    with pytest.raises(ValueError, match="F_SEAL_SHRINK"):
        SharedRegion.receive(pair[1])


def _truncated_under_a_region_mapped_without_the_seal() -> None:
    fd = memfd(4 * P, seals=0)
    region = SharedRegion.from_fd(fd, require_seal=False)
    region[4 * P - 1] = 9
    os.ftruncate(fd, P)  # a peer cuts the file short
    view = memoryview(region)
    assert view[4 * P - 1] == 0  # the lost page reads as zero (the SIGBUS repair)


def test_require_seal_false_survives_a_peers_truncation() -> None:
    run_forked(_truncated_under_a_region_mapped_without_the_seal, timeout=30)


def test_a_hugetlb_memfd_without_a_write_seal_is_refused_naming_the_hole_risk(
    fds: list[int],
) -> None:
    fds.append(fd := hugetlb_memfd(fcntl.F_SEAL_SHRINK))
    with pytest.raises(ValueError, match=r"F_SEAL_WRITE or F_SEAL_FUTURE_WRITE.*hugetlb") as caught:
        SharedRegion.from_fd(fd)
    assert "punch a hole" in str(caught.value)
    assert "hugetlb pool is empty" in str(caught.value)


@pytest.mark.parametrize("write_seal", [fcntl.F_SEAL_WRITE, F_SEAL_FUTURE_WRITE])
def test_a_hugetlb_memfd_sealed_against_writing_passes_the_seal_check(
    write_seal: int, fds: list[int]
) -> None:
    fds.append(fd := hugetlb_memfd(fcntl.F_SEAL_SHRINK | write_seal))
    # past the seal check: mapped (pages reserved) or refused for want of pages
    try:
        SharedRegion.from_fd(fd, readonly=True).close()
    except AllocError as exc:
        assert "F_SEAL" not in str(exc)


# ---------------------------------------------------------------- multiprocessing


def test_a_sealed_region_travels_through_multiprocessing_sealed() -> None:
    with SharedRegion.create(P) as region, pickle.loads(ForkingPickler.dumps(region)) as peer:
        assert peer.seals == frozenset({"shrink"})


def test_an_unsealed_region_travels_through_multiprocessing_as_the_sender_holds_it() -> None:
    with SharedRegion.create(P, seal_shrink=False) as region:
        region[:4] = b"mine"
        with pickle.loads(ForkingPickler.dumps(region)) as peer:
            assert peer.seals == frozenset()
            assert peer[:4] == b"mine"


def test_multiprocessing_requires_the_seals_the_sender_had(fds: list[int]) -> None:
    from mmap_alloc import shared

    class Owner:
        pass

    fds.append(fd := memfd(seals=0))
    owner = Owner()  # the sender holds an unsealed file, its pickle says it was sealed
    handle = _fdshare.share(owner, fd, readonly=False, dup=lambda _owner: os.dup(fd))
    with pytest.raises(ValueError, match="handed over by multiprocessing is refused"):
        shared._rebuild(handle, P, 0)


# ---------------------------------------------------------------- the size a machine can back


def test_a_memfd_larger_than_memory_and_swap_is_an_alloc_error_up_front(fds: list[int]) -> None:
    fds.append(fd := memfd(64 * TiB))
    mapped = _mman.mapped_bytes()
    with pytest.raises(AllocError, match=r"more than this machine could ever back") as caught:
        SharedRegion.from_fd(fd)
    assert caught.value.errno == errno.ENOMEM
    assert str(64 * TiB) in str(caught.value)
    assert str(memory_ceiling()) in str(caught.value)
    assert _mman.mapped_bytes() == mapped


def test_receive_of_a_memfd_larger_than_memory_and_swap_closes_it(
    pair: tuple[socket.socket, socket.socket], fds: list[int]
) -> None:
    fds.append(fd := memfd(64 * TiB))
    before = open_fds()
    send_raw(pair[0], [fd], size=64 * TiB)
    with pytest.raises(AllocError, match="could ever back"):
        SharedRegion.receive(pair[1])
    assert open_fds() == before


def test_a_file_is_refused_from_one_byte_past_memory_and_swap() -> None:
    # create() compares with what is available now (it backs every page),
    # a file made elsewhere with what the machine could ever back
    from mmap_alloc import _memfd

    with pytest.raises(AllocError, match="could ever back"):
        _memfd.check_memory(memory_ceiling() + 1, "test", backed_now=False)
    _memfd.check_memory(memory_ceiling(), "test", backed_now=False)


def test_a_sparse_memfd_the_machine_could_back_is_accepted(fds: list[int]) -> None:
    fds.append(fd := memfd(1 << 30))
    with SharedRegion.from_fd(fd) as region:
        assert region.size == 1 << 30
        assert region.backed_bytes == 0


def test_refresh_of_a_file_grown_past_memory_and_swap_changes_nothing() -> None:
    with SharedRegion.create(P) as region:
        region[:2] = b"ok"
        os.ftruncate(region.fd, 64 * TiB)  # as a peer may
        with pytest.raises(AllocError, match="could ever back"):
            region.refresh()
        assert (region.size, region.capacity) == (P, P)
        assert region[:2] == b"ok"


# ---------------------------------------------------------------- errors that name the cause


def test_receive_of_a_non_memfd_names_what_came_not_a_descriptor_number(
    pair: tuple[socket.socket, socket.socket], fds: list[int]
) -> None:
    read, write = os.pipe()
    fds.extend((read, write))
    before = open_fds()
    send_raw(pair[0], [read])
    with pytest.raises(ValueError, match=r"^the descriptor received is not a memfd \(it is pipe:"):
        SharedRegion.receive(pair[1])
    assert open_fds() == before


def test_from_fd_of_a_number_no_descriptor_can_have_is_ebadf() -> None:
    for fd in (1 << 31, 1 << 63, 1 << 100):
        with pytest.raises(OSError, match=f"fd {fd} is not an open file descriptor") as caught:
            SharedRegion.from_fd(fd)
        assert caught.value.errno == errno.EBADF


def test_sealing_a_read_only_region_names_the_read_only_descriptor() -> None:
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd, readonly=True) as ro:
        for seals in ({"write": True}, {"grow": True}, {"seal": True}):
            with pytest.raises(PermissionError, match="descriptor is open read-only") as caught:
                ro.seal(**seals)
            assert "sealed against sealing" not in str(caught.value)
        ro.seal(shrink=True)  # nothing to add: nothing asked of the kernel
        assert region.seals == frozenset({"shrink"})


def test_discard_of_a_read_only_region_is_a_permission_error_naming_it() -> None:
    with SharedRegion.create(P) as region, SharedRegion.from_fd(region.fd, readonly=True) as ro:
        region[0] = 1
        with pytest.raises(PermissionError, match="descriptor is open read-only") as caught:
            ro.discard()
        assert caught.value.errno == errno.EACCES
        assert region[0] == 1


def test_discard_of_a_region_sealed_against_writing_says_so() -> None:
    with SharedRegion.create(P) as region:
        region.seal(write=True)
        with pytest.raises(PermissionError, match="sealed against writing"):
            region.discard()


def _send_to_a_peer_that_hung_up() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as many command-line programs have it
    a, b = socket.socketpair()
    b.close()
    with SharedRegion.create(P) as region:
        try:
            region.send(a)
        except BrokenPipeError:
            return
    raise AssertionError("send() to a closed peer did not fail")


def test_send_to_a_peer_that_hung_up_is_a_broken_pipe_even_with_sigpipe_at_its_default() -> None:
    run_forked(_send_to_a_peer_that_hung_up, timeout=30)


def test_receive_of_nothing_within_the_sockets_timeout_is_a_timeout_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pair[1].settimeout(0.2)
    with pytest.raises(TimeoutError, match=r"no region came .* \(0.2 s\): the peer sent nothing"):
        SharedRegion.receive(pair[1])
