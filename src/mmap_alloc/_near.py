"""Placement near an address: where a mapping may go so that every byte of it
lies less than ``within`` bytes from ``near``.

x86-64 ``call rel32`` and ``jmp rel32`` reach 2 GiB either way, arm64 ``b``
and ``bl`` 128 MiB: generated code that calls into libc or the interpreter
must sit that close to its targets. The search reads the gaps between the
process's mappings (/proc/self/maps, through _linux), orders the places it
could use nearest first, and hands each to a mapping call (one C call that
maps with MAP_FIXED_NOREPLACE at exactly that address and checks where the
kernel put it). Nothing that is mapped is ever replaced: a place another
thread took meanwhile fails with EEXIST, and the search reads the gaps again.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from typing import TypeVar

from ._args import integer
from ._linux import (
    PAGE_SIZE,
    USER_ADDRESS_END,
    Mapping,
    alloc_error,
    format_size,
    mappings,
    mmap_min_addr,
)
from .exceptions import AllocError

T = TypeVar("T")

DEFAULT_WITHIN = 1 << 31
"""The default reach: ``call rel32``/``jmp rel32`` (x86-64) reach 2 GiB either way."""

ADDRESS_LIMIT = 1 << 64

_SNAPSHOTS = 64
"""How many times the gaps are read again when other threads take places first."""


def check_near(near: object, within: object) -> tuple[int, int]:
    """``near`` and ``within`` as ints, with the library's messages."""
    if near is None:
        raise TypeError("within= needs near=: the address the result must lie close to")
    address = integer(near, "near")
    if not 0 <= address < ADDRESS_LIMIT:
        raise ValueError(f"near must be an address from 0 to 2**64 - 1, got {address}")
    reach = integer(within, "within")
    if reach <= 0:
        raise ValueError(f"within must be positive, got {reach}")
    return address, reach


def candidates(
    near: int,
    within: int,
    size: int,
    align: int,
    maps: Iterable[Mapping],
    *,
    low: int | None = None,
    high: int = USER_ADDRESS_END,
    margin: int = PAGE_SIZE,
) -> list[int]:
    """Addresses (multiples of ``align``) where ``size`` bytes fit in a gap of
    ``maps`` with every byte less than ``within`` from ``near``, closest first:
    one per gap, as close to ``near`` as the gap allows.

    Closest means: the range that starts at ``near`` (or, for an unaligned
    ``near``, the aligned one that holds it) when it is free, whatever its
    neighbours; else the smallest distance, the distance of a place being
    that of its byte furthest from ``near``. A place that keeps ``margin``
    bytes free next to the mappings around it is preferred when that costs
    at most ``margin`` of distance, so that the new mapping stays a line of
    its own in /proc/self/maps (the kernel merges alike neighbours); where
    it would cost more, or no such place is in reach, the new mapping may
    touch its neighbour. ``low`` and ``high`` bound the address space
    (vm.mmap_min_addr, the end of the user address space).
    """
    if low is None:
        low = mmap_min_addr()
    first = max(near - within + 1, low)  # the lowest byte allowed
    end = min(near + within, high)  # one past the highest byte allowed
    if end - first < size:
        return []
    at = near // align * align  # the place holding near, if size reaches it
    holds_near = first <= at and near < at + size <= end
    found: list[tuple[int, int, int]] = []  # (rank, key, address), one per gap
    for gap_start, gap_end in _gaps(maps, high):
        if holds_near and gap_start <= at and at + size <= gap_end:
            found.append((0, 0, at))
            continue
        best: tuple[int, int, int] | None = None
        for kept in (margin, 0):
            lo = max(first, gap_start + (kept if gap_start > 0 else 0))
            hi = min(end, gap_end - (kept if gap_end < high else 0))
            lowest = -(-lo // align) * align
            highest = (hi - size) // align * align
            if lowest > highest:
                continue
            ideal = (near - size // 2) // align * align  # centred on near
            address = min(max(ideal, lowest), highest)
            distance = max(abs(address - near), abs(address + size - 1 - near))
            touches = (address == gap_start > 0) or (address + size == gap_end < high)
            key = distance + (margin if touches else 0)
            if best is None or key < best[1]:
                best = (1, key, address)
        if best is not None:
            found.append(best)
    found.sort()
    return [address for _, _, address in found]


def _gaps(maps: Iterable[Mapping], high: int) -> list[tuple[int, int]]:
    """The unmapped ranges below ``high``, in address order."""
    gaps = []
    cursor = 0
    for m in sorted(maps, key=lambda m: m.start):
        if m.start >= high:
            break
        if m.start > cursor:
            gaps.append((cursor, m.start))
        cursor = max(cursor, m.end)
    if cursor < high:
        gaps.append((cursor, high))
    return gaps


PLACEMENT_ERRORS = frozenset(
    {errno.EEXIST, errno.EADDRNOTAVAIL, errno.ENOMEM, errno.EINVAL, errno.EPERM}
)
"""Refusals of a mapping at a chosen address that another address may avoid
(EPERM: below vm.mmap_min_addr; ENOMEM, EINVAL: past the address space)."""


def map_near(
    near: int,
    within: int,
    size: int,
    align: int,
    map_at: Callable[[int], T],
    what: str,
    translate: Callable[[OSError, int], Exception] = alloc_error,
) -> T:
    """``map_at(address)`` at the nearest place that fits, reading the gaps
    again when another thread took one first (``map_at`` raised EEXIST).

    ``map_at`` maps ``size`` bytes at exactly ``address`` or raises OSError:
    EEXIST (taken), EADDRNOTAVAIL (the kernel put it elsewhere: it predates
    MAP_FIXED_NOREPLACE), or another of PLACEMENT_ERRORS (the next place is
    tried); any other exception propagates. AllocError when no place in reach
    is free, or every one was refused (``translate`` makes the last refusal
    the error).
    """
    refusal: OSError | None = None
    for _ in range(_SNAPSHOTS):
        places = candidates(near, within, size, align, mappings())
        if not places:
            break
        taken = False
        for address in places:
            try:
                return map_at(address)
            except OSError as exc:
                if exc.errno == errno.EEXIST:  # another thread was first: read the gaps again
                    taken = True
                    break
                if exc.errno not in PLACEMENT_ERRORS:
                    raise
                refusal = exc
        if not taken:
            break
    else:
        raise AllocError(
            f"cannot place {what} of {size} bytes near 0x{near:x}: other threads took "
            f"every free place first, {_SNAPSHOTS} times",
            errno=errno.EEXIST,
            size=size,
        )
    reach = f"less than {format_size(within)} from 0x{near:x}"
    if refusal is None:
        raise AllocError(
            f"no free range of {size} bytes lies {reach} (for {what}): the address space "
            "there is taken; give a larger `within`, or a `near` with free space around it",
            size=size,
        )
    if refusal.errno == errno.EADDRNOTAVAIL:
        raise AllocError(
            f"cannot place {what} of {size} bytes {reach}: the kernel does not honour "
            "MAP_FIXED_NOREPLACE (needs Linux 4.17) and put the mapping elsewhere",
            errno=errno.EADDRNOTAVAIL,
            size=size,
        )
    error = translate(refusal, size)
    if isinstance(error, AllocError):
        raise AllocError(f"{error} ({what} {reach})", errno=error.errno, size=size) from None
    raise error
