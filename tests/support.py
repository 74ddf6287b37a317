"""Helpers for the tests: what the kernel says about our mappings, and child processes."""

from __future__ import annotations

import faulthandler
import os
import random
import signal
import sys
from collections.abc import Callable, Container

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE, mappings


def perms_at(address: int) -> Perm | None:
    """The permissions /proc/self/maps shows at ``address``, or None if unmapped."""
    for m in mappings():
        if m.start <= address < m.end:
            return m.perms
    return None


def kernel_runs(region: Region) -> list[tuple[int, int, Perm]]:
    """(offset, length, perms) of the capacity as /proc/self/maps shows it,
    adjacent equal runs merged, read independently of Region.protections()."""
    start, end = region.address, region.address + region.capacity
    runs: list[tuple[int, int, Perm]] = []
    for m in mappings():
        lo, hi = max(m.start, start), min(m.end, end)
        if lo >= hi:
            continue
        if runs and runs[-1][2] == m.perms and runs[-1][0] + runs[-1][1] == lo - start:
            runs[-1] = (runs[-1][0], hi - start - runs[-1][0], m.perms)
        else:
            runs.append((lo - start, hi - lo, m.perms))
    return runs


def mapped_intervals(
    anonymous_only: bool = False, perms: Container[Perm] | None = None
) -> list[tuple[int, int]]:
    """The address ranges mapped now, adjacent ranges joined.

    ``perms`` keeps only mappings with one of those permissions: tests map
    pages unlike the interpreter's own (rw-), which may map arenas meanwhile.
    """
    joined: list[tuple[int, int]] = []
    for m in mappings():
        if anonymous_only and m.name:
            continue
        if perms is not None and m.perms not in perms:
            continue
        if joined and joined[-1][1] == m.start:
            joined[-1] = (joined[-1][0], m.end)
        else:
            joined.append((m.start, m.end))
    return joined


def subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` not covered by ``minus`` (both sorted, disjoint)."""
    result = []
    for start, end in ranges:
        cursor = start
        for lo, hi in minus:
            if hi <= cursor or lo >= end:
                continue
            if lo > cursor:
                result.append((cursor, lo))
            cursor = max(cursor, hi)
        if cursor < end:
            result.append((cursor, end))
    return result


def vm_flags(address: int) -> set[str]:
    """The VmFlags /proc/self/smaps shows for the mapping holding ``address``
    (two-letter codes: "dc" dontfork, "dd" dontdump, "wf" wipeonfork, "hg"
    hugepage, "nh" nohugepage, "rr" random, "sr" sequential, "lo" locked,
    "lf" locked on fault), read here independently of the library."""
    inside = False
    with open("/proc/self/smaps") as lines:
        for line in lines:
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):
                lo, _, hi = key.partition("-")
                inside = int(lo, 16) <= address < int(hi, 16)
            elif inside and key == "VmFlags:":
                return set(rest.split())
    raise AssertionError(f"nothing is mapped at 0x{address:x}")


def is_mapped(start: int, end: int) -> bool:
    """Whether any byte of [start, end) is mapped."""
    return any(m.start < end and start < m.end for m in mappings())


def rss() -> int:
    """The resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` reproducible bytes, none of them zero, different on every page."""
    return random.Random(seed).randbytes(n).translate(_NO_ZERO)


_NO_ZERO = bytes.maketrans(b"\0", b"\1")


def adjacent_pair(alloc: MapAlloc, first: int, second: int) -> tuple[Region, Region]:
    """Two regions of ``first`` and ``second`` bytes, the second starting
    right where the first one's capacity ends."""
    spares: list[Region] = []
    try:
        for _ in range(64):
            b = alloc.alloc(second)
            a = alloc.alloc(first)
            if a.address + a.capacity == b.address:
                return a, b
            spares += (a, b)
        raise AssertionError("the kernel never placed two mappings next to each other")
    finally:
        for spare in spares:
            spare.close()


def run_in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; return its exit status (0 = body returned,
    1 = it raised, or -N when killed by signal N). Output of the child is kept."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        faulthandler.disable()  # a crash on purpose needs no traceback
        code = 0
        try:
            body()
        except BaseException:
            code = 1  # first: printing may fail (a child that dropped privileges cannot import)
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


SIGSEGV = -signal.SIGSEGV
