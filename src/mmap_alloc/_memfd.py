"""The policy of memfds for SharedRegion: how pages are obtained, what a
file handed over by another process must be before it is mapped, the
memory check, and the words of the C layer's refusals.

What a receiver accepts rests on the file's seals, which no process can take
off, not on the word of the peer: ``vet`` refuses what is not a memfd, what
any holder could make fatal to touch (``require_seal``), and what is larger
than the machine could ever back.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import NamedTuple

from ._args import integer
from ._linux import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    MADV_HUGEPAGE,
    MFD_HUGETLB,
    PAGE_SIZE,
    default_hugepage_size,
    fd_target,
    format_size,
    fstat_named,
    hugepage_pools,
    hugetlb_hint,
    memory_available,
    memory_ceiling,
    shmem_thp_mode,
    thp_size,
)
from .backings import Backing
from .exceptions import AllocError

_MFD_HUGE_SHIFT = 26
_NAME_MAX = 249  # memfd_create: the name, without "memfd:", at most 249 bytes
SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


class Pages(NamedTuple):
    """How a shared region's pages are obtained."""

    mfd_flags: int
    page: int
    align: int
    advice: int
    backing: Backing
    hugetlb: int | None  # the hugetlb page size, if any


def pages_for(huge: object) -> Pages:
    """How to obtain the pages ``create(huge=...)`` asks for; ValueError or
    TypeError naming what this machine has."""
    if huge is None:
        return Pages(0, PAGE_SIZE, PAGE_SIZE, 0, Backing.NORMAL, None)
    if huge == "thp":
        mode = shmem_thp_mode()
        if mode is None or mode == "deny":
            raise ValueError(
                f"huge='thp': shared memory cannot have transparent huge pages here "
                f"(shmem_enabled is {mode or 'missing'}: {SHMEM_ENABLED}; "
                "mmap_alloc.features.shmem_thp() tells)"
            )
        return Pages(0, PAGE_SIZE, thp_size(), MADV_HUGEPAGE, Backing.THP, None)
    supported = [pool.size for pool in hugepage_pools()]
    if huge == "hugetlb":
        size = default_hugepage_size()
        if size is None or size not in supported:
            raise ValueError("huge='hugetlb': this machine has no hugetlb pages")
    elif isinstance(huge, str):
        raise ValueError(
            f"huge must be None, 'thp', 'hugetlb' or a huge page size in bytes, got {huge!r}"
        )
    else:
        try:
            size = integer(huge, "huge")
        except TypeError:
            raise TypeError(
                f"huge must be None, 'thp', 'hugetlb' or an int, not {type(huge).__name__}"
            ) from None
        if size not in supported:
            names = ", ".join(format_size(n) for n in supported) or "none"
            raise ValueError(
                f"huge={size} is not a huge page size of this machine (supported: {names})"
            )
    flags = MFD_HUGETLB | (size.bit_length() - 1) << _MFD_HUGE_SHIFT
    return Pages(flags, size, size, 0, Backing.HUGETLB, size)


def memfd_name(name: object) -> bytes:
    """``name`` as memfd_create takes it (what /proc shows as "memfd:NAME")."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}")
    encoded = name.encode()
    if b"\0" in encoded:
        raise ValueError("name must not contain NUL characters")
    if len(encoded) > _NAME_MAX:
        raise ValueError(f"name must be at most {_NAME_MAX} bytes in UTF-8, got {len(encoded)}")
    return encoded


def check_memory(size: int, what: str, *, backed_now: bool = True) -> None:
    """AllocError for ``size`` bytes of memory the machine cannot give.

    ``backed_now`` (create, grow: fallocate backs every page in the call):
    more than is available now, which backing would take from everything
    else and wake the OOM killer. Otherwise (a file another process made, or
    grew: its pages are backed already or at first touch): more than this
    machine could ever hold, its memory and swap (or its memory cgroup's
    limit), so that touching it all could only end in the OOM killer.
    Requests up to 1/16 of that are let through without reading /proc
    (which costs more than making a small region).
    """
    ceiling = memory_ceiling()
    if size <= ceiling // 16:
        return
    if backed_now:
        available = memory_available()
        if available is not None and size > available:
            raise AllocError(
                f"cannot {what}: {size} bytes asked for, {available} available "
                "(MemAvailable + SwapFree in /proc/meminfo, within the memory cgroup's limit); "
                "a shared region backs every page when it is made, so more would wake "
                "the OOM killer",
                errno=errno.ENOMEM,
                size=size,
            )
    if size > ceiling:
        raise AllocError(
            f"cannot {what}: it is {size} bytes ({format_size(size)}), more than this machine "
            f"could ever back ({ceiling} bytes of memory and swap, or the memory cgroup's "
            "limit): touching it all would wake the OOM killer",
            errno=errno.ENOMEM,
            size=size,
        )


def step_error(exc: OSError, size: int, what: str, hugetlb: int | None = None) -> Exception:
    """The exception a refused step of the C layer becomes (exc.filename: the step)."""
    step = exc.filename
    if step == "fallocate" and exc.errno == errno.EFBIG:
        return AllocError(
            f"cannot {what}: the file may not grow to {size} bytes (RLIMIT_FSIZE, `ulimit -f`)",
            errno=errno.EFBIG,
            size=size,
        )
    if step in ("fallocate", "mmap", "mremap", "size") and exc.errno in (
        errno.ENOMEM,
        errno.ENOSPC,
        errno.EAGAIN,
    ):
        message = f"cannot {what}: {step}: {os.strerror(exc.errno or errno.ENOMEM)}"
        if hugetlb is not None:
            message += hugetlb_hint(hugetlb)
        return AllocError(message, errno=exc.errno or errno.ENOMEM, size=size)
    return OSError(exc.errno, f"cannot {what}: {step} failed: {exc.strerror}")


def attach_error(exc: OSError, what: str) -> Exception:
    """The error of a refused attach of ``what`` (the C layer may have closed
    the descriptor already: nothing here reads it)."""
    step = exc.filename
    if step in ("fd", "dup") and exc.errno == errno.EBADF:
        return OSError(errno.EBADF, f"{what} is not an open file descriptor")
    if step == "memfd":
        return ValueError(f"{what} is not a memfd: SharedRegion maps only files of memfd_create")
    if step == "O_RDONLY":
        return PermissionError(errno.EACCES, f"{what} is open read-only: map it with readonly=True")
    if step == "F_SEAL_WRITE":
        return PermissionError(
            errno.EPERM,
            f"the memfd of {what} is sealed against writing: map it with readonly=True",
        )
    if step == "empty":
        return ValueError(f"the memfd of {what} is empty: there is nothing to map")
    return step_error(exc, 0, f"map the memfd of {what}")


def missing_seal(seals: int, hugetlb: bool) -> str | None:
    """What the seals lack for no holder of the file to be able to make a
    touch of it fatal (None: nothing). Shrinking takes pages from under every
    mapping (SIGBUS); on hugetlb a hole (fallocate PUNCH_HOLE, which only a
    write seal forbids) needs a free huge page at the next touch, and an
    empty pool makes that touch SIGBUS too."""
    if not seals & F_SEAL_SHRINK:
        return "F_SEAL_SHRINK"
    if hugetlb and not seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
        return "F_SEAL_WRITE"
    return None


def _unguarded(what: str, seals: int, missing: str) -> ValueError:
    if missing == "F_SEAL_WRITE":
        why = (
            "it is sealed against shrinking but not against writing (F_SEAL_WRITE or "
            "F_SEAL_FUTURE_WRITE), and it is a hugetlb file: any process holding it could punch "
            "a hole in it, and this one would die of SIGBUS when it next touches the hole while "
            "the hugetlb pool is empty. The sender should seal it against writing first "
            "(seal(write=True); F_SEAL_FUTURE_WRITE lets the mappings it has write on)"
        )
    elif seals & F_SEAL_SEAL:
        why = (
            "it is not sealed against shrinking (F_SEAL_SHRINK), and it can never be: it is "
            "sealed against sealing (an O_TMPFILE file, an unlinked file of /dev/shm, or a "
            "memfd made without MFD_ALLOW_SEALING). Any process holding it could truncate it, "
            "and this one would die of SIGBUS at its next touch of the lost pages. The sender "
            "should make it with memfd_create(MFD_ALLOW_SEALING) and seal it "
            "(SharedRegion.create() does)"
        )
    else:
        why = (
            "it is not sealed against shrinking (F_SEAL_SHRINK): any process holding it could "
            "truncate it, and this one would die of SIGBUS at its next touch of the lost pages. "
            "The sender should seal it (SharedRegion.create() does unless seal_shrink=False; "
            "region.seal(shrink=True), or fcntl F_ADD_SEALS with F_SEAL_SHRINK)"
        )
    return ValueError(f"{what} is refused: {why}; or pass require_seal=False to accept the risk")


def vet(fd: int, what: str, require_seal: bool) -> None:
    """Refuse, before it is mapped, a descriptor this process must not map:
    closed (OSError EBADF), not a memfd or empty (ValueError), without the
    seals that keep its holders from making a touch of it fatal (ValueError,
    when ``require_seal``), larger than the machine could ever back
    (AllocError). ``what`` names it ("fd 5", "the descriptor received").
    Checks of the descriptor's kind and its seals, which no process can take
    off: the C layer maps the same file."""
    st = fstat_named(fd, what)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = -1  # not a file of shmem or hugetlbfs
    # an unlinked file only: one with a name (/dev/shm) anyone could open and cut short
    if seals < 0 or st.st_nlink != 0 or not stat.S_ISREG(st.st_mode):
        target = fd_target(fd) or "unknown"
        raise ValueError(
            f"{what} is not a memfd (it is {target}): SharedRegion maps only files made by "
            "memfd_create, which no other process can open by a name"
        )
    if st.st_size <= 0:
        raise ValueError(f"the memfd of {what} is empty: there is nothing to map")
    if require_seal:
        missing = missing_seal(seals, st.st_blksize > PAGE_SIZE)
        if missing is not None:
            raise _unguarded(what, seals, missing)
    check_memory(st.st_size, f"map the memfd of {what}", backed_now=False)


def recheck(fd: int, capacity: int, hugetlb: bool, what: str, require_seal: bool) -> None:
    """``vet`` again, after mapping, of what can differ by then: the seals of
    the file mapped (``fd``: the region's own; the caller's descriptor may
    have been another file when it was vetted) and the size mapped (the
    file may have grown meanwhile). The kind was checked by the C layer."""
    if require_seal:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        missing = missing_seal(seals, hugetlb)
        if missing is not None:
            raise _unguarded(what, seals, missing)
    check_memory(capacity, f"map the memfd of {what}", backed_now=False)
