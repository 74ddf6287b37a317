"""The platform adapter: permission tables, errno translation, /proc readers.

Everything the public modules need to know about the operating system is
asked here, so that they read as policy.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from . import _mman
from .exceptions import AllocError
from .perm import Perm

PAGE_SIZE: int = _mman.page_size()

PLATFORMS = ("linux", "darwin", "win32")
"""The platforms whose permission rules are known (see effective_perms)."""

_RW = Perm.READ | Perm.WRITE
_RWX = Perm.READ | Perm.WRITE | Perm.EXEC

# Requested -> in force, where a platform cannot give exactly what was asked.
# Every entry grants at least the requested permissions (never more restrictive).
_FALLBACKS: dict[str, dict[Perm, Perm]] = {
    "linux": {},
    # Apple's pmap cannot express write without read.
    "darwin": {Perm.WRITE: _RW, Perm.WRITE | Perm.EXEC: _RWX},
    # VirtualAlloc has no write-only page protection (PAGE_READWRITE, PAGE_EXECUTE_READWRITE).
    "win32": {Perm.WRITE: _RW, Perm.WRITE | Perm.EXEC: _RWX},
}


def effective_perms(requested: Perm, platform: str = sys.platform) -> Perm:
    """The permissions in force when ``requested`` is asked for on ``platform``.

    A combination the platform supports is used exactly; one it does not is
    replaced by one that is no more restrictive.
    """
    key = "linux" if platform.startswith("linux") else platform
    try:
        table = _FALLBACKS[key]
    except KeyError:
        raise ValueError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}") from None
    requested = Perm(requested)
    return table.get(requested, requested)


def alloc_error(exc: OSError, size: int, huge_pagesize: int | None = None) -> Exception:
    """The exception a failed mapping of ``size`` bytes becomes.

    ENOMEM (and EAGAIN, a locked-memory refusal) is an AllocError; anything
    else stays the OSError it was.
    """
    if exc.errno not in (errno.ENOMEM, errno.EAGAIN):
        return exc
    message = f"cannot map {size} bytes: {os.strerror(exc.errno or errno.ENOMEM)}"
    if huge_pagesize is not None:
        message += (
            f"; the pool of {format_size(huge_pagesize)} huge pages may be empty: reserve pages "
            f"with `echo N > {hugepage_dir(huge_pagesize)}/nr_hugepages` (as root)"
        )
    return AllocError(message, errno=exc.errno or errno.ENOMEM, size=size)


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it exactly."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------- /proc, /sys

_HUGEPAGES = Path("/sys/kernel/mm/hugepages")


def hugepage_dir(size: int) -> Path:
    """The sysfs folder of the hugetlb pool of pages of ``size`` bytes."""
    return _HUGEPAGES / f"hugepages-{size // 1024}kB"


@dataclass(frozen=True)
class HugePagePool:
    """A hugetlb pool: page size, pages reserved and pages free."""

    size: int
    reserved: int
    free: int


def hugepage_pools() -> list[HugePagePool]:
    """The hugetlb page sizes this kernel supports, smallest first."""
    pools = []
    try:
        entries = list(_HUGEPAGES.iterdir())
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
        return Path(path).read_text().strip()
    except OSError:
        return default


def read_int(path: str | Path, default: int) -> int:
    """A kernel file holding one integer, or ``default``."""
    text = read_text(path)
    try:
        return int(text)
    except ValueError:
        return default


def thp_mode() -> str:
    """The transparent huge page mode: always, madvise, never (or unknown)."""
    text = read_text("/sys/kernel/mm/transparent_hugepage/enabled")
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


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
                    Perm.parse(flags[:3]),
                    flags[3] == "p",
                    fields[5].strip() if len(fields) > 5 else "",
                )
            )
    return result


def mapping_count() -> int:
    """How many mappings the process holds now."""
    with open("/proc/self/maps", "rb") as maps:
        return sum(1 for _ in maps)


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
_PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16  # _IOWR('f', 16, struct pm_scan_arg)
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_HUGE = 1 << 6
_SCAN_REGIONS = 64


def pagemap_huge_bytes(start: int, end: int) -> int | None:
    """Bytes of [start, end) mapped by resident huge pages (THP or hugetlb),
    exactly, page by page; None when the kernel has no PAGEMAP_SCAN."""
    import fcntl
    import struct
    from array import array

    vec = array("Q", bytes(24 * _SCAN_REGIONS))  # struct page_region {start, end, categories}
    wanted = _PAGE_IS_PRESENT | _PAGE_IS_HUGE
    total = 0
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    except OSError:
        return None
    try:
        while start < end:
            # struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len,
            # max_pages, category_inverted, category_mask, category_anyof_mask, return_mask
            fields = (96, 0, start, end, 0, vec.buffer_info()[0], _SCAN_REGIONS, 0, 0, wanted)
            arg = bytearray(struct.pack("12Q", *fields, 0, wanted))
            count = fcntl.ioctl(fd, _PAGEMAP_SCAN, arg, True)
            for i in range(count):
                total += vec[3 * i + 1] - vec[3 * i]
            walk_end = struct.unpack_from("Q", arg, 32)[0]
            if walk_end <= start:
                break
            start = walk_end
    except OSError:
        return None
    finally:
        os.close(fd)
    return total
