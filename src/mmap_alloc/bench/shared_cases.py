"""Benchmark cases of shared memory: SharedRegion against the standard
library's ``multiprocessing.shared_memory`` and against pickling.

- create + attach + close of a segment;
- handing a float64 array (1 GiB; quick runs 64 MiB) to a worker process that
  is already running (a spawned ``Pool(1)`` made before timing, kept across
  rounds), which reads one value, or the sum, back: the handover is what is
  timed, not the start of a process;
- growing a filled segment from 1 MiB to 1 GiB (quick runs 16 MiB) by
  doubling: SharedRegion.resize() against a new ``SharedMemory`` segment and a
  copy at each step (shared_memory cannot grow).

The worker functions live here at module level: spawned workers import them.
Big buffers are made on first use (the warm-up round), not when the cases
are listed, and freed when the last case of the group is closed.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import multiprocessing
from collections.abc import Callable, Iterator
from multiprocessing.pool import Pool
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any

from .._linux import format_size
from ..shared import SharedRegion
from .cases import Scale, fill_by_doubling
from .harness import Case, Variant

if TYPE_CHECKING:
    from numpy.typing import NDArray

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
GROUP = "shared memory"
OURS = "mmap_alloc SharedRegion"
STDLIB = "shared_memory"
PICKLE = "pickle through a Pipe"


# ---------------------------------------------------------------- worker side


def _array(buffer: Any, count: int) -> NDArray[Any]:
    import numpy as np

    return np.frombuffer(buffer, np.float64, count)


def read_back(array: NDArray[Any], total: bool) -> float:
    """What a worker reads back of a float64 array: its sum (``total``: every
    byte read), else its last value."""
    return float(array.sum() if total else array[-1])


def region_read_back(region: SharedRegion, count: int, total: bool) -> float:
    """``read_back`` of the float64 array at the start of a region."""
    value = read_back(region.ndarray("float64", count), total)
    region.close()
    return value


def _attach_shm(name: str) -> SharedMemory:
    # A worker that multiprocessing started shares its parent's resource
    # tracker, so attaching registers nothing new (no workaround needed here)
    return SharedMemory(name=name)


def shm_read_back(name: str, count: int, total: bool) -> float:
    """``read_back`` of the float64 array at the start of a SharedMemory segment."""
    shm = _attach_shm(name)
    array = _array(shm.buf, count)
    value = read_back(array, total)
    del array
    shm.close()
    return value


# ---------------------------------------------------------------- parent side


def create_shm(size: int) -> SharedMemory:
    """A new SharedMemory segment of ``size`` bytes. One whose mmap fails (a
    low RLIMIT_AS) unregisters a name it never registered, and the resource
    tracker prints a KeyError traceback (CPython 3.11-3.13): where the address
    space cannot hold it, OSError before it is created."""
    mmap.mmap(-1, size).close()
    return SharedMemory(create=True, size=size)


class _Handover:
    """The worker and the three copies of the array, made on first use and
    freed when every case that shares them has been closed."""

    def __init__(self, nbytes: int, users: int) -> None:
        self.count = nbytes // 8
        self.users = users
        self._pool: Pool | None = None
        self._region: SharedRegion | None = None
        self._shm: SharedMemory | None = None
        self._array: NDArray[Any] | None = None

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
            self._pool.apply(int)  # started and ready
        return self._pool

    def region(self) -> SharedRegion:
        if self._region is None:
            region = SharedRegion.create(self.count * 8)
            region.ndarray("float64", self.count)[:] = 1.0
            self._region = region
        return self._region

    def shm(self) -> SharedMemory:
        if self._shm is None:
            shm = create_shm(self.count * 8)
            array = _array(shm.buf, self.count)
            array.setflags(write=True)
            array[:] = 1.0
            del array
            self._shm = shm
        return self._shm

    def array(self) -> NDArray[Any]:
        if self._array is None:
            import numpy as np

            self._array = np.ones(self.count)
        return self._array

    def variants(self, *, total: bool, pickle: bool) -> tuple[Variant, ...]:
        def ours(n: int) -> None:
            region, pool = self.region(), self.pool
            for _ in range(n):
                pool.apply(region_read_back, (region, self.count, total))

        def stdlib(n: int) -> None:
            name, pool = self.shm().name, self.pool
            for _ in range(n):
                pool.apply(shm_read_back, (name, self.count, total))

        def pickled(n: int) -> None:
            array, pool = self.array(), self.pool
            for _ in range(n):
                pool.apply(read_back, (array, total))
                # the worker frees its copy after it answers, the pool's thread the
                # pickle after it sends it: wait for both, so that this variant pays
                # for its own garbage, not the next variant of the round
                pool.apply(int)

        variants = [Variant(OURS, ours), Variant(STDLIB, stdlib)]
        if pickle:
            variants.append(Variant(PICKLE, pickled))
        return tuple(variants)

    def close(self) -> None:
        self.users -= 1
        if self.users > 0:
            return
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
        if self._region is not None:
            self._region.close()
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
        self._pool = self._region = self._shm = self._array = None


_HANDOVERS: tuple[tuple[str, int, bool, bool, str, float, str], ...] = (
    # what the worker reads back, n, total, pickle, reference, target, end of the note
    ("read one value back", 1, False, True, PICKLE, 0.01, "; target: 100x faster than pickling"),
    ("read one value back, vs shared_memory", 5, False, False, STDLIB, 1.10, ""),
    ("read its sum back", 1, True, True, STDLIB, 1.10, "; the worker reads every byte"),
)
"""The handover cases, one a row: how many handovers a batch makes, whether
the worker sums the array (``total``) and a pickling variant runs (``pickle``)."""


def handover(scale: Scale) -> Iterator[Case]:
    """Hand a float64 array to a running worker: SharedRegion against
    SharedMemory and against pickling the array through the pool's pipe."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return
    nbytes = 64 * MiB if scale.quick else GiB
    shared = _Handover(nbytes, users=len(_HANDOVERS))
    size = format_size(nbytes)
    for what, n, total, pickle, reference, target, note in _HANDOVERS:
        yield Case(
            f"shared: hand a {size} float64 array to a worker, {what}",
            GROUP,
            n,
            shared.variants(total=total, pickle=pickle),
            subject=OURS,
            reference=reference,
            target=target,
            note=f"spawned Pool(1) made before timing; per handover{note}",
            close=shared.close,
        )


def create_attach_close(scale: Scale) -> Iterator[Case]:
    """Make a segment, map it a second time as another process would, close
    both; and the same with every page written once (where shared_memory
    finds its pages, at first touch)."""
    memset = _memset()
    for size in (4 * KiB, MiB):

        def ours(n: int, size: int = size, write: bool = False) -> None:
            for _ in range(n):
                region = SharedRegion.create(size)
                peer = SharedRegion.from_fd(region.fd)
                if write:
                    memset(peer.address, 1, size)
                peer.close()
                region.close()

        def stdlib(n: int, size: int = size, write: bool = False) -> None:
            for _ in range(n):
                shm = create_shm(size)
                peer = SharedMemory(name=shm.name)
                if write:
                    fill(peer, 0, size)
                peer.close()
                shm.close()
                shm.unlink()

        yield Case(
            f"shared: create+attach+close {format_size(size)}",
            GROUP,
            scale.ops(500),
            (
                Variant(OURS, ours),
                Variant(STDLIB, stdlib),
                Variant(f"{OURS}, every page written", functools.partial(ours, write=True)),
                Variant(f"{STDLIB}, every page written", functools.partial(stdlib, write=True)),
            ),
            note="SharedRegion backs every page at create; shared_memory at first touch",
        )


def _buf(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    assert buf is not None
    return buf


def _memset() -> Callable[[int, int, int], object]:
    return ctypes.memset


def fill(shm: SharedMemory, offset: int, length: int) -> None:
    """memset ``length`` bytes of a SharedMemory segment at ``offset`` to 1."""
    view = (ctypes.c_char * shm.size).from_buffer(_buf(shm))
    ctypes.memset(ctypes.addressof(view) + offset, 1, length)
    del view


def shared_growth(scale: Scale) -> Iterator[Case]:
    """Grow a filled segment by doubling, writing each new half."""
    start, end = MiB, 16 * MiB if scale.quick else GiB

    def ours(n: int) -> None:
        for _ in range(n):
            region = SharedRegion.create(start)
            fill_by_doubling(region, region.resize, start, end)
            region.close()

    def stdlib(n: int) -> None:
        for _ in range(n):
            shm = create_shm(start)
            fill(shm, 0, start)
            size = start
            while size < end:
                bigger = create_shm(size * 2)
                _buf(bigger)[:size] = _buf(shm)[:size]
                shm.close()
                shm.unlink()
                shm = bigger
                fill(shm, size, size)
                size *= 2
            shm.close()
            shm.unlink()

    yield Case(
        f"shared: growth by doubling {format_size(start)} -> {format_size(end)}",
        GROUP,
        1,
        (Variant(OURS, ours), Variant(STDLIB, stdlib)),
        target=1.0,
        note="resize (fallocate + mremap) against a new segment and a copy per step",
    )


def shared_memory_cases(scale: Scale) -> Iterator[Case]:
    """Every case of this module, in the order of the report."""
    yield from create_attach_close(scale)
    yield from handover(scale)
    yield from shared_growth(scale)
