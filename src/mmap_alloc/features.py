"""What the running kernel offers: one probe per feature the library uses or will use.

Each probe tries the feature for real where that is cheap and harmless (a
system call on a page of its own, an ioctl, a file under /proc or /sys),
and answers with a :class:`Feature`: its name, whether it is available, and
a detail that says why when it is missing, or the value when one matters.

A probe never raises, and runs once per process (``functools.cache``): a
kernel does not gain system calls while it runs. Values that root can change
at run time (sysctls, THP modes, the hugetlb pools) are those of the first
call; :func:`clear_cache` makes the next call probe again.

    >>> from mmap_alloc import features
    >>> for feature in features.all_features():
    ...     print(feature.name, feature.available, feature.detail)
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

from ._linux import (
    MADV_COLLAPSE,
    MADV_GUARD_INSTALL,
    MADV_GUARD_REMOVE,
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MFD_CLOEXEC,
    MFD_EXEC,
    PAGE_IS_PRESENT,
    PAGE_SIZE,
    format_size,
    hugepage_pools,
    memfd_noexec,
    pagemap_ranges,
    shmem_thp_mode,
    thp_mode,
    thp_size,
)
from ._mman import secret_memory_fd as kernel_memfd_secret

__all__ = [
    "Feature",
    "all_features",
    "clear_cache",
    "hugetlb",
    "madv_collapse",
    "madv_guard_install",
    "madv_populate",
    "memfd_exec",
    "memfd_secret",
    "pagemap_scan",
    "shmem_thp",
    "thp",
]


@dataclass(frozen=True)
class Feature:
    """One kernel feature: whether this process can use it, and why not or with what value."""

    name: str
    available: bool
    detail: str

    def __str__(self) -> str:
        if self.available:
            return "available" + (f" ({self.detail})" if self.detail else "")
        return f"missing: {self.detail}"


def _errno_text(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{code}: {exc.strerror}" if exc.strerror else code


def _anonymous(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _address(mapping: mmap.mmap) -> int:
    """The address of a stdlib mapping (the ctypes object is gone when this returns,
    so the mapping can still be closed)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def _kernel_can_read(address: int) -> bool:
    """Whether the kernel can read the byte at ``address`` (a write(2) of it
    into a pipe: EFAULT, not a signal, where it cannot)."""
    libc = ctypes.CDLL(None, use_errno=True)
    read_end, write_end = os.pipe()
    try:
        done = libc.write(write_end, ctypes.c_void_p(address), ctypes.c_size_t(1))
        return bool(done == 1 or ctypes.get_errno() != errno.EFAULT)
    finally:
        os.close(read_end)
        os.close(write_end)


def _kernel_knows(
    name: str, advice: int, size: int = 2 * PAGE_SIZE, touch: bool = False
) -> str | None:
    """None if madvise ``advice`` succeeds on a private anonymous page, else why not."""
    mapping = _anonymous(size)
    try:
        if touch:
            mapping[0] = 1
        mapping.madvise(advice, 0, size)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return "EINVAL"
        return f"{name} failed: {_errno_text(exc)}"
    finally:
        mapping.close()
    return None


def _probe(check: Callable[[], Feature]) -> functools._lru_cache_wrapper[Feature]:
    """``check`` as a probe: run once per process (until clear_cache), and an
    exception it raises answered as a missing feature named after it, since a
    probe reports and never raises."""

    @functools.cache
    @functools.wraps(check)
    def probe() -> Feature:
        try:
            return check()
        except Exception as exc:
            return Feature(check.__name__, False, f"probe failed: {exc}")

    return probe


# ---------------------------------------------------------------- probes


@_probe
def memfd_secret() -> Feature:
    """memfd_secret(2): memory removed from the kernel's direct map (Linux 5.14)."""
    name = "memfd_secret"
    try:
        os.close(kernel_memfd_secret(0))
    except OSError as exc:
        if exc.errno == errno.ENOSYS:
            reason = "kernel lacks memfd_secret (needs Linux 5.14 and secretmem.enable)"
        else:
            reason = f"memfd_secret(0) failed: {_errno_text(exc)}"
        return Feature(name, False, reason)
    return Feature(name, True, "system call 447")


@_probe
def madv_guard_install() -> Feature:
    """MADV_GUARD_INSTALL: guard pages without a mapping of their own (Linux 6.13)."""
    name = "madv_guard_install"
    try:
        mapping = _anonymous(2 * PAGE_SIZE)
        try:
            mapping.madvise(MADV_GUARD_INSTALL, 0, PAGE_SIZE)
            guarded = not _kernel_can_read(_address(mapping))
            mapping.madvise(MADV_GUARD_REMOVE, 0, PAGE_SIZE)
        finally:
            mapping.close()
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return Feature(name, False, "needs Linux 6.13")
        return Feature(name, False, f"MADV_GUARD_INSTALL failed: {_errno_text(exc)}")
    if not guarded:
        # qemu-user, for one, answers success to advice it does not carry out
        return Feature(name, False, "MADV_GUARD_INSTALL was accepted but the page stayed readable")
    return Feature(name, True, f"madvise advice {MADV_GUARD_INSTALL}")


@_probe
def madv_populate() -> Feature:
    """MADV_POPULATE_READ / MADV_POPULATE_WRITE: fault pages in with one call (Linux 5.14)."""
    name = "madv_populate"
    for advice_name, advice in (
        ("MADV_POPULATE_READ", MADV_POPULATE_READ),
        ("MADV_POPULATE_WRITE", MADV_POPULATE_WRITE),
    ):
        problem = _kernel_knows(advice_name, advice)
        if problem == "EINVAL":
            return Feature(name, False, f"kernel refuses {advice_name}: needs Linux 5.14")
        if problem is not None:
            return Feature(name, False, problem)
    return Feature(name, True, f"advice {MADV_POPULATE_READ} and {MADV_POPULATE_WRITE}")


@_probe
def madv_collapse() -> Feature:
    """MADV_COLLAPSE: make a range into transparent huge pages now (Linux 6.1)."""
    name = "madv_collapse"
    try:
        mapping = _anonymous(2 * thp_size())
        try:
            offset = -_address(mapping) % thp_size()
            mapping[offset] = 1  # a range with no page at all is refused with EINVAL too
            mapping.madvise(MADV_COLLAPSE, offset, thp_size())
        finally:
            mapping.close()
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return Feature(
                name, False, "kernel refuses MADV_COLLAPSE: needs Linux 6.1 with THP built in"
            )
        # EAGAIN, ENOMEM, EBUSY: the kernel knows the advice, this collapse did not happen
        return Feature(name, True, f"known to the kernel; the probe's collapse: {_errno_text(exc)}")
    return Feature(name, True, "collapsed a 2 MiB range")


@_probe
def memfd_exec() -> Feature:
    """Executable memfds: vm.memfd_noexec (Linux 6.3) and memfd_create(MFD_EXEC)."""
    available, detail = _memfd_exec()
    return Feature("memfd_exec", available, detail)


_NOEXEC_MEANING = {
    0: "executable memfds allowed",
    1: "memfds are noexec unless created with MFD_EXEC",
    2: "executable memfds refused",
}


def _memfd_exec() -> tuple[bool, str]:
    noexec = memfd_noexec()  # None before Linux 6.3
    setting = "" if noexec is None else f"vm.memfd_noexec = {noexec}: "
    setting += _NOEXEC_MEANING.get(noexec, "unknown value") if noexec is not None else ""
    try:
        os.close(os.memfd_create("mmap_alloc-probe", MFD_CLOEXEC | MFD_EXEC))
    except OSError as exc:
        if noexec is None and exc.errno == errno.EINVAL:
            return True, "kernel before 6.3: memfds are executable, MFD_EXEC unknown"
        tried = f"memfd_create(MFD_EXEC) failed: {_errno_text(exc)}"
        return False, f"{setting}; {tried}" if setting else tried
    if noexec is None:
        return True, "MFD_EXEC accepted (no vm.memfd_noexec)"
    return noexec < 2, f"{setting}; MFD_EXEC accepted"


def _thp_setting(
    name: str, setting: str, mode: str | None, usable: tuple[str, ...], missing: str
) -> Feature:
    """A THP feature from its sysfs ``setting`` in ``mode`` (None: the kernel
    lacks it, which ``missing`` says): available in the ``usable`` modes, the
    last of which is what root can set."""
    if mode is None:
        return Feature(name, False, missing)
    if mode in usable:
        return Feature(name, True, f"{setting} = {mode}")
    return Feature(name, False, f"{setting} = {mode} (root can set {usable[-1]})")


@_probe
def shmem_thp() -> Feature:
    """Transparent huge pages for shared memory (memfd, tmpfs)."""
    return _thp_setting(
        "shmem_thp",
        "shmem_enabled",
        shmem_thp_mode(),
        ("always", "within_size", "advise"),
        "no shmem_enabled: kernel without shmem THP",
    )


@_probe
def thp() -> Feature:
    """Transparent huge pages for anonymous memory."""
    mode = thp_mode()
    return _thp_setting(
        "thp",
        "enabled",
        None if mode == "unknown" else mode,
        ("always", "madvise"),
        "no transparent_hugepage/enabled: kernel without THP",
    )


@_probe
def hugetlb() -> Feature:
    """hugetlb pages: available when a pool has free pages; the detail lists every pool."""
    name = "hugetlb"
    pools = hugepage_pools()
    if not pools:
        return Feature(name, False, "no pools: kernel without hugetlbfs")
    listing = "; ".join(
        f"{format_size(pool.size)}: {pool.free} free of {pool.reserved}" for pool in pools
    )
    if any(pool.free for pool in pools):
        return Feature(name, True, listing)
    return Feature(
        name,
        False,
        f"no free pages ({listing}); as root: echo 8 > /proc/sys/vm/nr_hugepages",
    )


@_probe
def pagemap_scan() -> Feature:
    """The PAGEMAP_SCAN ioctl of /proc/self/pagemap: page categories of a range (Linux 6.7)."""
    name = "pagemap_scan"
    mapping = _anonymous(PAGE_SIZE)
    try:
        mapping[0] = 1
        start = _address(mapping)
        found = pagemap_ranges(start, start + PAGE_SIZE, PAGE_IS_PRESENT)
    finally:
        mapping.close()
    if found is None:
        return Feature(name, False, "needs Linux 6.7")
    if found != [(start, start + PAGE_SIZE)]:
        return Feature(name, False, f"PAGEMAP_SCAN answered {found} for one present page")
    return Feature(name, True, "ioctl on /proc/self/pagemap")


PROBES: tuple[functools._lru_cache_wrapper[Feature], ...] = (
    memfd_secret,
    madv_guard_install,
    madv_populate,
    madv_collapse,
    memfd_exec,
    shmem_thp,
    pagemap_scan,
    thp,
    hugetlb,
)
"""Every probe, in the order ``all_features()`` and ``info`` list them."""


def all_features() -> list[Feature]:
    """Every probe's answer."""
    return [probe() for probe in PROBES]


def clear_cache() -> None:
    """Forget every answer, so that the next call of a probe probes again."""
    for probe in PROBES:
        probe.cache_clear()
