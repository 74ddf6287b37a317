"""The world of the interrupt harness (test_reliability_interrupts_*.py,
test_reliability_pool_interrupts.py): the objects every operation works on,
the operations (``op_*``, each one public call), and the checks of every
promise after a run."""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

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
from support import page_perms, read_maps

try:
    import numpy
except ImportError:  # numpy is optional: no array exports then
    numpy = None  # type: ignore[assignment]


PAGE = PAGE_SIZE
R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
RW, RX = R | W, R | X
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


NAMES = sorted(OPERATIONS)


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


def freeze_the_runner() -> None:
    """In a forked child, before its runs: the objects alive now (the test
    runner's, hundreds of thousands) are left out of every later collection;
    what the runs make is collected as before. On the free-threaded build
    each collection walks them all (``gc.collect(1)`` too: it has no young
    generation), twice or more per run: without this, the runs of a case
    there took about ten times as long as on 3.13 (issue 27)."""
    gc.collect()
    gc.freeze()
