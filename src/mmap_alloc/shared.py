"""Shared memory between processes: memfd-backed regions.

A :class:`SharedRegion` is a :class:`~mmap_alloc.Region` whose pages belong to
an anonymous file (``memfd_create``) mapped ``MAP_SHARED``: every process that
maps the file sees the same bytes. It is handed to another process by its
file descriptor (``send()``/``receive()`` over a Unix socket, or as an
argument of a multiprocessing Process, Pool or Queue), never by a name: there
is nothing in /dev/shm, no resource tracker, and the memory goes back to the
kernel when the last process closes it, whichever way that process ends.

What the C layer (``_mman._shared_*``) does in one call each: create (back
every page with fallocate, then map), attach, resize, refresh, seal, discard.
This module holds the policy: options, argument checks, how pickling passes
the descriptor, and the messages; ``_memfd`` what a file must be to be
mapped at all (a receiver's checks: seals, kind, size), ``_fdshare`` how a
descriptor travels inside a pickle.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
from typing import TYPE_CHECKING, Any, cast

from ._args import integer
from ._args import size as size_argument
from ._fdregion import FdRegion, pickle_handle, register_pickling
from ._fdshare import Fds, SharedFd, recv_fds, send_fds
from ._linux import (
    F_SEAL_NAMES,
    F_SEAL_SEAL,
    MADV_HUGEPAGE,
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_NOEXEC_SEAL,
    PAGE_SIZE,
    memfd_noexec,
    shmem_thp_mode,
    thp_size,
)
from ._memfd import (
    SHMEM_ENABLED,
    attach_error,
    check_memory,
    memfd_name,
    missing_seal,
    pages_for,
    recheck,
    step_error,
    vet,
)
from ._mman import (
    _shared_attach,
    _shared_create,
    _shared_discard,
    _shared_dup,
    _shared_fd,
    _shared_refresh,
    _shared_resize,
    _shared_seal,
)
from .backings import Backing
from .exceptions import CLOSED

if TYPE_CHECKING:
    import socket

__all__ = ["SharedRegion"]


# send()/receive(): one message per region, the descriptor attached to it.
_MESSAGE = struct.Struct("=8sQQ")  # magic, size, flags
_MAGIC = b"mmapshr1"
_FLAG_THP = 1
_FLAG_READONLY = 2
_FLAG_UNGUARDED = 4  # the sender holds it without the seals require_seal asks for


def _reduce(region: SharedRegion) -> tuple[Any, tuple[Any, ...]]:
    """multiprocessing's pickling of a region: its descriptor travels, not its
    bytes (see _fdregion.pickle_handle: the region must stay open until the
    receiver has it).

    The receiver requires the seals the sender's file has (see _rebuild)."""
    fd, flags = region.fd, region._flags()
    if missing_seal(fcntl.fcntl(fd, fcntl.F_GET_SEALS), region._page > PAGE_SIZE) is not None:
        flags |= _FLAG_UNGUARDED
    handle = pickle_handle(region, readonly=bool(flags & _FLAG_READONLY))
    return _rebuild, (handle, region.size, flags)


def _rebuild(dupfd: Any, size: int, flags: int) -> SharedRegion:
    """The receiver's side of multiprocessing: the file must have the seals
    it had in the sender when it has them there (they cannot be taken off:
    only another file could lack them), and is accepted as the sender holds
    it otherwise. A pickle comes from the same program (loading one runs
    whatever it says), which chose the seals where it made or accepted the
    region; a worker that wants the guarantee anyway checks ``region.seals``
    before it touches the region. (Without the shrink seal, the SIGBUS
    repair covers it: a truncation by any holder cannot kill this process.)"""
    from ._arraypickle import received

    with Fds() as held:
        if isinstance(dupfd, SharedFd):
            dupfd.detach_into(held)
        else:  # multiprocessing's DupFd, of a process being started
            held.fds.append(dupfd.detach())
        region = SharedRegion._attach_fd(held, size, flags)
    received(region)
    return region


def _check_socket(sock: object) -> socket.socket:
    import socket

    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise ValueError("the socket is closed")
    if sock.family != socket.AF_UNIX:
        raise ValueError(
            "file descriptors travel only over Unix sockets (AF_UNIX), e.g. socket.socketpair()"
        )
    return sock


class SharedRegion(FdRegion):
    """Memory shared between processes: a memfd mapped ``MAP_SHARED``.

    Made by :meth:`create`, or from a descriptor another process handed over
    (:meth:`receive`, :meth:`from_fd`, multiprocessing). A SharedRegion is a
    Region: buffer protocol, ``view()``, ``ndarray()``, ``protect()``,
    ``stats()``, the export rules (no close while a buffer lives). It owns
    its descriptor (``fd``) and closes it when it closes or is collected.

    Every page is backed when it is made or grown, so running out of memory
    is an :class:`~mmap_alloc.AllocError` of that call, never a SIGBUS at
    first touch. Sealed against shrinking (the default), no process can cut
    the file short under a mapping; a receiver refuses, unless told
    otherwise (``require_seal=False``), a file that any process holding it
    could make fatal to touch. A region of a file without the shrink seal
    is watched by the SIGBUS repair (as file regions are): pages a peer cut
    off read as zeros, and the region's own methods raise FileTruncatedError
    for them until refresh().
    """

    __slots__ = ()

    _elsewhere = "to another program, send() it over a Unix socket"

    # ------------------------------------------------------------ making

    @classmethod
    def create(
        cls,
        size: int,
        *,
        huge: str | int | None = None,
        seal_shrink: bool = True,
        name: str = "mmap_alloc",
    ) -> SharedRegion:
        """A new shared region of ``size`` bytes, read/write, zero-filled.

        ``huge``: None (base pages), ``"thp"`` (advised MADV_HUGEPAGE and
        collapsed to transparent huge pages where the kernel can:
        ``stats().huge_bytes`` says how much), ``"hugetlb"`` (the default
        hugetlb page size) or a hugetlb page size in bytes; an empty pool is an
        AllocError that says how to reserve pages. ``seal_shrink``: seal the
        file against shrinking (F_SEAL_SHRINK), so no process can truncate it
        under a mapping. ``name``: the label /proc shows ("memfd:NAME").

        AllocError, changing nothing, if the memory is not there: more than
        the machine has available is refused before anything is asked of the
        kernel.
        """
        n = size_argument(size, PAGE_SIZE)
        label = memfd_name(name)
        pages = pages_for(huge)
        if pages.hugetlb is None:
            check_memory(n, f"create a shared region of {n} bytes")
        flags = MFD_CLOEXEC | MFD_ALLOW_SEALING | pages.mfd_flags
        seals = F_SEAL_NAMES["shrink"] if seal_shrink else 0
        args = (label, seals, pages.page, pages.align, pages.advice, pages.backing)
        try:
            while True:
                try:
                    region = _shared_create(cls, n, flags, *args)
                    break
                except InterruptedError:
                    continue  # a signal came during fallocate: nothing was left, again
                except OSError as exc:
                    # vm.memfd_noexec = 2 refuses memfds that do not give up exec
                    if exc.filename != "memfd_create" or exc.errno != errno.EINVAL:
                        raise
                    if memfd_noexec() != 2 or flags & MFD_NOEXEC_SEAL:
                        raise
                    flags |= MFD_NOEXEC_SEAL
        except OSError as exc:
            if exc.filename == "madvise" and pages.backing is Backing.THP:
                raise OSError(
                    exc.errno,
                    f"huge='thp': the kernel refused MADV_HUGEPAGE on shared memory "
                    f"({exc.strerror}; shmem_enabled is {shmem_thp_mode()}: {SHMEM_ENABLED})",
                ) from None
            raise step_error(
                exc, n, f"create a shared region of {n} bytes", pages.hugetlb
            ) from None
        register_pickling(SharedRegion, _reduce)
        return cast(SharedRegion, region)

    @classmethod
    def from_fd(cls, fd: int, *, readonly: bool = False, require_seal: bool = True) -> SharedRegion:
        """Map the memfd behind ``fd``: the region works on a duplicate, the
        caller keeps ``fd`` (and closes it when done).

        ``readonly``: map it read-only through a read-only open of the file,
        so that the kernel refuses write access (protect() cannot add WRITE).
        ``require_seal``: refuse (ValueError naming the seal) a file that any
        process holding it could make fatal to touch: one not sealed against
        shrinking (F_SEAL_SHRINK), and a hugetlb file not sealed against
        writing (holes); ``False`` maps it anyway, under the SIGBUS repair: a
        peer that then cuts the file short cannot kill this process (the
        lost pages read as zeros, FileTruncatedError from the region's own
        methods until refresh(); a hugetlb hole touched while the pool is
        empty is still fatal). ValueError if ``fd`` is not a memfd;
        AllocError if the file is larger than this machine's memory and
        swap. The region's size is the file's.
        """
        n = integer(fd, "fd")
        if n < 0:
            raise ValueError(f"fd must not be negative, got {n}")
        if n >= 1 << 31:
            raise OSError(
                errno.EBADF, f"fd {n} is not an open file descriptor (descriptors are below 2**31)"
            )
        return cls._attach(
            n,
            readonly=bool(readonly),
            size=0,
            flags=0,
            require_seal=bool(require_seal),
            what=f"fd {n}",
        )

    @classmethod
    def receive(
        cls, sock: socket.socket, *, readonly: bool = False, require_seal: bool = True
    ) -> SharedRegion:
        """The region another process sent with :meth:`send` over the Unix
        socket ``sock`` (blocks until it comes, or the socket's timeout:
        ``sock.settimeout()``). ``readonly`` and ``require_seal`` as for
        :meth:`from_fd`: the peer's word counts for nothing, its file's seals
        do. EOFError if the peer closed the socket first, TimeoutError if
        nothing came within the socket's timeout."""
        import socket as _socket

        sock = _check_socket(sock)
        with Fds() as held:  # the descriptor received, closed unless the region has it
            try:
                data, fds, msg_flags = recv_fds(sock, _MESSAGE.size, held)
            except TimeoutError:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"no region came over the socket within its timeout "
                    f"({sock.gettimeout():g} s): the peer sent nothing",
                ) from None
            if not data and not fds:
                raise EOFError("the peer closed the socket before sending a region")
            if len(fds) != 1 or msg_flags & _socket.MSG_CTRUNC or len(data) != _MESSAGE.size:
                raise ValueError(
                    "the message is not one of SharedRegion.send(): "
                    f"{len(data)} bytes and {len(fds)} file descriptor(s)"
                )
            magic, size, flags = _MESSAGE.unpack(data)
            if magic != _MAGIC:
                raise ValueError("the message is not one of SharedRegion.send()")
            if flags & _FLAG_READONLY:
                readonly = True
            return cls._attach(
                held,
                readonly=bool(readonly),
                size=size,
                flags=flags,
                require_seal=bool(require_seal),
                what="the descriptor received",
                from_peer=True,
            )

    @classmethod
    def _attach_fd(cls, held: Fds, size: int, flags: int) -> SharedRegion:
        """A region over the descriptor ``held`` has (multiprocessing)."""
        return cls._attach(
            held,
            readonly=bool(flags & _FLAG_READONLY),
            size=size,
            flags=flags,
            require_seal=not flags & _FLAG_UNGUARDED,
            what="the descriptor handed over by multiprocessing",
        )

    @classmethod
    def _attach(
        cls,
        fd: int | Fds,
        *,
        readonly: bool,
        size: int,
        flags: int,
        require_seal: bool,
        what: str,
        from_peer: bool = False,
    ) -> SharedRegion:
        """Map ``fd`` if it passes the checks of ``vet``: before the C layer
        for a descriptor ``from_peer`` (``receive``: the C layer takes it and
        closes it on failure, so the message must name it first); after a
        refusal of the C layer for the caller's own (``from_fd``), to name
        the cause. A descriptor in ``Fds`` (its only one) is the region's
        from the call of the C layer on, and ``Fds``' until then; an ``int``
        stays the caller's. The seals and the size of the file the region
        maps are checked once it is mapped, in every case (a mapping is
        harmless until touched; multiprocessing's descriptor, the sender's
        own file, is checked only then): ``fd`` may have been another file
        by then, or grown."""
        take = isinstance(fd, Fds)
        number = fd.fds[0] if isinstance(fd, Fds) else fd
        if not 0 <= size <= sys.maxsize:  # else the C layer's ValueError, before it owns fd
            raise ValueError(
                f"the peer sent a size of {size} bytes with {what}, which no region can "
                f"have (at most {sys.maxsize}): the message is not one of SharedRegion.send()"
            )
        if from_peer:
            vet(number, what, require_seal)
        if flags & _FLAG_THP:
            align, advice, backing = thp_size(), MADV_HUGEPAGE, Backing.THP
        else:
            align, advice, backing = PAGE_SIZE, 0, Backing.NORMAL
        rest = (take, readonly, size, align, advice, backing, Backing.HUGETLB)
        try:
            # one line: the descriptor leaves ``Fds`` for the C layer in the call
            region = _shared_attach(cls, fd.fds.pop() if isinstance(fd, Fds) else fd, *rest)
        except OSError as exc:
            if not take:
                vet(number, what, require_seal)
            raise attach_error(exc, what) from None
        try:
            hugetlb = region._page > PAGE_SIZE
            recheck(_shared_fd(region), region.capacity, hugetlb, what, require_seal)
        except BaseException:
            region.close()
            raise
        register_pickling(SharedRegion, _reduce)
        return cast(SharedRegion, region)

    # ------------------------------------------------------------ handing over

    def send(self, sock: socket.socket) -> None:
        """Send the region to the process at the other end of the Unix socket
        ``sock`` (SCM_RIGHTS): a duplicate of its descriptor travels, with its
        size. The peer calls :meth:`receive`. Both sides then map the same
        pages; each closes its own region. BrokenPipeError if the peer hung up
        (never SIGPIPE)."""
        sock = _check_socket(sock)
        message = _MESSAGE.pack(_MAGIC, self.size, self._flags())
        with Fds() as held:
            held.fds.append(_shared_dup(self))
            send_fds(sock, message, held.fds)  # a peer that hung up: BrokenPipeError, not SIGPIPE

    _shares_arrays = True

    def _flags(self) -> int:
        flags = _FLAG_THP if self._backing is Backing.THP else 0
        return flags | (_FLAG_READONLY if self._fd_readonly() else 0)

    def _fd_readonly(self) -> bool:
        return fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY

    # ------------------------------------------------------------ the file

    @property
    def fd(self) -> int:
        """The region's file descriptor (a memfd, close-on-exec), owned by the
        region: it is closed when the region closes. Duplicate it to keep it."""
        fd: int = _shared_fd(self)
        return fd

    @property
    def readonly(self) -> bool:
        """Whether the kernel refuses write access to the mapping: mapped
        read-only (``readonly=True``) or sealed against writing."""
        return self._fd_readonly() or "write" in self.seals

    @property
    def seals(self) -> frozenset[str]:
        """The file's seals: a subset of {"seal", "shrink", "grow", "write"}
        ("future_write" and "exec" too, for memfds made elsewhere with them)."""
        bits = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
        return frozenset(name for name, bit in F_SEAL_NAMES.items() if bits & bit)

    @property
    def backed_bytes(self) -> int:
        """Bytes of the file that memory backs now, in every process together
        (its blocks): what discard() gives back shows here. ``stats()`` counts
        this process's view instead (resident_bytes: the pages it has mapped)."""
        return os.fstat(self.fd).st_blocks * 512

    def resize(self, new_size: int) -> None:
        """Make the file, and the region, ``new_size`` bytes.

        Growing backs the new pages first (fallocate): AllocError, changing
        nothing, when memory runs out. The region stays where it is if it can,
        else moves (mremap; nothing is copied) unless a buffer, array or
        function of it keeps it in place: then BufferError, nothing changed.
        Shrinking needs the region unsealed against shrinking (PermissionError
        otherwise) and no exported buffer (BufferError). The other regions of
        this process on the file lose the pages past the new end in the same
        call (BufferError, nothing changed, if a buffer pins one of them);
        other processes read zeros there (the SIGBUS repair, which watches
        every region of a file without the shrink seal) until they
        refresh(): only shrink what no other process uses. Other processes
        see a new size after refresh().
        """
        n = size_argument(new_size, PAGE_SIZE, "new_size")
        if self.closed:
            raise ValueError(CLOSED)
        grow = n - self.file_size
        if grow > 0 and self.backing is not Backing.HUGETLB:
            check_memory(grow, f"grow the shared region to {n} bytes")
        self._resize_with(_shared_resize, n)

    def _resize_error(self, exc: OSError, n: int) -> Exception:
        step, what = exc.filename, f"resize the shared region from {self.size} to {n} bytes"
        if step == "F_SEAL_SHRINK":
            return PermissionError(
                errno.EPERM,
                f"cannot {what}: it is sealed against shrinking (seal_shrink=True, the default, "
                f"or seal(shrink=True)); the file is {self.file_size} bytes",
            )
        if step == "F_SEAL_GROW":
            return PermissionError(errno.EPERM, f"cannot {what}: it is sealed against growing")
        if step == "F_SEAL_WRITE":
            return PermissionError(
                errno.EPERM, f"cannot {what}: it is sealed against writing, which freezes its size"
            )
        if step == "O_RDONLY":
            return PermissionError(errno.EACCES, f"cannot {what}: it is mapped read-only")
        error = step_error(exc, n, what, self._page if self.backing is Backing.HUGETLB else None)
        if step == "mremap":
            error.args = (
                f"{error.args[-1]}; the file is {self.file_size} bytes now: refresh() maps it "
                "when the address space allows",
            )
        return error

    def refresh(self) -> int:
        """Map what another process did to the file's size; return the new size.

        Growth is mapped (in place, or by moving the region when nothing keeps
        it where it is: else BufferError); a file grown larger than this
        machine's memory and swap is an AllocError, changing nothing. A file
        that shrank (possible only without the shrink seal) loses its pages
        from the region when nothing holds them (else they stay, past the
        size, reading zeros); pages the SIGBUS repair replaced are mapped
        from the file again, in place.
        """
        if self.closed:
            raise ValueError(CLOSED)
        fsize = self.file_size
        if fsize > self.capacity:
            check_memory(fsize, f"map the file's new size of {fsize} bytes", backed_now=False)
        try:
            size: int = _shared_refresh(self)
        except OSError as exc:
            raise step_error(exc, self.file_size, "map the shared file's new size") from None
        return size

    def seal(
        self, *, grow: bool = False, shrink: bool = False, write: bool = False, seal: bool = False
    ) -> None:
        """Add seals to the file; no seal can be taken off.

        ``shrink``: no process can make it smaller; ``grow``: none can make it
        larger; ``write``: none can change its bytes (this region is remapped
        read-only first: BufferError while a writable buffer of it lives;
        OSError EBUSY if another process still maps it writable); ``seal``:
        no further seal can be added.
        """
        bits = 0
        for name, flag in (("grow", grow), ("shrink", shrink), ("write", write), ("seal", seal)):
            if flag:
                bits |= F_SEAL_NAMES[name]
        if self.closed:
            raise ValueError(CLOSED)
        have = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
        if bits & ~have and self._fd_readonly():
            raise PermissionError(
                errno.EPERM,
                "cannot add seals: the region's descriptor is open read-only (readonly=True, or "
                "it was handed over read-only), and the kernel adds seals only through a "
                "descriptor open for writing; seal it in a process that maps it read/write",
            )
        try:
            _shared_seal(self, bits)
        except OSError as exc:
            sealed = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) & F_SEAL_SEAL
            if exc.filename == "F_SEAL_SEAL" or (exc.errno == errno.EPERM and sealed):
                raise PermissionError(
                    errno.EPERM,
                    "cannot add seals: the memfd is sealed against sealing (seal(seal=True), or "
                    "made without MFD_ALLOW_SEALING)",
                ) from None
            if exc.errno == errno.EBUSY:
                raise OSError(
                    errno.EBUSY,
                    "cannot seal against writing: another mapping of the file is writable (a "
                    "region of this process or of another one), or its pages are pinned; it "
                    "must be closed first",
                ) from None
            message = f"cannot seal: {exc.filename} failed: {exc.strerror}"
            raise OSError(exc.errno, message) from None

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        """Give the pages of [offset, offset + length) back to the kernel: they
        read as zero afterwards, in every process (fallocate PUNCH_HOLE).

        Unlike ``advise("dontneed")``, which on a shared region only drops this
        process's page tables (the bytes stay in the file), this frees the
        memory. Pages touched again are backed again on demand, so a later
        shortage of memory shows at that touch (the OOM killer; SIGBUS under
        vm.overcommit_memory=2 at the commit limit), not here.
        Refused on hugetlb regions (a touch with the pool empty would be
        SIGBUS), on pinned code (BufferError), and where the file cannot be
        changed: a read-only region, a file sealed against writing
        (PermissionError).
        """
        if self._fd_readonly():  # fallocate would say only EBADF
            raise PermissionError(
                errno.EACCES,
                "cannot discard pages: the region's descriptor is open read-only (readonly=True, "
                "or it was handed over read-only), and a hole in the file changes it for every "
                "process; discard in a process that maps it read/write",
            )
        try:
            _shared_discard(self, offset, length)
        except OSError as exc:
            if exc.errno == errno.EPERM and self.seals & {"write", "future_write"}:
                raise PermissionError(
                    errno.EPERM,
                    "cannot discard pages: the file is sealed against writing, which freezes its "
                    "contents (holes included)",
                ) from None
            raise OSError(exc.errno, f"cannot discard pages: {exc.strerror}") from None

    # ------------------------------------------------------------ protection

    def _readonly_reason(self) -> str:
        return (
            "the region is mapped read-only (readonly=True, or sealed against writing), and the "
            "kernel refuses it write access"
        )

    def __repr__(self) -> str:
        if self.closed:
            return f"<SharedRegion closed size={self.size}>"
        perms = "mixed" if self.mixed else str(self.perms)
        seals = ",".join(sorted(self.seals)) or "none"
        return (
            f"<SharedRegion {perms} fd={self.fd} address=0x{self.address:x} size={self.size} "
            f"capacity={self.capacity} seals={seals}>"
        )
