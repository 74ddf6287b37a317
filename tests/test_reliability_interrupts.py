"""Interrupt everywhere: Python code that runs in the middle of a library call.

A signal handler, a finalizer run by the garbage collector, a trace or profile
hook, an atexit handler or a KeyboardInterrupt can run Python code on the
same thread at any bytecode of the library's Python layer, and at any
allocation of a garbage-collected object in its C layer. No lock stops that;
what keeps the interpreter alive is the rule that every change of
memory-safety state is one C call. This module checks the rule from the
outside:

- for every public operation, its Python-level path through the library is
  traced (``sys.settrace``) and, at every line of library code on it, either a
  KeyboardInterrupt is raised there, or each other public operation is run
  there on the same objects (as a signal handler or a finalizer would);
- every operation also runs with the collector forced to run at every
  allocation point inside the C layer, with a ``gc.callbacks`` hook that runs
  other operations during those collections;

and after each run: nothing crashed, every open region's record of page
protections equals /proc/self/maps, its export and pin counts equal the
buffers and functions alive, the pool handed out no address twice, and once
everything is freed no byte stays mapped. Each operation's runs happen in a
forked child, so a crash fails one test and names it.

The randomised form (SIGALRM at random moments, handlers calling the API) is
``test_random_signals_*``; its long form runs under ``-m stress``.
"""

from __future__ import annotations

import ctypes
import gc
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

import mmap_alloc
from machine_code import RET
from mmap_alloc import (
    CodeBlock,
    CodeHeap,
    FileRegion,
    FileTruncatedError,
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
from support import (
    HOST_MAPS,
    TOO_SLOW,
    emulated_skip,
    page_perms,
    read_maps,
    run_forked,
    skip_if_emulated,
)

try:
    import numpy
except ImportError:  # numpy is optional: no array exports then
    numpy = None  # type: ignore[assignment]

PAGE = PAGE_SIZE
R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
RW, RX = R | W, R | X
LIBRARY = str(Path(mmap_alloc.__file__).parent)
EXPECTED = (MapAllocError, ValueError, BufferError, TypeError, OSError, IndexError)
"""What a public call may raise when another call got in first; anything else is a bug."""

# Functions are made of RET (machine_code), which returns at once: nothing is
# ever called in this module, but a function needs executable pages to exist.
NoArgs = ctypes.CFUNCTYPE(None)


# ---------------------------------------------------------------- the world


@dataclass
class World:
    """The objects every operation works on: a few regions in different states,
    and a pool. Buffers and functions made by operations are kept here, so
    that the checks know what must be pinned."""

    alloc: MapAlloc
    code_alloc: MapAlloc
    regions: list[Region]
    pool: ObjectPool
    secret: SecretBuffer
    heap: CodeHeap
    blocks: list[CodeBlock]
    exports: list[tuple[object, Any]] = field(default_factory=list)
    functions: list[tuple[object, Any]] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)
    """Pool objects whose free is under way: a hook that runs right after the
    call returned (a signal handled at the call's end) may be handed them
    again before the operation took them off ``objects``."""
    shared: list[SharedRegion] = field(default_factory=list)
    """A shared region (not sealed against shrinking) and a second mapping of its file."""
    files: list[FileRegion] = field(default_factory=list)
    """File regions of one file: read/write, copy-on-write, and any opened since."""
    folder: str = ""
    cache_alloc: MapAlloc = field(default_factory=lambda: MapAlloc(cache=4))
    """An allocator with a mapping cache, and its regions (a plain one, a mixed one)."""
    cached: list[Region] = field(default_factory=list)
    inside: int = 0
    """How deep the world is inside library calls made by operations."""

    def region(self, index: int) -> Region:
        return self.regions[index % len(self.regions)]


def make_world() -> World:
    alloc, code_alloc = MapAlloc(), MapAlloc(exec=True)
    plain = alloc.alloc(3 * PAGE)
    plain[:] = b"\x11" * (3 * PAGE)
    mixed = alloc.alloc(4 * PAGE)
    mixed.protect(R, PAGE, PAGE)
    mixed.protect(Perm.NONE, 3 * PAGE, PAGE)
    reservation = alloc.reserve(4 * PAGE)
    reservation.protect(RW, PAGE, PAGE)
    code = code_alloc.alloc(PAGE)
    code[: len(RET)] = RET
    code.make_exec()
    world = World(
        alloc,
        code_alloc,
        [plain, mixed, reservation, code],
        ObjectPool(64, slab_size=PAGE),
        SecretBuffer.from_bytes(b"k" * 100, lock="best_effort"),
        heap := CodeHeap(1 << 20),
        [heap.alloc(64) for _ in range(3)],
    )
    for block in world.blocks:
        block.write(RET)
    world.functions.append((world.blocks[0], world.blocks[0].function(NoArgs)))
    world.functions.append((code, code.function(NoArgs)))
    world.objects.extend(world.pool.alloc_many(70))  # more than one slab
    shared = SharedRegion.create(3 * PAGE, seal_shrink=False)
    shared.protect(R, PAGE, PAGE)
    world.shared.extend((shared, SharedRegion.from_fd(shared.fd, require_seal=False)))
    world.folder = tempfile.mkdtemp(prefix="mmap_alloc-interrupts-")
    path = os.path.join(world.folder, "file")
    with open(path, "wb") as f:
        f.write(b"\x22" * (4 * PAGE))
    world.files.extend((FileRegion.open(path, "r+"), FileRegion.open(path, "c")))
    cache = world.cache_alloc
    world.cached.extend((cache.alloc(2 * PAGE), cache.alloc(2 * PAGE)))
    world.cached[0][:] = b"\x22" * (2 * PAGE)
    world.cached[1].protect(R, PAGE, PAGE)
    cache.dealloc(cache.alloc(2 * PAGE))  # one mapping in the cache from the start
    return world


def teardown(world: World) -> None:
    """Free everything; must always work."""
    world.exports.clear()
    world.functions.clear()
    gc.collect(1)
    for region in world.regions:
        region.close()
    world.pool.close()
    world.secret.close()
    world.heap.close()
    for region in [*world.shared, *world.files]:
        region.close()
    for region in world.cached:
        region.close()
    world.cache_alloc.trim()
    shutil.rmtree(world.folder, ignore_errors=True)


# ---------------------------------------------------------------- operations
# Each takes the world and makes one public call (or a short sequence a user
# would write) through call(), recording what it made. Hooks act only while
# the world is inside such a call: what the test itself records between
# calls is bookkeeping, not the library.


def call(world: World, function: Callable[..., Any], *args: Any) -> Any:
    world.inside += 1
    try:
        return function(*args)
    finally:
        world.inside -= 1


def _objects(world: World, addresses: list[int]) -> None:
    fresh = set(addresses)
    assert len(fresh) == len(addresses), "one call handed out an address twice"
    assert not fresh & set(world.objects), "the pool handed out a live address again"
    world.objects.extend(addresses)


def op_alloc(world: World) -> None:
    world.regions.append(call(world, world.alloc.alloc, PAGE + 1))


def op_alloc_aligned(world: World) -> None:
    world.regions.append(call(world, world.alloc.alloc, PAGE, 16 * PAGE))


def op_reserve(world: World) -> None:
    world.regions.append(call(world, world.alloc.reserve, 8 * PAGE, 4 * PAGE))


def op_dealloc(world: World) -> None:
    call(world, world.alloc.dealloc, world.region(0))


def op_close(world: World) -> None:
    call(world, world.region(1).close)


def op_realloc_grow(world: World) -> None:
    call(world, world.alloc.realloc, world.region(0), 9 * PAGE)


def op_realloc_mixed(world: World) -> None:
    call(world, world.alloc.realloc, world.region(1), 12 * PAGE)


def op_realloc_reservation(world: World) -> None:
    call(world, world.alloc.realloc, world.region(2), 16 * PAGE)


def op_realloc_shrink(world: World) -> None:
    call(world, world.alloc.realloc, world.region(1), PAGE + 5)


def op_realloc_same_pages(world: World) -> None:
    call(world, world.alloc.realloc, world.region(0), 2 * PAGE + 7)


def op_grow_in_place(world: World) -> None:
    call(world, world.alloc.grow_in_place, world.region(0), 4 * PAGE)


def op_shrink_in_place(world: World) -> None:
    call(world, world.alloc.shrink_in_place, world.region(1), PAGE)


def op_commit(world: World) -> None:
    call(world, world.alloc.commit, world.region(1))


def op_uncommit(world: World) -> None:
    call(world, world.alloc.uncommit, world.region(0), 0, PAGE)


def op_protect_part(world: World) -> None:
    call(world, world.region(0).protect, R, PAGE, PAGE)


def op_protect_whole(world: World) -> None:
    call(world, world.region(1).protect, RW)


def op_protect_none(world: World) -> None:
    call(world, world.region(2).protect, Perm.NONE, PAGE, PAGE)


def op_make_exec(world: World) -> None:
    call(world, world.region(0).make_exec)


def op_make_writable(world: World) -> None:
    call(world, world.region(3).make_writable)


def _writable_block(region: Region) -> None:
    with region.writable(0, PAGE):
        region[0] = 0x22


def op_writable_block(world: World) -> None:
    call(world, _writable_block, world.region(0))


def op_function(world: World) -> None:
    region = world.region(3)
    world.functions.append((region, call(world, region.function, NoArgs)))


def op_drop_function(world: World) -> None:
    if world.functions:
        world.functions.pop()


def op_memoryview(world: World) -> None:
    region = world.region(0)
    world.exports.append((region, call(world, memoryview, region)))


def op_view(world: World) -> None:
    region = world.region(2)
    world.exports.append((region, call(world, region.view, PAGE, 100)))


def op_ctypes(world: World) -> None:
    region = world.region(0)
    world.exports.append((region, call(world, (ctypes.c_char * 10).from_buffer, region)))


def op_ndarray(world: World) -> None:
    region = world.region(0)
    if numpy is not None:
        world.exports.append((region, call(world, region.ndarray, numpy.uint8, 64, 8)))


def op_release(world: World) -> None:
    if world.exports:
        world.exports.pop(0)


def _read(region: Region) -> None:
    region[0:100]
    region[PAGE + 1]
    region.find(b"\x11\x11")


def op_read(world: World) -> None:
    call(world, _read, world.region(1))


def _write(region: Region) -> None:
    region[10:20] = b"0123456789"
    region[PAGE] = 7


def op_write(world: World) -> None:
    call(world, _write, world.region(0))


def op_iterate(world: World) -> None:
    call(world, lambda region: list(zip(region, range(100), strict=False)), world.region(0))


def op_advise_dontneed(world: World) -> None:
    call(world, world.region(0).advise, "dontneed", PAGE, PAGE)


def op_advise_dontfork(world: World) -> None:
    call(world, world.region(1).advise, "dontfork", 0, PAGE)


def _lock(region: Region) -> None:
    region.lock(0, PAGE)
    region.unlock(0, PAGE)


def op_lock(world: World) -> None:
    call(world, _lock, world.region(0))


def op_stats(world: World) -> None:
    call(world, world.region(0).stats)
    call(world, world.alloc.stats)
    call(world, world.pool.stats)


def op_pool_alloc(world: World) -> None:
    _objects(world, [call(world, world.pool.alloc)])


def op_pool_alloc_zeroed(world: World) -> None:
    _objects(world, [call(world, world.pool.alloc_zeroed)])


def op_pool_alloc_many(world: World) -> None:
    _objects(world, call(world, world.pool.alloc_many, 80))


def _free(world: World, function: Callable[[Any], None], argument: Any, batch: list[int]) -> None:
    """Give ``batch`` back through ``function(argument)``. The model drops the
    addresses before the call: they are free the moment it returns, and a hook
    that runs then (a signal handler, as the call returns) may be handed them
    again. A call that fails freed none of them (all or none), unless the
    pool closed meanwhile: what is still live and not taken again goes back."""
    for address in batch:
        world.objects.remove(address)
    try:
        call(world, function, argument)
    except BaseException:
        for address in batch:
            if address in world.pool and address not in world.objects:
                world.objects.append(address)
        raise
    kept = [a for a in batch if a in world.pool and a not in world.objects]
    assert not kept, ("the free returned but left objects live", kept)


def op_pool_free(world: World) -> None:
    if world.objects:
        address = world.objects[-1]
        _free(world, world.pool.free, address, [address])


def op_pool_free_many(world: World) -> None:
    batch = world.objects[-70:]
    _free(world, world.pool.free_many, batch, batch)


def op_pool_view(world: World) -> None:
    if world.objects:
        world.exports.append((world.pool, call(world, world.pool.view, world.objects[0])))


def op_pool_close(world: World) -> None:
    call(world, world.pool.close)


def _read_secret(secret: SecretBuffer) -> None:
    with secret.open() as view:
        view[0:10].tobytes()


def op_secret_read(world: World) -> None:
    call(world, _read_secret, world.secret)


def op_secret_write(world: World) -> None:
    call(world, world.secret.write, b"0123456789", 5)


def op_secret_noaccess(world: World) -> None:
    call(world, world.secret.noaccess)


def op_secret_readwrite(world: World) -> None:
    call(world, world.secret.readwrite)


def op_secret_compare(world: World) -> None:
    call(world, world.secret.compare, b"k" * 100)


def op_secret_close(world: World) -> None:
    call(world, world.secret.close)


def op_code_alloc(world: World) -> None:
    world.blocks.append(call(world, world.heap.alloc, 48))


def op_code_write(world: World) -> None:
    call(world, world.blocks[-1].write, RET)


def _write_through_writer(block: CodeBlock) -> None:
    with block.writer() as view:
        view[: len(RET)] = RET


def op_code_writer(world: World) -> None:
    call(world, _write_through_writer, world.blocks[0])


def op_code_function(world: World) -> None:
    block = world.blocks[-1]
    world.functions.append((block, call(world, block.function, NoArgs)))


def op_code_free(world: World) -> None:
    block = world.blocks[-1]
    call(world, world.heap.free, block)
    if block.closed:
        world.blocks.remove(block)


def op_code_close(world: World) -> None:
    call(world, world.heap.close)


def op_shared_resize_grow(world: World) -> None:
    region = world.shared[0]
    call(world, region.resize, region.size + 5 * PAGE + 7)


def op_shared_resize_shrink(world: World) -> None:
    call(world, world.shared[0].resize, PAGE)


def op_shared_refresh(world: World) -> None:
    call(world, world.shared[1].refresh)


def _seal_write(region: SharedRegion) -> None:
    region.seal(write=True)


def op_shared_seal_write(world: World) -> None:
    call(world, _seal_write, world.shared[1])


def op_shared_discard(world: World) -> None:
    call(world, world.shared[0].discard, 0, PAGE)


def op_shared_memoryview(world: World) -> None:
    region = world.shared[1]
    world.exports.append((region, call(world, memoryview, region)))


def op_shared_close(world: World) -> None:
    call(world, world.shared[0].close)


def _pickle_round_trip(region: SharedRegion) -> None:
    from multiprocessing.reduction import ForkingPickler

    ForkingPickler.loads(ForkingPickler.dumps(region)).close()


def op_shared_pickle(world: World) -> None:
    call(world, _pickle_round_trip, world.shared[1])


def op_cache_alloc(world: World) -> None:
    world.cached.append(call(world, world.cache_alloc.alloc, 2 * PAGE))


def op_cache_alloc_aligned(world: World) -> None:
    world.cached.append(call(world, world.cache_alloc.alloc, 2 * PAGE, 4 * PAGE))


def op_cache_dealloc(world: World) -> None:
    call(world, world.cache_alloc.dealloc, world.cached[0])


def op_cache_dealloc_mixed(world: World) -> None:
    call(world, world.cache_alloc.dealloc, world.cached[1])


def op_cache_trim(world: World) -> None:
    call(world, world.cache_alloc.trim)


def op_file_open(world: World) -> None:
    world.files.append(call(world, FileRegion.open, world.files[0].path, "r+"))


def op_file_resize_grow(world: World) -> None:
    region = world.files[0]
    call(world, region.resize, region.size + 3 * PAGE + 5)


def op_file_resize_shrink(world: World) -> None:
    call(world, world.files[0].resize, PAGE)


def op_file_refresh(world: World) -> None:
    call(world, world.files[1].refresh)


def op_file_flush(world: World) -> None:
    call(world, world.files[0].flush)


def op_file_array(world: World) -> None:
    if numpy is not None:
        region = world.files[-1]
        world.exports.append((region, call(world, region.ndarray, numpy.uint8, region.size)))


def _truncate_and_touch(world: World) -> None:
    """Another process cuts the file short; arrays of it read (the repair)."""
    os.truncate(os.path.join(world.folder, "file"), PAGE + 7)
    for owner, array in list(world.exports):
        if isinstance(owner, FileRegion) and numpy is not None and isinstance(array, numpy.ndarray):
            int(array.sum())


def op_file_truncated(world: World) -> None:
    call(world, _truncate_and_touch, world)


def op_file_close(world: World) -> None:
    call(world, world.files[-1].close)


OPERATIONS: dict[str, Callable[[World], None]] = {
    name[3:]: function for name, function in sorted(globals().items()) if name.startswith("op_")
}


def attempt(operation: Callable[[World], None], world: World) -> None:
    """Run an operation; the errors a concurrent change may cause are fine."""
    with suppress(*EXPECTED):
        operation(world)


def reenter(world: World, name: str) -> None:
    """Run an operation from a hook, if the world is inside a library call
    (and not already inside a hook's)."""
    if world.inside == 1:
        attempt(OPERATIONS[name], world)


# ---------------------------------------------------------------- the checks


def check(world: World) -> None:
    """Every promise, after an operation was cut or crossed by another."""
    gc.collect(1)  # buffers and functions that only a cut-off call held
    vmas = read_maps()
    for region in [*world.regions, *world.shared, *world.files, *world.cached]:
        if region.closed:
            continue
        pages = page_perms(vmas, region.address, region.capacity, PAGE)
        recorded = [
            perms for _, length, perms in region.protections() for _ in range(length // PAGE)
        ]
        assert pages == recorded, "the record differs from the kernel"
        exports = sum(1 for owner, obj in world.exports if owner is region)
        assert region._exports == exports, ("exports", region._exports, exports)
        pins = sum(1 for owner, _ in world.functions if owner is region)
        assert region._pins == pins, ("pins", region._pins, pins)
        if region._prot >= 0 and region._prot & R:
            with suppress(FileTruncatedError):  # pages past the file's end are repaired now
                bytes(region)  # a page the record calls readable that is not: SIGSEGV here
    heap = world.heap
    if not heap.closed:
        for start in (heap.address, heap._writable_address):  # never writable and executable
            for perms in page_perms(read_maps(), start, heap.capacity, PAGE):
                assert perms is None or not (perms & W and perms & X), "rwx code heap"
        for block in world.blocks:
            if not block.closed:
                pins = sum(1 for owner, _ in world.functions if owner is block)
                assert block._pins == pins, ("block pins", block._pins, pins)
    check_cache(world, vmas)
    secret = world.secret
    if not secret.closed and secret.access != "none":
        with secret.open() as view:  # the pages the kernel says are open really are
            bytes(view)
    pool = world.pool
    assert len(set(world.objects)) == len(world.objects)
    if not pool.closed:
        assert all(address in pool for address in world.objects)
        assert len(pool) >= len(world.objects)
        fresh = pool.alloc_many(5)
        assert not set(fresh) & set(world.objects), "the pool handed out a live address"
        pool.free_many(fresh)


def check_cache(world: World, vmas: list[Any]) -> None:
    """The cache holds mappings that no open region covers, each with the
    allocator's protection in the kernel, its pages given back (zeros)."""
    held = world.cache_alloc._cached()
    assert len({address for address, *_ in held}) == len(held), "a mapping cached twice"
    assert world.cache_alloc.stats().cache.mappings == len(held)
    spans = [
        (region.address, region.address + region.capacity)
        for region in [*world.regions, *world.shared, *world.files, *world.cached]
        if not region.closed
    ]
    for address, capacity, _align, _attempt in held:
        assert not any(lo < address + capacity and address < hi for lo, hi in spans), (
            "a cached mapping is also a live region"
        )
        assert set(page_perms(vmas, address, capacity, PAGE)) == {RW}, "cached with other perms"
        assert not any(byte & 1 for byte in _mman.residency(address, capacity)), "pages kept"


# ---------------------------------------------------------------- injection


class Injector:
    """A trace function that records the distinct lines of library code run,
    in the order first reached, and runs ``action`` when the ``at``-th of them
    (counting from 1) is first reached. A line run again (a loop) is the same
    point of the path: it is not injected twice."""

    def __init__(self, at: int = 0, action: Callable[[], None] | None = None) -> None:
        self.at = at
        self.action = action
        self.lines: dict[tuple[str, int], None] = {}

    @property
    def count(self) -> int:
        return len(self.lines)

    def __call__(self, frame: FrameType, event: str, arg: object) -> Any:
        if not frame.f_code.co_filename.startswith(LIBRARY):
            return None
        return self.line

    def line(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in self.lines:
                self.lines[key] = None
                if len(self.lines) == self.at and self.action is not None:
                    self.action()  # a raise here surfaces in the traced frame
        return self.line


@contextmanager
def traced(injector: Injector) -> Iterator[Injector]:
    previous = sys.gettrace()
    sys.settrace(injector)
    try:
        yield injector
    finally:
        sys.settrace(previous)


def library_lines(name: str) -> int:
    """How many lines of library code ``name`` runs on a fresh world."""
    world = make_world()
    try:
        with traced(Injector()) as injector:
            attempt(OPERATIONS[name], world)
        return injector.count
    finally:
        teardown(world)


def freeze_the_runner() -> None:
    """In a forked child, before its runs: the objects alive now (the test
    runner's, hundreds of thousands) are left out of every later collection;
    what the runs make is collected as before. On the free-threaded build
    each collection walks them all (``gc.collect(1)`` too: it has no young
    generation), twice or more per run: without this, the runs of a case
    there took about ten times as long as on 3.13 (issue 27)."""
    gc.collect()
    gc.freeze()


def interrupt_everywhere(name: str, others: list[str]) -> dict[str, int]:
    """The checks after ``name`` with a KeyboardInterrupt, then each operation
    of ``others``, injected at every line of library code it runs."""
    freeze_the_runner()
    start = _mman.mapped_bytes()
    lines = library_lines(name)
    runs = 0
    actions: list[str | None] = [None, *others]  # None: a KeyboardInterrupt
    for at in range(1, lines + 1):
        for other in actions:
            world = make_world()

            def act(world: World = world, other: str | None = other) -> None:
                if other is None:
                    raise KeyboardInterrupt
                reenter(world, other)

            try:
                with traced(Injector(at, act)):
                    attempt(OPERATIONS[name], world)
            except KeyboardInterrupt:
                pass
            check(world)
            teardown(world)
            runs += 1
    gc.collect()
    assert _mman.mapped_bytes() == start, "a mapping leaked"
    print({"operation": name, "lines": lines, "runs": runs}, flush=True)  # shown with -s
    return {"lines": lines, "runs": runs}


def collect_everywhere(name: str, others: list[str]) -> None:
    """``name`` with a collection at every allocation of the C layer (the
    threshold at 1), each collection running the next of ``others``."""
    freeze_the_runner()
    start = _mman.mapped_bytes()
    for other in others:
        world = make_world()
        fired = [0]

        def callback(
            phase: str,
            info: dict[str, int],
            world: World = world,
            other: str = other,
            fired: list[int] = fired,
        ) -> None:
            if phase == "start" and fired[0] < 3 and world.inside == 1:
                fired[0] += 1
                reenter(world, other)

        thresholds = gc.get_threshold()
        gc.callbacks.append(callback)
        gc.set_threshold(1, 1, 1)
        try:
            attempt(OPERATIONS[name], world)
        finally:
            gc.set_threshold(*thresholds)
            gc.callbacks.remove(callback)
        check(world)
        teardown(world)
    gc.collect()
    assert _mman.mapped_bytes() == start, "a mapping leaked"


# ---------------------------------------------------------------- the tests

NAMES = sorted(OPERATIONS)
SHORT_OTHERS = [
    "cache_alloc",
    "cache_dealloc",
    "cache_trim",
    "close",
    "code_close",
    "code_free",
    "dealloc",
    "drop_function",
    "file_close",
    "file_resize_shrink",
    "file_truncated",
    "memoryview",
    "pool_alloc_many",
    "pool_close",
    "protect_none",
    "protect_part",
    "realloc_grow",
    "realloc_mixed",
    "release",
    "secret_close",
    "secret_noaccess",
    "shared_close",
    "shared_resize_shrink",
    "shrink_in_place",
    "uncommit",
]
"""The operations injected by the normal run: those that change the state
others depend on (the long form injects every operation)."""


def _others(full: bool) -> list[str]:
    return NAMES if full or os.environ.get("MMAP_ALLOC_INTERRUPTS_FULL") else SHORT_OTHERS


def skip_if_emulated_case(name: str, every_line: bool) -> None:
    """Under emulation: a code block made writable has r-x and rw- pages, which
    /proc/self/maps does not tell apart there; stats at every line is too slow."""
    if name == "writable_block":
        skip_if_emulated(HOST_MAPS)
    elif name == "stats" and every_line:
        skip_if_emulated(TOO_SLOW)


@pytest.mark.parametrize("name", NAMES)
def test_interrupt_or_reenter_at_every_line(name: str) -> None:
    skip_if_emulated_case(name, every_line=True)
    # the slowest (stats: 86 lines x 20 runs) takes 100-240 s on a busy 2-core VM
    run_forked(interrupt_everywhere, name, _others(False), timeout=900)


@pytest.mark.parametrize("name", NAMES)
def test_collect_at_every_allocation(name: str) -> None:
    skip_if_emulated_case(name, every_line=False)
    run_forked(collect_everywhere, name, _others(False), timeout=900)


@pytest.mark.stress
@pytest.mark.parametrize("name", NAMES)
def test_interrupt_or_reenter_at_every_line_with_every_operation(name: str) -> None:
    run_forked(interrupt_everywhere, name, _others(True), timeout=1800)


def test_the_harness_reaches_library_code() -> None:
    """The tracer sees the Python layer (a harness that saw nothing would pass anything)."""
    assert library_lines("realloc_grow") > 3
    assert library_lines("writable_block") > 3
    assert library_lines("stats") > 10


def test_the_harness_catches_a_broken_invariant() -> None:
    """An export the world does not know of is reported."""
    world = make_world()
    try:
        extra = memoryview(world.region(0))  # an export the world does not know of
        with pytest.raises(AssertionError, match="exports"):
            check(world)
        extra.release()
    finally:
        teardown(world)


# ---------------------------------------------------------------- random signals


def random_signals(seconds: float, seed: int) -> dict[str, int]:
    """Run random operations while SIGALRM fires at random moments, its handler
    running random operations too; check every promise as it goes."""
    rnd = random.Random(seed)
    counts = {"operations": 0, "signals": 0, "inside": 0, "checks": 0}
    freeze_the_runner()
    start = _mman.mapped_bytes()
    world = make_world()

    def handler(signum: int, frame: FrameType | None) -> None:
        counts["signals"] += 1
        if world.inside == 1:
            counts["inside"] += 1
            reenter(world, rnd.choice(NAMES))
        signal.setitimer(signal.ITIMER_REAL, rnd.uniform(1e-5, 3e-4))

    previous = signal.signal(signal.SIGALRM, handler)
    deadline = _now() + seconds
    try:
        signal.setitimer(signal.ITIMER_REAL, 1e-4)
        while _now() < deadline:
            try:
                attempt(OPERATIONS[rnd.choice(NAMES)], world)
                counts["operations"] += 1
                if counts["operations"] % 50 == 0:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    check(world)
                    counts["checks"] += 1
                    if rnd.random() < 0.3:  # a fresh world now and then
                        teardown(world)
                        world = make_world()
                    signal.setitimer(signal.ITIMER_REAL, 1e-4)
            except KeyboardInterrupt:
                pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # an alarm already on its way is dropped
        signal.signal(signal.SIGALRM, previous)
    check(world)
    teardown(world)
    gc.collect()
    assert _mman.mapped_bytes() == start, "a mapping leaked"
    print(counts, flush=True)  # shown with -s
    return counts


def _now() -> float:
    import time

    return time.monotonic()


@emulated_skip(HOST_MAPS)  # its world has code blocks: r-x pages next to r-- ones
def test_random_signals_keep_every_promise() -> None:
    run_forked(random_signals, 5.0, 1, timeout=120)


@pytest.mark.stress
@emulated_skip(HOST_MAPS)
def test_random_signals_keep_every_promise_long() -> None:
    seconds = float(os.environ.get("MMAP_ALLOC_SIGNALS_SECONDS", "300"))
    run_forked(random_signals, seconds, 2, timeout=seconds + 300)
