"""The Linux adapter: the kernel's constants, errno translation, and every
reader of /proc, /sys and pagemap the library uses.

Everything the public modules need to know about the operating system is
asked here, so that they read as policy.
"""

from __future__ import annotations

import errno
import functools
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

# the kernel's flags, named once for the whole library (see __all__)
from ._mman import (
    F_SEAL_FUTURE_WRITE,
    F_SEAL_GROW,
    F_SEAL_SEAL,
    F_SEAL_SHRINK,
    F_SEAL_WRITE,
    MADV_COLD,
    MADV_COLLAPSE,
    MADV_DODUMP,
    MADV_DOFORK,
    MADV_DONTDUMP,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_HUGEPAGE,
    MADV_KEEPONFORK,
    MADV_NOHUGEPAGE,
    MADV_NORMAL,
    MADV_PAGEOUT,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MADV_RANDOM,
    MADV_SEQUENTIAL,
    MADV_WILLNEED,
    MADV_WIPEONFORK,
    MAP_HUGE_SHIFT,
    MAP_HUGETLB,
    MAP_NORESERVE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    mapping_count,  # read without heap memory: it is asked at vm.max_map_count
    page_size,
    residency,
)
from .exceptions import AllocError
from .perm import Perm

if TYPE_CHECKING:
    from pathlib import Path

PAGE_SIZE: int = page_size()
"""The kernel's base page size."""


ADVICE: dict[str, int] = {
    "normal": MADV_NORMAL,
    "random": MADV_RANDOM,
    "sequential": MADV_SEQUENTIAL,
    "willneed": MADV_WILLNEED,
    "dontneed": MADV_DONTNEED,
    "free": MADV_FREE,
    "cold": MADV_COLD,
    "pageout": MADV_PAGEOUT,
    "hugepage": MADV_HUGEPAGE,
    "nohugepage": MADV_NOHUGEPAGE,
    "collapse": MADV_COLLAPSE,
    "dontfork": MADV_DONTFORK,
    "dofork": MADV_DOFORK,
    "dontdump": MADV_DONTDUMP,
    "dodump": MADV_DODUMP,
    "wipeonfork": MADV_WIPEONFORK,
    "keeponfork": MADV_KEEPONFORK,
    "populate_read": MADV_POPULATE_READ,
    "populate_write": MADV_POPULATE_WRITE,
}
"""madvise(2) advice by the name region.advise() takes."""

ADVICE_SINCE: dict[str, str] = {
    "free": "Linux 4.5",
    "wipeonfork": "Linux 4.14",
    "keeponfork": "Linux 4.14",
    "cold": "Linux 5.4",
    "pageout": "Linux 5.4",
    "populate_read": "Linux 5.14",
    "populate_write": "Linux 5.14",
    "collapse": "Linux 6.1",
}
"""The kernel that introduced each newer advice, for error messages."""


MFD_CLOEXEC = 0x1
MFD_ALLOW_SEALING = 0x2
MFD_HUGETLB = 0x4
MFD_NOEXEC_SEAL = 0x8
MFD_EXEC = 0x10
"""memfd_create(2) flags (os.memfd_create predates the last two)."""

F_SEAL_NAMES: dict[str, int] = {
    "seal": F_SEAL_SEAL,
    "shrink": F_SEAL_SHRINK,
    "grow": F_SEAL_GROW,
    "write": F_SEAL_WRITE,
    "future_write": F_SEAL_FUTURE_WRITE,
    "exec": 0x20,
}
"""memfd seals (fcntl F_ADD_SEALS) by the names SharedRegion.seals uses
(F_SEAL_FUTURE_WRITE is Linux 5.1, F_SEAL_EXEC 6.3)."""

RUN_GUARD = 1
"""A flag of a protection run (Region._runs()): guard pages (MADV_GUARD_INSTALL)."""
RUN_DONTFORK = 2
"""A flag of a protection run: pages advised MADV_DONTFORK."""


def alloc_error(exc: OSError, size: int, huge_pagesize: int | None = None) -> Exception:
    """The exception a failed mapping of ``size`` bytes becomes.

    ENOMEM (and EAGAIN, a locked-memory refusal) is an AllocError; anything
    else stays the OSError it was.
    """
    if exc.errno not in (errno.ENOMEM, errno.EAGAIN):
        return exc
    message = f"cannot map {size} bytes: {os.strerror(exc.errno or errno.ENOMEM)}"
    if huge_pagesize is not None:
        message += hugetlb_hint(huge_pagesize)
    return AllocError(message, errno=exc.errno or errno.ENOMEM, size=size)


def hugetlb_hint(huge_pagesize: int) -> str:
    """How to fill an empty hugetlb pool, for messages ("; the pool ...")."""
    return (
        f"; the pool of {format_size(huge_pagesize)} huge pages may be empty: reserve pages "
        f"with `echo N > {hugepage_dir(huge_pagesize)}/nr_hugepages` (as root)"
    )


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it exactly."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------- /proc, /sys

_HUGEPAGES = "/sys/kernel/mm/hugepages"


def hugepage_dir(size: int) -> Path:
    """The sysfs folder of the hugetlb pool of pages of ``size`` bytes."""
    from pathlib import Path  # on use: pathlib costs imports the library spares

    return Path(_HUGEPAGES, f"hugepages-{size // 1024}kB")


@dataclass(frozen=True)
class HugePagePool:
    """A hugetlb pool: page size, pages reserved and pages free."""

    size: int
    reserved: int
    free: int


def hugepage_pools(folder: str | Path = _HUGEPAGES) -> list[HugePagePool]:
    """The hugetlb page sizes this kernel supports, smallest first (``folder``:
    where the pools are described, for tests)."""
    from pathlib import Path

    pools = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not (name.startswith("hugepages-") and name.endswith("kB")):
            continue
        size = int(name[len("hugepages-") : -2]) * 1024
        pools.append(
            HugePagePool(
                size,
                read_int(entry / "nr_hugepages", 0),
                read_int(entry / "free_hugepages", 0),
            )
        )
    return sorted(pools, key=lambda pool: pool.size)


def hugepage_pool(size: int) -> HugePagePool | None:
    """The hugetlb pool of pages of ``size`` bytes, or None if there is none."""
    for pool in hugepage_pools():
        if pool.size == size:
            return pool
    return None


def read_text(path: str | Path, default: str = "") -> str:
    """A small kernel file's text, stripped, or ``default`` if it cannot be read."""
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return default


def read_int(path: str | Path, default: int) -> int:
    """A kernel file holding one integer, or ``default``."""
    text = read_text(path)
    try:
        return int(text)
    except ValueError:
        return default


def sysfs_choice(path: str | Path) -> str | None:
    """The [selected] word of a sysfs choice file, or None if it cannot be read."""
    text = read_text(path)
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def thp_mode() -> str:
    """The transparent huge page mode: always, madvise, never (or unknown)."""
    return sysfs_choice("/sys/kernel/mm/transparent_hugepage/enabled") or "unknown"


def shmem_thp_mode() -> str | None:
    """The shared memory THP mode (always, within_size, advise, never, deny, force),
    or None for a kernel without it."""
    return sysfs_choice("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def memfd_noexec() -> int | None:
    """vm.memfd_noexec (Linux 6.3): 0 executable memfds allowed, 1 noexec unless
    MFD_EXEC, 2 refused; None before 6.3."""
    value = read_int("/proc/sys/vm/memfd_noexec", -1)
    return None if value < 0 else value


def fd_target(fd: int) -> str:
    """What file descriptor ``fd`` of this process refers to, as /proc/self/fd
    shows it ("/memfd:name (deleted)", "socket:[...]", a path), or "" if unknown."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def fstat_named(fd: int, what: str) -> os.stat_result:
    """os.fstat(``fd``), where EBADF says that ``what`` ("fd 5", "file 'a.bin'")
    is not an open file descriptor: a caller's descriptor, checked before use."""
    try:
        return os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise OSError(errno.EBADF, f"{what} is not an open file descriptor") from None
        raise


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (fields in kB scaled; counts as they are)."""
    result: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as lines:
            for line in lines:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    scale = 1024 if fields[1:2] == ["kB"] else 1
                    result[key] = int(fields[0]) * scale
    except OSError:
        pass
    return result


@functools.cache
def _memory_cgroup() -> tuple[str, str] | None:
    """The limit and usage files of this process's memory cgroup, if it has a
    limit (cgroup v2 memory.max, or v1 memory.limit_in_bytes); looked up once."""
    try:
        with open("/proc/self/cgroup") as lines:
            entries = [line.rstrip("\n").split(":", 2) for line in lines]
    except OSError:
        return None
    for _id, controllers, path in entries:
        if controllers == "":
            folder = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
            files = (f"{folder}/memory.max", f"{folder}/memory.current")
        elif "memory" in controllers.split(","):
            folder = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
            files = (f"{folder}/memory.limit_in_bytes", f"{folder}/memory.usage_in_bytes")
        else:
            continue
        if 0 <= read_int(files[0], -1) < 1 << 60:
            return files
    return None


@functools.cache
def memory_ceiling() -> int:
    """The most memory this process could ever get: the machine's physical
    memory and swap, or its memory cgroup's limit if lower (read once)."""
    ceiling = os.sysconf("SC_PHYS_PAGES") * PAGE_SIZE + meminfo().get("SwapTotal", 0)
    cgroup = _memory_cgroup()
    if cgroup is not None:
        ceiling = min(ceiling, read_int(cgroup[0], ceiling))
    return ceiling


def memory_available() -> int | None:
    """Bytes that can be given to new pages now without waking the OOM killer:
    MemAvailable + SwapFree of /proc/meminfo, at most the memory cgroup's
    headroom; None if the kernel does not say. (Reads /proc and /sys: about
    0.1-1 ms.)"""
    info = meminfo()
    if "MemAvailable" not in info:
        return None
    available = info["MemAvailable"] + info.get("SwapFree", 0)
    cgroup = _memory_cgroup()
    if cgroup is not None:
        limit, usage = read_int(cgroup[0], -1), read_int(cgroup[1], -1)
        if limit >= 0 and usage >= 0:
            available = min(available, max(0, limit - usage))
    return available


def mmap_min_addr() -> int:
    """vm.mmap_min_addr: the lowest address a process may map (65536 if unknown)."""
    return read_int("/proc/sys/vm/mmap_min_addr", 65536)


def selinux_mode() -> str | None:
    """SELinux: "enforcing" or "permissive", or None where it is not enabled."""
    value = read_text("/sys/fs/selinux/enforce")
    if value == "":
        return None
    return "enforcing" if value == "1" else "permissive"


USER_ADDRESS_END: int = 1 << 47 if os.uname().machine.lower() in ("x86_64", "amd64") else 1 << 48
"""The end of the user address space with 4-level page tables (x86-64: 47 bits,
arm64: 48 bits); a kernel with fewer bits refuses addresses past its end."""


def max_map_count() -> int:
    """vm.max_map_count: how many mappings a process may hold (-1 if unknown)."""
    return read_int("/proc/sys/vm/max_map_count", -1)


def overcommit_mode() -> int:
    """vm.overcommit_memory: 0 heuristic, 1 always, 2 never (-1 if unknown)."""
    return read_int("/proc/sys/vm/overcommit_memory", -1)


def memlock_limit() -> tuple[int, int]:
    """RLIMIT_MEMLOCK as (soft, hard); resource.RLIM_INFINITY for no limit."""
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/maps."""

    start: int
    end: int
    perms: Perm
    private: bool
    name: str


_perms_of = functools.cache(Perm.parse)
"""Perm.parse of the "rwx" column, remembered (a few of them recur on every line)."""


def mappings() -> list[Mapping]:
    """The process's mappings, as /proc/self/maps lists them."""
    result = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = fields[0].split("-")
            flags = fields[1]
            result.append(
                Mapping(
                    int(start, 16),
                    int(end, 16),
                    _perms_of(flags[:3]),
                    flags[3] == "p",
                    fields[5].strip() if len(fields) > 5 else "",
                )
            )
    return result


# ---------------------------------------------------------------- huge pages


def default_hugepage_size() -> int | None:
    """The kernel's default hugetlb page size (Hugepagesize in /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def thp_size() -> int:
    """The transparent huge page size (the PMD size: 2 MiB on x86-64)."""
    return read_int("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", 2 << 20)


@dataclass(frozen=True)
class SmapsEntry:
    """One mapping of /proc/self/smaps: its range and its sizes in bytes."""

    start: int
    end: int
    sizes: dict[str, int]


def smaps(start: int, end: int) -> list[SmapsEntry]:
    """The /proc/self/smaps entries of the mappings that overlap [start, end).

    The kernel reports whole mappings (VMAs); one may reach past the range
    when the kernel merged neighbouring mappings.
    """
    entries: list[SmapsEntry] = []
    current: SmapsEntry | None = None
    with open("/proc/self/smaps") as lines:
        for line in lines:
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):  # a mapping's first line: "start-end perms ..."
                lo, _, hi = key.partition("-")
                first, last = int(lo, 16), int(hi, 16)
                current = None
                if first < end and last > start:
                    current = SmapsEntry(first, last, {})
                    entries.append(current)
            elif current is not None and rest.endswith("kB\n"):
                current.sizes[key[:-1]] = int(rest.split()[0]) * 1024
    return entries


# PAGEMAP_SCAN (Linux 6.7): page categories of a range of this process.
PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, struct pm_scan_arg)
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_HUGE = 1 << 6
_SCAN_REGIONS = 64


def pagemap_ranges(start: int, end: int, categories: int) -> list[tuple[int, int]] | None:
    """The [start, end) address ranges of [start, end) whose pages have every
    category of ``categories`` (PAGE_IS_*), page by page, from the PAGEMAP_SCAN
    ioctl; None when the kernel has no PAGEMAP_SCAN."""
    import fcntl
    import struct
    from array import array

    vec = array("Q", bytes(24 * _SCAN_REGIONS))  # struct page_region {start, end, categories}
    found: list[tuple[int, int]] = []
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        while start < end:
            # struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len,
            # max_pages, category_inverted, category_mask, category_anyof_mask, return_mask
            fields = (96, 0, start, end, 0, vec.buffer_info()[0], _SCAN_REGIONS, 0, 0)
            arg = bytearray(struct.pack("12Q", *fields, categories, 0, categories))
            count = fcntl.ioctl(fd, PAGEMAP_SCAN, arg, True)
            found.extend((vec[3 * i], vec[3 * i + 1]) for i in range(count))
            walk_end = struct.unpack_from("Q", arg, 32)[0]
            if walk_end <= start:
                break
            start = walk_end
    except OSError:
        return None
    finally:
        os.close(fd)
    return found


def pagemap_huge_bytes(start: int, end: int) -> int | None:
    """Bytes of [start, end) mapped by resident huge pages (THP or hugetlb),
    exactly, page by page; None when the kernel has no PAGEMAP_SCAN."""
    ranges = pagemap_ranges(start, end, PAGE_IS_PRESENT | PAGE_IS_HUGE)
    return None if ranges is None else sum(hi - lo for lo, hi in ranges)


# ---------------------------------------------------------------- residency

_RESIDENT = bytes(b & 1 for b in range(256))  # mincore: bit 0 of each byte


def resident_bytes(address: int, length: int) -> int:
    """Bytes of [address, address + length) in memory now (mincore), in base pages."""
    vector = residency(address, length)
    return (len(vector) - vector.translate(_RESIDENT).count(0)) * PAGE_SIZE


# ---------------------------------------------------------------- errors


def memlock_error(exc: OSError, length: int) -> Exception:
    """The exception a refused mlock of ``length`` bytes becomes: an AllocError
    naming RLIMIT_MEMLOCK and its value where the limit can be the reason, and
    vm.max_map_count where the limit cannot (no limit, or CAP_IPC_LOCK)."""
    if exc.errno not in (errno.ENOMEM, errno.EAGAIN, errno.EPERM):
        return exc
    soft, _hard = memlock_limit()
    reason = os.strerror(exc.errno or errno.ENOMEM)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        hint = (
            "RLIMIT_MEMLOCK does not bind here; locking part of a mapping splits it, "
            f"and the process may hold vm.max_map_count ({max_map_count()}) mappings"
        )
    else:
        hint = (
            f"RLIMIT_MEMLOCK is {soft} bytes; raise it with `ulimit -l` or setrlimit, "
            "or run with CAP_IPC_LOCK"
        )
    return AllocError(
        f"cannot lock {length} bytes in memory: {reason} ({hint})",
        errno=exc.errno or errno.ENOMEM,
        size=length,
    )


__all__ = [
    "ADVICE",
    "ADVICE_SINCE",
    "F_SEAL_FUTURE_WRITE",
    "F_SEAL_GROW",
    "F_SEAL_NAMES",
    "F_SEAL_SEAL",
    "F_SEAL_SHRINK",
    "F_SEAL_WRITE",
    "MADV_COLD",
    "MADV_COLLAPSE",
    "MADV_DODUMP",
    "MADV_DOFORK",
    "MADV_DONTDUMP",
    "MADV_DONTFORK",
    "MADV_DONTNEED",
    "MADV_FREE",
    "MADV_GUARD_INSTALL",
    "MADV_GUARD_REMOVE",
    "MADV_HUGEPAGE",
    "MADV_KEEPONFORK",
    "MADV_NOHUGEPAGE",
    "MADV_NORMAL",
    "MADV_PAGEOUT",
    "MADV_POPULATE_READ",
    "MADV_POPULATE_WRITE",
    "MADV_RANDOM",
    "MADV_SEQUENTIAL",
    "MADV_WILLNEED",
    "MADV_WIPEONFORK",
    "MAP_HUGETLB",
    "MAP_HUGE_SHIFT",
    "MAP_NORESERVE",
    "MFD_ALLOW_SEALING",
    "MFD_CLOEXEC",
    "MFD_EXEC",
    "MFD_HUGETLB",
    "MFD_NOEXEC_SEAL",
    "PAGEMAP_SCAN",
    "PAGE_IS_HUGE",
    "PAGE_IS_PRESENT",
    "PAGE_SIZE",
    "PROT_EXEC",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "RUN_DONTFORK",
    "RUN_GUARD",
    "HugePagePool",
    "Mapping",
    "SmapsEntry",
    "alloc_error",
    "default_hugepage_size",
    "fd_target",
    "format_size",
    "fstat_named",
    "hugepage_dir",
    "hugepage_pool",
    "hugepage_pools",
    "hugetlb_hint",
    "mapping_count",
    "mappings",
    "max_map_count",
    "memfd_noexec",
    "meminfo",
    "memlock_error",
    "memlock_limit",
    "memory_available",
    "memory_ceiling",
    "overcommit_mode",
    "pagemap_huge_bytes",
    "pagemap_ranges",
    "read_int",
    "read_text",
    "resident_bytes",
    "shmem_thp_mode",
    "smaps",
    "sysfs_choice",
    "thp_mode",
    "thp_size",
]
