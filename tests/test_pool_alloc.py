"""ObjectPool: fixed-size objects carved from mapped slabs.

Its layout, alloc and free, bad input, closing, and the README's example."""

from __future__ import annotations

import ctypes
import gc
import itertools
import random
import sys
from pathlib import Path

import pytest

from mmap_alloc import MapAlloc, ObjectPool, PoolStats, Region, _mman
from mmap_alloc._linux import PAGE_SIZE
from pool_support import MiB, pattern, read, write
from support import collecting, collects_inside_calls, run_forked

try:
    import numpy

    HAVE_NUMPY = True
except ImportError:  # pragma: no cover
    HAVE_NUMPY = False


# ---------------------------------------------------------------- layout


def test_objects_are_aligned_to_16_by_default() -> None:
    with ObjectPool(24) as pool:
        assert pool.align == 16
        assert pool.stride == 32
        assert all(a % 16 == 0 for a in pool.alloc_many(100))


@pytest.mark.parametrize("align", [1, 2, 8, 64, 256, PAGE_SIZE])
def test_objects_are_aligned_to_align(align: int) -> None:
    with ObjectPool(10, align=align) as pool:
        addresses = pool.alloc_many(50)
        assert all(a % align == 0 for a in addresses)
        assert pool.stride == -(-10 // align) * align


def test_stride_is_obj_size_rounded_up_to_align() -> None:
    with ObjectPool(100, align=32) as pool:
        a, b = sorted(pool.alloc_many(2))
        assert pool.stride == 128
        assert b - a == 128


def test_slab_size_rounds_up_to_whole_pages() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE + 1) as pool:
        assert pool.slab_size == 2 * PAGE_SIZE


def test_default_slab_holds_at_least_64_objects() -> None:
    with ObjectPool(100_000) as pool:
        assert pool.slab_size // pool.stride >= 64
        assert pool.slab_size % PAGE_SIZE == 0


def test_default_slab_of_large_objects_stays_under_64_mib() -> None:
    with ObjectPool(5 * MiB) as pool:
        assert pool.slab_size // pool.stride == 12
        assert pool.slab_size - 12 * pool.stride < PAGE_SIZE
    with ObjectPool(100 * MiB) as pool:
        assert pool.slab_size == 100 * MiB


def test_objects_larger_than_a_page_work() -> None:
    with ObjectPool(3 * PAGE_SIZE + 5, slab_size=4 * PAGE_SIZE) as pool:
        a = pool.alloc()
        write(a, pattern(1, pool.obj_size))
        assert read(a, pool.obj_size) == pattern(1, pool.obj_size)
        pool.free(a)


# ---------------------------------------------------------------- alloc and free


def test_alloc_returns_distinct_live_addresses(pool: ObjectPool) -> None:
    addresses = [pool.alloc() for _ in range(1000)]
    assert len(set(addresses)) == 1000
    assert len(pool) == 1000
    assert all(a in pool for a in addresses)


def test_free_makes_the_address_not_live(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(a)
    assert a not in pool
    assert len(pool) == 0


def test_freed_object_is_reused(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(a)
    assert pool.alloc() == a


def test_objects_hold_what_is_written(pool: ObjectPool) -> None:
    addresses = pool.alloc_many(500)
    for i, a in enumerate(addresses):
        write(a, pattern(i, 64))
    assert all(read(a, 64) == pattern(i, 64) for i, a in enumerate(addresses))


def test_alloc_zeroed_zeroes_a_reused_object(pool: ObjectPool) -> None:
    a = pool.alloc()
    write(a, b"\xff" * 64)
    pool.free(a)
    b = pool.alloc_zeroed()
    assert b == a
    assert read(b, 64) == bytes(64)


def test_alloc_zeroed_of_fresh_memory_is_zero(pool: ObjectPool) -> None:
    assert all(read(a, 64) == bytes(64) for a in (pool.alloc_zeroed() for _ in range(100)))


def test_alloc_many_returns_n_live_objects_across_slabs() -> None:
    with ObjectPool(64, slab_size=16 * PAGE_SIZE) as pool:  # 1024 objects per slab
        addresses = pool.alloc_many(3000)
        assert len(pool) == 3000
        assert len(set(addresses)) == 3000
        assert pool.stats().slabs == 3


def test_a_long_alloc_many_runs_no_replaced_getswitchinterval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long call reads the switch interval to pace its pauses, without
    running Python code: a replacement of sys.getswitchinterval is not called."""
    calls: list[int] = []

    def replaced() -> float:
        calls.append(1)
        return 0.005

    monkeypatch.setattr(sys, "getswitchinterval", replaced)
    with ObjectPool(16, slab_size=64 * PAGE_SIZE) as pool:  # 16,384 objects: pauses between steps
        addresses = pool.alloc_many(100_000)
        assert len(set(addresses)) == len(pool) == 100_000
    assert calls == []


def test_alloc_many_of_zero_is_empty(pool: ObjectPool) -> None:
    assert pool.alloc_many(0) == []


def test_free_many_frees_all(pool: ObjectPool) -> None:
    addresses = pool.alloc_many(1000)
    pool.free_many(addresses[:600])
    assert len(pool) == 400
    pool.free_many(iter(addresses[600:]))
    assert len(pool) == 0


def test_objects_do_not_overlap_across_slabs() -> None:
    with ObjectPool(100, slab_size=PAGE_SIZE) as pool:
        addresses = sorted(pool.alloc_many(500))
        assert all(b - a >= 100 for a, b in itertools.pairwise(addresses))
        assert pool.stats().slabs == -(-500 // (PAGE_SIZE // 112))


class _SlabsInOrder(MapAlloc):
    """A MapAlloc whose slabs come from a list made beforehand, in its order."""

    def __init__(self, regions: list[Region]) -> None:
        super().__init__()
        self.regions = regions

    def alloc(self, size: int, *args: object, **kwargs: object) -> Region:
        return self.regions.pop(0)


def _zigzag(items: list[Region]) -> list[Region]:
    middle = len(items) // 2
    pairs = itertools.zip_longest(items[middle:], reversed(items[:middle]))
    return [item for pair in pairs for item in pair if item is not None]


@pytest.mark.parametrize("order", ["rising", "falling", "zigzag", "shuffled"])
def test_slabs_stay_sorted_in_whatever_address_order_they_are_mapped(order: str) -> None:
    """The table of slabs is sorted by address (pool_insert: a binary search,
    then the shorter side moves): every object is found again, whichever end
    or middle the new slabs go in at, and the table grows at both ends."""
    source = MapAlloc()
    regions = sorted((source.alloc(PAGE_SIZE) for _ in range(40)), key=lambda r: r.address)
    if order == "falling":
        regions.reverse()
    elif order == "zigzag":
        regions = _zigzag(regions)
    elif order == "shuffled":
        random.Random(1).shuffle(regions)
    with ObjectPool(64, alloc=_SlabsInOrder(regions), slab_size=PAGE_SIZE) as pool:
        per_slab = PAGE_SIZE // 64
        addresses = [pool.alloc() for _ in range(40 * per_slab)]
        slabs = [address for address, _ in pool._spans()]
        assert slabs == sorted(slabs) and len(slabs) == 40
        assert all(address in pool for address in addresses)
        for address in addresses:
            pool.free(address)
        assert len(pool) == 0


def test_alloc_after_frees_takes_the_lowest_slab_with_room() -> None:
    """pool_refill starts its search past the slabs it knows full: a free in a
    slab below that point (one by one, or by free_many) is found all the same."""
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        per_slab = PAGE_SIZE // 64
        addresses = sorted(pool.alloc() for _ in range(30 * per_slab))
        low, high = addresses[3 * per_slab + 5], addresses[20 * per_slab + 1]
        pool.free(high)
        pool.free(low)
        assert pool.alloc() == low  # the current slab is full: the lowest with room
        assert pool.alloc() == high
        assert pool.alloc() not in addresses  # every slab full again: a new one
        pool.alloc_many(per_slab - 1)  # fills the new slab
        pool.free_many([addresses[per_slab]])
        assert pool.alloc() == addresses[per_slab]
        pool.free(addresses[7])
        assert pool.alloc() == addresses[7]


def test_contains_is_false_for_other_things(pool: ObjectPool) -> None:
    a = pool.alloc()
    assert a + 1 not in pool
    assert a + 64 not in pool
    assert -1 not in pool
    assert 2**80 not in pool
    assert "x" not in pool
    assert None not in pool


# ---------------------------------------------------------------- bad input


def _snapshot(pool: ObjectPool, live: list[int]) -> tuple[int, PoolStats, list[bool]]:
    return len(pool), pool.stats(), [a in pool for a in live]


def test_double_free_raises_and_changes_nothing(pool: ObjectPool) -> None:
    live = pool.alloc_many(3)
    a = pool.alloc()
    pool.free(a)
    before = _snapshot(pool, live)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(a)
    assert _snapshot(pool, live) == before
    assert pool.alloc() == a


@pytest.mark.parametrize("bad", [0, 1, -1, 2**64, 2**200, 4096])
def test_free_of_a_foreign_integer_raises(pool: ObjectPool, bad: int) -> None:
    live = pool.alloc_many(3)
    before = _snapshot(pool, live)
    with pytest.raises(ValueError, match="not an object of this pool"):
        pool.free(bad)
    assert _snapshot(pool, live) == before


def test_free_of_an_address_of_another_pool_raises(pool: ObjectPool) -> None:
    with ObjectPool(64) as other:
        a = other.alloc()
        with pytest.raises(ValueError, match="not an object of this pool"):
            pool.free(a)
        assert a in other


def test_free_of_an_address_inside_an_object_raises(pool: ObjectPool) -> None:
    a = pool.alloc()
    for inside in (a + 1, a + 63):
        with pytest.raises(ValueError, match="inside an object"):
            pool.free(inside)
    assert a in pool
    assert len(pool) == 1


def test_free_of_an_address_past_the_last_object_of_a_slab_raises() -> None:
    with ObjectPool(1000, align=8, slab_size=PAGE_SIZE) as pool:  # 4 objects, 96 bytes of tail
        a = pool.alloc()
        with pytest.raises(ValueError, match="not an object of this pool"):
            pool.free(a + 4 * 1000)


@pytest.mark.parametrize("bad", ["1", 1.0, None, b"x"])
def test_free_of_a_non_integer_raises_type_error(pool: ObjectPool, bad: object) -> None:
    pool.alloc()
    with pytest.raises(TypeError, match="address must be an integer"):
        pool.free(bad)  # type: ignore[arg-type]
    assert len(pool) == 1


@pytest.mark.skipif(not HAVE_NUMPY, reason="needs numpy")
def test_free_accepts_integer_like_objects(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(numpy.uint64(a))  # type: ignore[arg-type]
    assert len(pool) == 0


def test_free_many_with_one_bad_address_frees_none(pool: ObjectPool) -> None:
    live = pool.alloc_many(10)
    for bad in (live[-1] + 1, 12345, -5):
        with pytest.raises(ValueError):
            pool.free_many([*live[:5], bad, *live[5:]])
        assert all(a in pool for a in live)
        assert len(pool) == 10


def test_free_many_with_a_duplicate_frees_none(pool: ObjectPool) -> None:
    live = pool.alloc_many(10)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free_many([*live, live[3]])
    assert all(a in pool for a in live)


def test_free_many_of_a_non_integer_frees_none(pool: ObjectPool) -> None:
    live = pool.alloc_many(3)
    with pytest.raises(TypeError):
        pool.free_many([live[0], "x"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        pool.free_many(5)  # type: ignore[arg-type]
    assert len(pool) == 3


def test_free_many_undo_keeps_emptiness_accounting(pool: ObjectPool) -> None:
    """A rolled-back free_many that emptied a slab leaves it in use."""
    live = pool.alloc_many(3)
    with pytest.raises(ValueError):
        pool.free_many([*live, 1])
    pool.free_many(live)
    assert len(pool) == 0
    assert pool.stats().slabs == 1


class _Address(int):
    """An address that is not an exact int: free_many's general path."""


def _failing_free_many_with_a_collection(meddling: str, items: str) -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        live = pool.alloc_many(4 * 64)  # four slabs
        bad = [*live[64:128], live[192], 12345]  # the second slab given back, then a refusal
        if items == "int subclasses":
            bad = [_Address(a) for a in bad]
        others = [*live[:64], *live[128:192]]  # empty slabs 1 and 3: 3, then 2 if empty, go
        meddle = pool.close if meddling == "closes" else lambda: pool.free_many(others)
        try:
            raise LookupError  # inside a handler 3.11 builds the ValueError at once
        except LookupError:
            with pytest.raises(ValueError, match="not an object of this pool"):
                collecting(lambda: pool.free_many(bad), meddle)
        if meddling == "closes":
            assert pool.closed
        else:
            kept = [*live[64:128], *live[192:]]
            assert len(pool) == 128 and all(a in pool for a in kept)
            pool.free_many(kept)
            assert len(pool) == 0


@collects_inside_calls
@pytest.mark.parametrize("items", ["exact ints", "int subclasses"])
@pytest.mark.parametrize("meddling", ["closes", "frees"])
def test_a_failing_free_many_changes_nothing_though_a_collection_its_error_starts_uses_the_pool(
    meddling: str, items: str
) -> None:
    """free_many gives back what it freed before it builds the error: a
    collection the error's allocation starts may close the pool or free (and
    release) its slabs."""
    run_forked(_failing_free_many_with_a_collection, meddling, items)


def test_a_refused_free_many_is_undone_before_its_error_can_run_python_code(
    pool: ObjectPool,
) -> None:
    live = pool.alloc_many(200)  # bitmap words given back one by one
    addresses = [*live, -5]
    taken: list[int] = []
    refused: list[ValueError] = []

    def take(phase: str, info: object) -> None:
        if phase == "start" and not taken and live[0] not in pool:  # given back, not yet undone
            taken.append(pool.alloc())

    gc.callbacks.append(take)
    try:
        raise KeyError  # 3.11 builds an error raised while one is handled at once: a collection
    except KeyError:
        gc.set_threshold(1)
        try:
            pool.free_many(addresses)
        except ValueError as exc:
            refused.append(exc)
        finally:
            gc.set_threshold(700)
            gc.callbacks.remove(take)
    assert "not an object of this pool" in str(refused[0])
    assert not set(taken) & set(live)
    assert len(pool) == len(live) + len(taken)


@pytest.mark.parametrize(("n", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_alloc_many_rejects_bad_counts(pool: ObjectPool, n: object, error: type) -> None:
    with pytest.raises(error):
        pool.alloc_many(n)  # type: ignore[arg-type]
    assert len(pool) == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"obj_size": 0}, ValueError, "obj_size"),
        ({"obj_size": -8}, ValueError, "obj_size"),
        ({"obj_size": 8.0}, TypeError, "obj_size"),
        ({"obj_size": True}, TypeError, "obj_size"),
        ({"obj_size": 8, "align": 3}, ValueError, "align"),
        ({"obj_size": 8, "align": 0}, ValueError, "align"),
        ({"obj_size": 8, "align": 2 * PAGE_SIZE}, ValueError, "align"),
        ({"obj_size": 8, "alloc": "x"}, TypeError, "alloc"),
        ({"obj_size": 8, "slab_size": 0}, ValueError, "slab_size"),
        ({"obj_size": 2 * PAGE_SIZE, "slab_size": PAGE_SIZE}, ValueError, "slab_size"),
        ({"obj_size": 8, "slab_size": 1 << 40}, ValueError, "slab_size"),
    ],
)
def test_bad_construction_raises(kwargs: dict[str, object], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ObjectPool(**kwargs)  # type: ignore[arg-type]


def test_initialising_twice_raises(pool: ObjectPool) -> None:
    with pytest.raises(RuntimeError):
        pool.__init__(64)  # type: ignore[misc]


# ---------------------------------------------------------------- close


def test_use_after_close_raises(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.close()
    for use in (
        pool.alloc,
        pool.alloc_zeroed,
        lambda: pool.free(a),
        lambda: pool.alloc_many(1),
        lambda: pool.free_many([a]),
        lambda: pool.view(a),
    ):
        with pytest.raises(ValueError, match="pool is closed"):
            use()
    with pytest.raises(ValueError, match="pool is closed"), pool:
        pass


def test_closed_pool_is_empty(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.close()
    assert len(pool) == 0
    assert a not in pool
    assert pool.stats() == PoolStats(0, 0, 0, 0, 0, 0)
    assert "closed" in repr(pool)


def test_close_is_idempotent(pool: ObjectPool) -> None:
    pool.close()
    pool.close()
    assert pool.closed


def test_close_unmaps_every_slab() -> None:
    before = _mman.mapped_bytes()
    pool = ObjectPool(64, slab_size=PAGE_SIZE)
    pool.alloc_many(10_000)
    assert _mman.mapped_bytes() - before >= 10_000 * 64
    pool.close()
    assert _mman.mapped_bytes() == before


def test_a_dropped_pool_unmaps_its_slabs() -> None:
    gc.collect()
    before = _mman.mapped_bytes()
    pool = ObjectPool(64, slab_size=PAGE_SIZE)
    pool.alloc_many(10_000)
    del pool
    gc.collect()
    assert _mman.mapped_bytes() == before


# ---------------------------------------------------------------- docs

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(not README.exists(), reason="needs the source tree's README.md")
def test_readme_pool_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    section = README.read_text().split("## Object pool", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, str(README), "exec"), {})
    assert "PoolStats(live=0" in capsys.readouterr().out


def test_alloc_many_takes_any_integer_with_index(pool: ObjectPool) -> None:
    numpy = pytest.importorskip("numpy")
    addresses = pool.alloc_many(numpy.int64(3))
    assert len(addresses) == 3
    pool.free_many(addresses)


def test_addresses_stay_right_when_slabs_share_object_indices() -> None:
    # 64 objects a slab: the same index in three slabs, freed and taken again
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        first = pool.alloc_many(3 * 64)
        for address in first:
            pool.free(address)
        again = [pool.alloc() for _ in range(3 * 64)]
        assert sorted(again) == sorted(first)
        assert all(address in pool for address in again)
        for address in again:
            ctypes.memset(address, 1, 64)
            pool.free(address)
        assert pool.alloc() in first


def test_close_lets_go_of_the_address_ints_the_pool_remembers() -> None:
    pool = ObjectPool(64)
    address = pool.alloc()
    held = sys.getrefcount(address)
    pool.free(address)
    pool.close()
    assert sys.getrefcount(address) == held - 1
