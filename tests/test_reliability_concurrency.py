"""Concurrency: threads race every mutating operation against live exports.

Several threads share one world: regions of every kind (Region from MapAlloc,
SharedRegion and a second mapping of its file, an ObjectPool, a
SecretBuffer, a CodeHeap and its blocks). Each thread, from its own seeded
random stream, makes exports (memoryview, ``ndarray()``, ctypes
``from_buffer``, ``view()``, ``pool.view()``, ``SecretBuffer.open()``,
``CodeBlock.writer()``), touches memory through them (with the GIL held, and
without it: numpy loops, ``ctypes.memmove``, hashing), releases them, and
runs the mutating operations (realloc, close-and-replace, resize, refresh,
protect, advise, commit, uncommit, discard, grow and shrink in place, lock,
the secret's access, the pool's alloc and free, the code heap's alloc and
free). One more thread runs the cyclic collector every few milliseconds. A
refusal (BufferError, ValueError, OSError, ...) is fine; anything else, a
crash or a hang is not.

Each run is a child interpreter with faulthandler on, so that a SIGSEGV or
SIGBUS fails one test and shows every thread's Python stack with the seed.
The short form runs in the normal suite; the long form (``-m stress``)
runs ``MMAP_ALLOC_CONCURRENCY_SECONDS`` (default 1800) over many seeds.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pytest

from mmap_alloc import (
    CodeBlock,
    CodeHeap,
    MapAlloc,
    MapAllocError,
    ObjectPool,
    Perm,
    Region,
    SecretBuffer,
    SharedRegion,
    _mman,
)
from mmap_alloc._linux import PAGE_SIZE
from support import run_child

try:
    import numpy
except ImportError:  # numpy is optional: no array exports then
    numpy = None  # type: ignore[assignment]

PAGE = PAGE_SIZE
MIB = 1 << 20
R, W = Perm.READ, Perm.WRITE
RW = R | W
EXPECTED = (MapAllocError, ValueError, BufferError, TypeError, OSError, IndexError, RuntimeError)
"""What an operation may raise when another thread got in first."""
MAX_EXPORTS = 24
GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()


# ---------------------------------------------------------------- the world


@dataclass
class Export:
    """A live export: the object it came from, the buffer, and how to end it."""

    owner: object
    buffer: Any
    end: Callable[[], object] | None = None


@dataclass
class World:
    """What the threads share. Lists are replaced or appended to in single
    steps (atomic under the GIL); every slot may be closed by another thread
    at any time."""

    alloc: MapAlloc
    regions: list[Region]
    shared: list[SharedRegion]
    pool: list[ObjectPool]
    objects: list[int]
    secret: list[SecretBuffer]
    heap: list[CodeHeap]
    blocks: list[CodeBlock]
    exports: list[Export] = field(default_factory=list)


def make_world(max_size: int) -> World:
    alloc = MapAlloc()
    shared = SharedRegion.create(max(PAGE, max_size // 4), seal_shrink=False)
    heap = CodeHeap(1 << 20)
    pool = ObjectPool(64, slab_size=4 * PAGE)
    return World(
        alloc,
        [alloc.alloc(size) for size in (PAGE, 16 * PAGE, max_size)],
        [shared, SharedRegion.from_fd(shared.fd, require_seal=False)],
        [pool],
        pool.alloc_many(100),
        [SecretBuffer(PAGE, lock="best_effort")],
        [heap],
        [heap.alloc(256) for _ in range(4)],
    )


def teardown(world: World) -> None:
    """Release every export, close everything; must always work."""
    while world.exports:  # no loop variable: it would keep the last export alive
        end_export(world.exports.pop())
    gc.collect()
    for region in [*world.regions, *world.shared]:
        region.close()
    for pool in world.pool:
        pool.close()
    for secret in world.secret:
        secret.close()
    for heap in world.heap:
        heap.close()


def end_export(export: Export) -> None:
    try:
        if export.end is not None:
            export.end()
        elif isinstance(export.buffer, memoryview):
            export.buffer.release()
    except EXPECTED:
        pass


# ---------------------------------------------------------------- exports


def _size(rnd: random.Random, region: Region) -> tuple[int, int]:
    """A random (offset, length) inside the region's size."""
    size = region.size
    offset = rnd.randrange(size)
    return offset, rnd.randrange(1, size - offset + 1)


def export_memoryview(world: World, rnd: random.Random) -> Export:
    region = rnd.choice([*world.regions, *world.shared])
    return Export(region, memoryview(region))


def export_ndarray(world: World, rnd: random.Random) -> Export | None:
    if numpy is None:
        return None
    region = rnd.choice([*world.regions, *world.shared])
    offset, length = _size(rnd, region)
    return Export(region, region.ndarray(numpy.uint8, length, offset))


def export_ctypes(world: World, rnd: random.Random) -> Export:
    region = rnd.choice([*world.regions, *world.shared])
    n = rnd.randrange(1, region.size + 1)
    return Export(region, (ctypes.c_char * n).from_buffer(region))


def export_view(world: World, rnd: random.Random) -> Export:
    region = rnd.choice([*world.regions, *world.shared])
    offset, length = _size(rnd, region)
    return Export(region, region.view(offset, length))


def export_pool_view(world: World, rnd: random.Random) -> Export:
    pool = world.pool[0]
    return Export(pool, pool.view(rnd.choice(world.objects)))


def _entered(owner: object, manager: AbstractContextManager[memoryview]) -> Export:
    view = manager.__enter__()
    return Export(owner, view, lambda: manager.__exit__(None, None, None))


def export_secret(world: World, rnd: random.Random) -> Export:
    secret = world.secret[0]
    return _entered(secret, secret.open(write=rnd.random() < 0.5))


def export_code_writer(world: World, rnd: random.Random) -> Export:
    block = rnd.choice(world.blocks)
    return _entered(block, block.writer())


EXPORTS = [
    export_memoryview,
    export_ndarray,
    export_ctypes,
    export_view,
    export_pool_view,
    export_secret,
    export_code_writer,
]


# ---------------------------------------------------------------- touching memory


def _bytes_of(buffer: Any) -> memoryview:
    if isinstance(buffer, memoryview):
        return buffer.cast("B") if buffer.format != "B" else buffer
    return memoryview(buffer).cast("B")


def touch(world: World, rnd: random.Random, note: Callable[[str], None]) -> None:
    """Read or write through a live export, with the GIL or without it, while
    other threads may end it. Without a GIL the export leaves the list while
    it is used: a memoryview that another thread releases mid-access is a race
    in the program there (CPython 3.13's free-threaded memoryview does not
    guard it, and stdlib mmap crashes the same way)."""
    if GIL_ENABLED:
        if world.exports:
            _touch(rnd.choice(world.exports), rnd, note)
        return
    try:
        export = world.exports.pop(rnd.randrange(len(world.exports)))
    except (ValueError, IndexError):  # none, or another thread took the last
        return
    try:
        _touch(export, rnd, note)
    finally:
        world.exports.append(export)


def _touch(export: Export, rnd: random.Random, note: Callable[[str], None]) -> None:
    buffer = export.buffer
    with _bytes_of(buffer) as view:
        n = len(view)
        if n == 0:
            return
        way = rnd.randrange(7)
        note(f"touch way {way}: {type(buffer).__name__} of {export.owner!r} ({n} bytes)")
        if way == 0:  # GIL held: one byte
            if view.readonly:
                view[rnd.randrange(n)]
            else:
                view[rnd.randrange(n)] = rnd.randrange(256)
        elif way == 1:  # GIL held: a slice
            lo = rnd.randrange(n)
            hi = rnd.randrange(lo, n) + 1
            if view.readonly:
                bytes(view[lo:hi])
            else:
                view[lo:hi] = bytes(hi - lo)
        elif way == 2:  # no GIL: hashing reads it
            hashlib.sha256(view).digest()
        elif way == 3:  # no GIL: zlib reads it
            zlib.crc32(view)
        elif way in (4, 5) and not view.readonly:  # no GIL: ctypes writes it
            target = (ctypes.c_char * n).from_buffer(view)
            if way == 4:
                ctypes.memset(target, rnd.randrange(256), n)
            else:
                ctypes.memmove(target, bytes(min(n, 1 << 16)), min(n, 1 << 16))
            del target
        elif way == 6 and numpy is not None:  # no GIL: numpy loops over it
            array = numpy.frombuffer(view, numpy.uint8)
            if view.readonly:
                int(array.sum())
            else:
                array[:] = rnd.randrange(256)
            del array


def release(world: World, rnd: random.Random) -> None:
    if world.exports:
        index = rnd.randrange(len(world.exports))
        try:
            export = world.exports.pop(index)
        except IndexError:  # another thread took it first
            return
        end_export(export)


# ---------------------------------------------------------------- mutating operations


def _region(world: World, rnd: random.Random) -> Region:
    return rnd.choice(world.regions)


def _range(rnd: random.Random, region: Region) -> tuple[int, int | None]:
    pages = region.capacity // PAGE
    first = rnd.randrange(pages)
    return first * PAGE, rnd.choice([None, rnd.randrange(1, pages - first + 1) * PAGE])


def op_realloc(world: World, rnd: random.Random, max_size: int) -> None:
    index = rnd.randrange(len(world.regions))
    world.regions[index] = world.alloc.realloc(world.regions[index], rnd.randrange(1, max_size))


def op_replace(world: World, rnd: random.Random, max_size: int) -> None:
    index = rnd.randrange(len(world.regions))
    world.regions[index].close()
    world.regions[index] = world.alloc.alloc(rnd.randrange(1, max_size))


def op_protect(world: World, rnd: random.Random, max_size: int) -> None:
    region = rnd.choice([*world.regions, *world.shared])
    offset, length = _range(rnd, region)
    region.protect(rnd.choice([Perm.NONE, R, RW, RW]), offset, length)


def op_advise(world: World, rnd: random.Random, max_size: int) -> None:
    region = rnd.choice([*world.regions, *world.shared])
    offset, length = _range(rnd, region)
    advice = rnd.choice(
        ["dontneed", "willneed", "free", "cold", "pageout", "hugepage", "populate_write"]
    )
    region.advise(advice, offset, length)


def op_commit(world: World, rnd: random.Random, max_size: int) -> None:
    region = _region(world, rnd)
    offset, length = _range(rnd, region)
    world.alloc.commit(region, offset, length)


def op_uncommit(world: World, rnd: random.Random, max_size: int) -> None:
    region = _region(world, rnd)
    offset, length = _range(rnd, region)
    world.alloc.uncommit(region, offset, length)


def op_grow_in_place(world: World, rnd: random.Random, max_size: int) -> None:
    region = _region(world, rnd)
    world.alloc.grow_in_place(region, region.size + rnd.randrange(1, 4 * PAGE))


def op_shrink_in_place(world: World, rnd: random.Random, max_size: int) -> None:
    region = _region(world, rnd)
    world.alloc.shrink_in_place(region, max(1, region.size - rnd.randrange(1, 4 * PAGE)))


def op_lock(world: World, rnd: random.Random, max_size: int) -> None:
    region = _region(world, rnd)
    offset, length = _range(rnd, region)
    region.lock(offset, length)
    region.unlock(offset, length)


def op_shared_resize(world: World, rnd: random.Random, max_size: int) -> None:
    rnd.choice(world.shared).resize(rnd.randrange(1, max_size))


def op_shared_refresh(world: World, rnd: random.Random, max_size: int) -> None:
    rnd.choice(world.shared).refresh()


def op_shared_discard(world: World, rnd: random.Random, max_size: int) -> None:
    region = rnd.choice(world.shared)
    offset, length = _range(rnd, region)
    region.discard(offset, length)


def op_shared_replace(world: World, rnd: random.Random, max_size: int) -> None:
    old, peer = world.shared
    fresh = SharedRegion.create(rnd.randrange(1, max_size), seal_shrink=False)
    world.shared = [fresh, SharedRegion.from_fd(fresh.fd, require_seal=False)]
    old.close()
    peer.close()


def op_pool(world: World, rnd: random.Random, max_size: int) -> None:
    pool = world.pool[0]
    if rnd.random() < 0.5:
        world.objects.append(pool.alloc())
    elif world.objects:
        address = world.objects.pop(rnd.randrange(len(world.objects)))
        pool.free(address)


def op_pool_replace(world: World, rnd: random.Random, max_size: int) -> None:
    old = world.pool[0]
    fresh = ObjectPool(64, slab_size=4 * PAGE)
    objects = fresh.alloc_many(100)
    old.close()  # BufferError while a view lives: the old pool stays
    world.pool[0], world.objects[:] = fresh, objects


def op_secret(world: World, rnd: random.Random, max_size: int) -> None:
    secret = world.secret[0]
    choice = rnd.randrange(5)
    if choice == 0:
        secret.noaccess()
    elif choice == 1:
        secret.readonly()
    elif choice == 2:
        secret.readwrite()
    elif choice == 3:
        secret.write(b"x" * rnd.randrange(1, 64), rnd.randrange(64))
    else:
        secret.compare(bytes(secret.size))


def op_secret_replace(world: World, rnd: random.Random, max_size: int) -> None:
    old = world.secret[0]
    old.close()
    world.secret[0] = SecretBuffer(PAGE, lock="best_effort")


def op_code(world: World, rnd: random.Random, max_size: int) -> None:
    heap = world.heap[0]
    if rnd.random() < 0.4:
        world.blocks.append(heap.alloc(rnd.randrange(1, 4096)))
    elif rnd.random() < 0.5 and len(world.blocks) > 1:
        block = world.blocks.pop(rnd.randrange(len(world.blocks)))
        heap.free(block)
    else:
        block = rnd.choice(world.blocks)
        block.write(b"\xc3" * min(block.size, rnd.randrange(1, 64)))


def op_code_replace(world: World, rnd: random.Random, max_size: int) -> None:
    old = world.heap[0]
    fresh = CodeHeap(1 << 20)
    blocks = [fresh.alloc(256) for _ in range(4)]
    old.close()  # BufferError while a writer view lives: the old heap stays
    world.heap[0], world.blocks[:] = fresh, blocks


MUTATIONS: list[Callable[[World, random.Random, int], None]] = [
    op_realloc,
    op_replace,
    op_protect,
    op_advise,
    op_commit,
    op_uncommit,
    op_grow_in_place,
    op_shrink_in_place,
    op_lock,
    op_shared_resize,
    op_shared_refresh,
    op_shared_discard,
    op_shared_replace,
    op_pool,
    op_pool_replace,
    op_secret,
    op_secret_replace,
    op_code,
    op_code_replace,
]


# ---------------------------------------------------------------- the run


def step(world: World, rnd: random.Random, max_size: int, note: Callable[[str], None]) -> str:
    """One random action; its name. ``note`` tells what is being done (for a crash report)."""
    roll = rnd.random()
    if roll < 0.25:
        if len(world.exports) < MAX_EXPORTS:
            make = rnd.choice(EXPORTS)
            note(make.__name__)
            export = make(world, rnd)
            if export is not None:
                world.exports.append(export)
            return make.__name__
        return "full"
    if roll < 0.5:
        touch(world, rnd, note)
        return "touch"
    if roll < 0.6:
        note("release")
        release(world, rnd)
        return "release"
    operation = rnd.choice(MUTATIONS)
    note(operation.__name__)
    operation(world, rnd, max_size)
    return operation.__name__


class Notes:
    """What each thread is doing, in a file-backed mapping that outlives a
    crash of the process: the crash report says which export each thread
    was touching and which operation the others were in."""

    SLOT = 240

    def __init__(self, path: str, threads: int) -> None:
        import mmap

        with open(path, "w+b") as file:
            file.truncate(self.SLOT * threads)
            self._map = mmap.mmap(file.fileno(), self.SLOT * threads)

    def writer(self, index: int) -> Callable[[str], None]:
        start = index * self.SLOT

        def note(text: str) -> None:
            data = text.encode(errors="replace")[: self.SLOT - 1].ljust(self.SLOT - 1)
            self._map[start : start + self.SLOT - 1] = data

        return note

    @staticmethod
    def read(path: str) -> str:
        try:
            data = open(path, "rb").read()  # noqa: SIM115 - read once, closed by refcount
        except OSError:
            return "(no notes)"
        slots = [data[i : i + Notes.SLOT] for i in range(0, len(data), Notes.SLOT)]
        texts = [slot.rstrip(b" \0").decode(errors="replace") for slot in slots]
        return "\n".join(f"thread {i}: {text}" for i, text in enumerate(texts))


def race(seed: int, threads: int, seconds: float, max_size: int, notes: str) -> dict[str, int]:
    """``threads`` threads run random steps on one world for ``seconds``; each
    notes what it does in the file ``notes``."""
    import faulthandler

    faulthandler.enable(all_threads=True)
    # a hang: every thread's stack on stderr before run_race's timeout kills us
    faulthandler.dump_traceback_later(seconds + 90, exit=True)
    sys.setswitchinterval(1e-5)
    start = _mman.mapped_bytes()
    world = make_world(max_size)
    per_thread: list[dict[str, int]] = [{"steps": 0, "refused": 0} for _ in range(threads)]
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    log = Notes(notes, threads)

    def work(index: int) -> None:
        rnd = random.Random(seed * 1000 + index)
        note = log.writer(index)
        counts = per_thread[index]  # one dict per thread: no count is lost to a race
        while time.monotonic() < deadline and not errors:
            try:
                name = step(world, rnd, max_size, note)
                counts[name] = counts.get(name, 0) + 1
            except EXPECTED:
                counts["refused"] += 1
            except BaseException as exc:  # reported by the test with the seed
                import traceback

                errors.append(f"thread {index}: {traceback.format_exc()}")
                raise SystemExit from exc
            counts["steps"] += 1

    def collect() -> None:
        """The cyclic collector, every few milliseconds: a collection while
        the others run (and while one waits for the kernel lock) is where a
        dealloc that let it see a dead object went wrong."""
        while time.monotonic() < deadline and not errors:
            gc.collect()
            time.sleep(0.005)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    workers.append(threading.Thread(target=collect))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise AssertionError(f"seed {seed}: {errors[0]}")
    teardown(world)
    gc.collect()
    leaked = _mman.mapped_bytes() - start
    assert leaked == 0, f"seed {seed}: {leaked} bytes stayed mapped"
    totals: dict[str, int] = {}
    for counts in per_thread:
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def run_race(seed: int, threads: int, seconds: float, max_size: int) -> dict[str, int]:
    """One race in a child interpreter; fails with the seed and every
    thread's stack on a crash, a hang or an error."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        notes = os.path.join(folder, "notes")
        result = run_child(
            "test_reliability_concurrency",
            "race",
            seed,
            threads,
            seconds,
            max_size,
            notes,
            timeout=seconds + 120,
            env={"MALLOC_ARENA_MAX": "2"},
        )
        doing = Notes.read(notes)
    assert result.returncode == 0, (
        f"seed {seed}, {threads} threads, {seconds} s, regions up to {max_size} bytes: "
        f"child {_status(result.returncode)}\n--- what each thread did last ---\n{doing}"
        f"\n--- stderr ---\n{result.stderr[-8000:]}"
    )
    counts: dict[str, int] = result.value
    return counts


def _status(code: int) -> str:
    import signal

    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_threads_racing_mutations_against_exports_never_crash(seed: int) -> None:
    counts = run_race(seed, threads=2 + 2 * seed, seconds=8.0, max_size=8 * MIB)
    assert counts["steps"] > 1000, counts
    print(counts)


@pytest.mark.stress
def test_threads_racing_mutations_against_exports_never_crash_long() -> None:
    seconds = float(os.environ.get("MMAP_ALLOC_CONCURRENCY_SECONDS", "1800"))
    deadline = time.monotonic() + seconds
    totals: dict[str, int] = {"runs": 0}
    seed = 100
    while time.monotonic() < deadline:
        counts = run_race(seed, threads=2 + seed % 7, seconds=30.0, max_size=8 * MIB)
        for name, value in counts.items():
            totals[name] = totals.get(name, 0) + value
        totals["runs"] += 1
        seed += 1
    print(totals)
