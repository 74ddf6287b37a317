"""File regions: files mapped into memory, as with stdlib ``mmap`` or
``numpy.memmap``, where no truncation of the file can crash the process.

A :class:`FileRegion` is a :class:`~mmap_alloc.Region` over part of a file:
bytes-like access, ``find()``, ``view()``, ``ndarray()``, ``advise()``,
``lock()``, ``protect()`` within what the mode allows, ``stats()``. Modes as
numpy.memmap's: ``"r"`` read-only, ``"r+"`` read/write shared with the file,
``"c"`` copy-on-write (writes stay in this process), ``"w+"`` create or
truncate the file to ``size`` bytes, then as ``"r+"``.

When the file shrinks under a mapping (another process truncates it), a
touch of a page past its new end would raise SIGBUS and kill the process,
through any exporter: stdlib mmap, numpy.memmap and memmap2 all do. The C
layer (``_mman``: files.c, repair.c) publishes every file region to a
SIGBUS handler that maps zero pages over the lost part instead; the
region's own methods then raise :class:`~mmap_alloc.FileTruncatedError`
for those pages until ``refresh()``. This module holds the policy: modes,
opening the path, argument checks and messages, the errors of the C layer's
steps, and how a region travels inside multiprocessing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Any, NamedTuple, cast

from ._args import integer
from ._args import size as size_argument
from ._fdregion import FdRegion, pickle_handle, register_pickling
from ._linux import format_size, fstat_named
from ._mman import (
    PROT_READ,
    PROT_WRITE,
    _file_fd,
    _file_flush,
    _file_map,
    _file_page,
    _file_refresh,
    _file_repaired,
    _file_resize,
    _repair_install,
    _repair_state,
)
from .backings import Backing
from .exceptions import CLOSED, FileTruncatedError

__all__ = ["FileRegion", "install_repair", "repair_installed"]


class Mode(NamedTuple):
    """What a mode opens and maps."""

    flags: int  # os.open
    prot: int
    shared: bool  # MAP_SHARED: writes reach the file


MODES = {
    "r": Mode(os.O_RDONLY, PROT_READ, True),
    "r+": Mode(os.O_RDWR, PROT_READ | PROT_WRITE, True),
    "c": Mode(os.O_RDONLY, PROT_READ | PROT_WRITE, False),
    "w+": Mode(os.O_RDWR | os.O_CREAT | os.O_TRUNC, PROT_READ | PROT_WRITE, True),
}

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def repair_installed() -> bool:
    """Whether the SIGBUS repair's handler is the process's SIGBUS handler
    now (it is put there when the first region of a file that may shrink is
    made; a handler installed later without chaining, as a later
    ``faulthandler.enable()``, a JVM or the Go runtime do, displaces it)."""
    return _repair_state()[0]


def install_repair() -> None:
    """Put the SIGBUS repair's handler back on top of whatever handler
    displaced it, passing that handler every signal that is not a repair.
    Regions do this when they are made; call it after enabling a runtime
    that installs its own handler, to keep file regions safe meanwhile."""
    _repair_install()


# ---------------------------------------------------------------- opening


def _mode(mode: object) -> Mode:
    try:
        return MODES[mode]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(
            f"mode must be one of 'r', 'r+', 'c', 'w+' (as numpy.memmap's), got {mode!r}"
        ) from None


def _open(file: object, mode: str, spec: Mode) -> tuple[int, bool, str | None, str]:
    """(descriptor, whether the region takes it, path, what to call it)."""
    if isinstance(file, int) and not isinstance(file, bool):
        if file < 0:
            raise ValueError(f"file must not be a negative descriptor, got {file}")
        return file, False, None, f"fd {file}"
    if not isinstance(file, str | os.PathLike):
        raise TypeError(
            f"file must be a path (str or os.PathLike) or a file descriptor (int), "
            f"not {type(file).__name__}"
        )
    path = os.fsdecode(os.fspath(file))
    # no waiting for a writer (a FIFO), no controlling terminal (a tty)
    fd = os.open(path, spec.flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY, 0o666)
    os.set_blocking(fd, True)
    return fd, True, path, f"file {path!r}"


def _check_descriptor(fd: int, mode: str, what: str, path: str | None) -> None:
    """A regular file, opened for what ``mode`` needs."""
    st = fstat_named(fd, what)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path or what)
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise OSError(
            errno.ENODEV,
            f"{what} is {kind}: a FileRegion maps regular files only",
        )
    access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if access == os.O_WRONLY:
        raise PermissionError(errno.EACCES, f"{what} is open write-only: mapping needs reading")
    if mode in ("r+", "w+") and access != os.O_RDWR:
        raise PermissionError(
            errno.EACCES,
            f"{what} is open read-only: mode {mode!r} needs it open for reading and writing "
            "(os.O_RDWR); map it with mode 'r' or 'c'",
        )


def _create(fd: int, size: int, what: str) -> None:
    """Mode "w+": the file, empty, then ``size`` bytes allocated on the disk
    (so that a full disk is this error, never a SIGBUS at a later write)."""
    os.ftruncate(fd, 0)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot create {what} of {size} bytes: {os.strerror(exc.errno or 0)}"
        ) from None


def _length(fd: int, offset: int, length: int | None, what: str) -> int:
    """The bytes to map: checked against the file and its page."""
    page = _file_page(fd)
    if offset % page:
        raise ValueError(
            f"offset must be a multiple of the page size {page} (mappings start on page "
            f"boundaries), got {offset}; to skip a header of another size, map from a page "
            "boundary and give ndarray() or view() the rest as their own offset"
        )
    fsize = os.fstat(fd).st_size
    if fsize == 0:
        raise ValueError(
            f"cannot map {what}: the file is empty; open it with mode='w+' and a size, or "
            "grow it first"
        )
    if offset >= fsize:
        raise ValueError(f"offset {offset} lies at or past the end of {what} ({fsize} bytes)")
    if length is None:
        return fsize - offset
    if offset + length > fsize:
        raise ValueError(
            f"offset {offset} + length {length} lies past the end of {what} ({fsize} bytes); "
            "resize() grows a region of mode 'r+' or 'w+' with its file"
        )
    return length


def _map_error(exc: OSError, what: str) -> OSError:
    step = exc.filename
    if step == "mmap" and exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionError(exc.errno, f"cannot map {what}: {exc.strerror}")
    if step == "mmap" and exc.errno == errno.ENODEV:
        return OSError(exc.errno, f"cannot map {what}: its file system does not map files")
    return OSError(exc.errno, f"cannot map {what}: {step} failed: {exc.strerror}")


# ---------------------------------------------------------------- multiprocessing


def _reduce(region: FileRegion) -> tuple[Any, tuple[Any, ...]]:
    """multiprocessing's pickling of a region: its descriptor travels (as a
    SharedRegion's does, see _fdregion.pickle_handle), with what part of the
    file it maps and how; the receiver maps the same file."""
    if region._mode == "c":
        raise TypeError(
            "a copy-on-write FileRegion (mode 'c') cannot be handed to another process: its "
            "changes are this process's own; open the file there, or use mode 'r+'"
        )
    handle = pickle_handle(region, readonly=region._mode == "r")
    args = (handle, region._mode, region._offset, region.size, region._limit, region._path)
    return _rebuild, args


def _rebuild(
    handle: Any, mode: str, offset: int, size: int, limit: int | None, path: str | None
) -> FileRegion:
    from ._arraypickle import received

    region = FileRegion._map_file(
        handle.detach(), True, "r+" if mode == "w+" else mode, offset, size
    )
    region._path, region._limit = path, limit
    received(region)
    return region


# ---------------------------------------------------------------- the region


class FileRegion(FdRegion):
    """Part of a file mapped into memory: :meth:`open` makes one.

    A FileRegion is a Region (bytes-like access, ``find()``, ``view()``,
    ``ndarray()``, ``advise()``, ``lock()``, ``protect()``, ``stats()``, the
    export rules) that owns a descriptor of its file (``fd``), closed with it.

    No truncation of the file can crash the process: pages past the file's
    new end read as zeros through every exporter (numpy, memoryview, ctypes),
    writes there stay in this process, ``truncated`` turns True, and the
    region's own methods raise FileTruncatedError for those pages until
    :meth:`refresh` maps the file as it is.
    """

    __slots__ = ("_limit", "_mode", "_offset", "_path")

    _elsewhere = "elsewhere, open the file again"

    _limit: int | None  # the length asked for (refresh keeps to it), or None: the file's
    _mode: str
    _offset: int
    _path: str | None

    @classmethod
    def open(
        cls,
        file: str | os.PathLike[str] | int,
        mode: str = "r",
        *,
        offset: int = 0,
        length: int | None = None,
        size: int | None = None,
    ) -> FileRegion:
        """Map ``length`` bytes (None: to the end) of ``file`` from ``offset``.

        ``file``: a path, or an open descriptor, which the region duplicates
        (the caller keeps theirs). ``mode``: "r" (read-only), "r+"
        (read/write, shared with the file), "c" (copy-on-write: writes stay
        in this process), "w+" (create or truncate the file to ``size``
        bytes, allocated on the disk now, then as "r+"). ``offset``: a
        multiple of the page size (a header of another size, as in .npy
        files, is skipped with ``ndarray(..., offset=)``).

        ValueError for an unknown mode, an offset or length outside the
        file, an empty file, "w+" without a size; the OSError the kernel
        gave for a missing file, a directory, no permission. Nothing stays
        open or mapped after a failure.
        """
        spec = _mode(mode)
        start = integer(offset, "offset")
        if start < 0:
            raise ValueError(f"offset must not be negative, got {start}")
        limit = None if length is None else integer(length, "length")
        if limit is not None and limit <= 0:
            raise ValueError(f"length must be positive, got {limit}: a region maps at least a byte")
        if mode == "w+":
            if size is None:
                raise ValueError("mode 'w+' creates the file: size (in bytes) is required")
            created = size_argument(size, 1)
        elif size is not None:
            raise ValueError(
                f"size is for mode 'w+' only (the size to create the file with); mode {mode!r} "
                "maps the file as it is, and resize() changes a file of mode 'r+'"
            )
        fd, take, path, what = _open(file, mode, spec)
        try:
            _check_descriptor(fd, mode, what, path)
            if mode == "w+":
                _create(fd, created, what)
            n = _length(fd, start, limit, what)
        except BaseException:
            if take:
                os.close(fd)
            raise
        try:
            region = cls._map_file(fd, take, mode, start, n)  # takes fd, even on failure
        except OSError as exc:
            raise _map_error(exc, what) from None
        region._path, region._limit = path, limit
        return region

    @classmethod
    def _map_file(cls, fd: int, take: bool, mode: str, offset: int, length: int) -> FileRegion:
        spec = MODES[mode]
        region = cast(
            FileRegion,
            _file_map(
                cls,
                fd,
                take,
                spec.prot,
                spec.shared,
                offset,
                length,
                Backing.NORMAL,
                Backing.HUGETLB,
            ),
        )
        region._mode, region._offset = mode, offset
        region._path = region._limit = None
        register_pickling(FileRegion, _reduce)
        return region

    # ------------------------------------------------------------ the file

    @property
    def path(self) -> str | None:
        """The path the file was opened by, or None when made from a descriptor."""
        return self._path

    @property
    def mode(self) -> str:
        """ "r", "r+", "c" or "w+", as given to :meth:`open`."""
        return self._mode

    @property
    def offset(self) -> int:
        """Where in the file the region starts."""
        return self._offset

    @property
    def fd(self) -> int:
        """The region's descriptor of its file (close-on-exec), owned by the
        region: closed when the region closes. Duplicate it to keep it."""
        fd: int = _file_fd(self)
        return fd

    @property
    def truncated(self) -> bool:
        """Whether pages of the region were found past the file's end (and
        repaired: they read as zeros) since the last :meth:`refresh`."""
        if self.closed:
            raise ValueError(CLOSED)
        first = _file_repaired(self)
        return 0 <= first < self.size

    def flush(self, offset: int = 0, length: int | None = None) -> None:
        """Write the changed pages of [offset, offset + length) to the file
        and wait for it (msync MS_SYNC); None: to the end. Whole pages, as
        for advise(). Nothing to do for modes "r" and "c"."""
        try:
            _file_flush(self, offset, length)
        except FileTruncatedError:
            raise
        except OSError as exc:
            raise OSError(exc.errno, f"cannot flush the region: {exc.strerror}") from None

    def resize(self, new_size: int) -> None:
        """Make the region ``new_size`` bytes and the file end where it ends
        (offset + new_size bytes), as stdlib mmap.resize() does; modes "r+"
        and "w+" only.

        New bytes are allocated in the file first (fallocate): a full disk or
        quota is an OSError here (ENOSPC, EDQUOT), changing nothing, never a
        SIGBUS at a later write. The region stays where it is if it can, else
        moves unless a buffer, array or function of it keeps it in place
        (BufferError, nothing changed). Shrinking needs no exported buffer
        (BufferError).
        """
        n = size_argument(new_size, 1, "new_size")
        if self.closed:
            raise ValueError(CLOSED)
        if self._mode not in ("r+", "w+"):
            raise ValueError(
                f"resize() changes the file with the region: it needs mode 'r+' or 'w+', and "
                f"this region is mode {self._mode!r}"
            )
        emulated = False

        def emulate_fallocate(exc: OSError) -> bool:
            # a file system without fallocate: the C library writes the blocks (once)
            nonlocal emulated
            if exc.filename != "fallocate" or exc.errno != errno.EOPNOTSUPP or emulated:
                return False
            fsize = self.file_size
            os.posix_fallocate(self.fd, fsize, self._offset + n - fsize)
            emulated = True
            return True

        self._resize_with(_file_resize, n, emulate_fallocate)
        if self._limit is not None:
            self._limit = n

    def _resize_error(self, exc: OSError, n: int) -> Exception:
        what = f"resize the file region from {self.size} to {n} bytes"
        step = exc.filename
        if step == "fallocate" and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return OSError(
                exc.errno, f"cannot {what}: {exc.strerror}: the file system has no room for it"
            )
        if step == "fallocate" and exc.errno == errno.EFBIG:
            return OSError(exc.errno, f"cannot {what}: the file may not grow that large")
        if step in ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE"):
            return PermissionError(exc.errno, f"cannot {what}: the file is sealed ({step})")
        if step == "O_RDONLY":
            return PermissionError(exc.errno, f"cannot {what}: the file is open read-only")
        return OSError(exc.errno, f"cannot {what}: {step} failed: {exc.strerror}")

    def refresh(self) -> int:
        """Adopt the file's size now (another process grew or shrank it);
        return the region's new size.

        The file is mapped again over pages repaired after a truncation, in
        place (buffers and arrays of them see the file from then on).
        Growth is mapped (in place, or by moving the region when nothing
        keeps it where it is: else BufferError), up to the length given to
        :meth:`open` if one was; pages the file lost are unmapped when
        nothing holds them. ValueError if the file now ends before the
        region starts.
        """
        if self.closed:
            raise ValueError(CLOSED)
        try:
            size: int = _file_refresh(self, self._limit)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot refresh the region: {exc.strerror}") from None
        return size

    # ------------------------------------------------------------ Region, within the mode

    def advise(self, advice: str, offset: int = 0, length: int | None = None) -> None:
        """As Region.advise(); FileTruncatedError when populate advice meets
        pages past the file's end."""
        try:
            super().advise(advice, offset, length)
        except FileTruncatedError:
            raise
        except OSError as exc:
            if exc.errno == errno.EFAULT and self.file_size < self._offset + self.capacity:
                size = self.file_size
                raise FileTruncatedError(
                    f"cannot advise {advice!r}: the file was cut short to {size} bytes and the "
                    "range reaches past its end; refresh() maps the file as it is now",
                    size=size,
                ) from None
            raise

    def _readonly_reason(self) -> str:
        return (
            f"the file is open read-only (mode {self._mode!r}), and the kernel refuses write "
            "access to a shared mapping of it; open it with 'r+' (shared) or 'c' (copy-on-write)"
        )

    @property
    def _shares_arrays(self) -> bool:
        return self._mode != "c"

    # ------------------------------------------------------------ the rest

    def __repr__(self) -> str:
        where = repr(self._path) if self._path is not None else "fd"
        if self.closed:
            return f"<FileRegion closed {where} mode={self._mode!r}>"
        perms = "mixed" if self.mixed else str(self.perms)
        return (
            f"<FileRegion {perms} {where} mode={self._mode!r} offset={self._offset} "
            f"size={self.size} ({format_size(self.size)}) address=0x{self.address:x}>"
        )
