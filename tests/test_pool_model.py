"""ObjectPool: fixed-size objects carved from mapped slabs.

The pool against a model, driven by a hypothesis state machine."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mmap_alloc import ObjectPool
from mmap_alloc._linux import PAGE_SIZE
from pool_support import pattern, read, write
from support import run_forked

# ---------------------------------------------------------------- model


class PoolMachine(RuleBasedStateMachine):
    """The pool against a model: a dict of live address -> pattern."""

    addresses = Bundle("addresses")

    def __init__(self) -> None:
        super().__init__()
        self.pool: ObjectPool | None = None
        self.live: dict[int, bytes] = {}
        self.freed: set[int] = set()
        self.views: list[tuple[int, memoryview]] = []
        self.seed = 0
        self.closed = False

    @initialize(
        obj_size=st.integers(1, 700),
        align=st.sampled_from([1, 8, 16, 64, 4096]),
        slabs=st.integers(1, 3),
    )
    def make(self, obj_size: int, align: int, slabs: int) -> None:
        stride = -(-obj_size // align) * align
        self.pool = ObjectPool(obj_size, align=align, slab_size=max(stride, slabs * PAGE_SIZE))

    def _pool(self) -> ObjectPool:
        assert self.pool is not None
        return self.pool

    def _new(self, address: int) -> int:
        pool = self._pool()
        assert address not in self.live
        self.seed += 1
        data = pattern(self.seed, pool.obj_size)
        write(address, data)
        self.live[address] = data
        self.freed.discard(address)
        return address

    def _forget(self, address: int) -> None:
        del self.live[address]
        self.freed.add(address)

    @precondition(lambda self: not self.closed)
    @rule(target=addresses)
    def alloc(self) -> int:
        return self._new(self._pool().alloc())

    @precondition(lambda self: not self.closed)
    @rule(target=addresses)
    def alloc_zeroed(self) -> int:
        pool = self._pool()
        address = pool.alloc_zeroed()
        assert read(address, pool.obj_size) == bytes(pool.obj_size)
        return self._new(address)

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(0, 40))
    def alloc_many(self, n: int) -> None:
        for address in self._pool().alloc_many(n):
            self._new(address)

    @precondition(lambda self: not self.closed)
    @rule(address=consumes(addresses))
    def free(self, address: int) -> None:
        if address in self.live:
            self._pool().free(address)
            self._forget(address)

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data())
    def free_many(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True))
        self._pool().free_many(chosen)
        for address in chosen:
            self._forget(address)

    @precondition(lambda self: not self.closed and bool(self.freed))
    @rule(data=st.data())
    def double_free(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.freed)))
        with pytest.raises(ValueError):
            self._pool().free(address)

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data(), offset=st.integers(1, 4095))
    def free_inside(self, data: st.DataObject, offset: int) -> None:
        pool = self._pool()
        assume(pool.stride > 1)
        address = data.draw(st.sampled_from(sorted(self.live)))
        with pytest.raises(ValueError):
            pool.free(address + 1 + offset % (pool.stride - 1))

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data(), bad=st.sampled_from([0, -1, 1 << 70, 12345]))
    def free_many_with_a_bad_address(self, data: st.DataObject, bad: int) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True))
        with pytest.raises(ValueError):
            self._pool().free_many([*chosen, bad])

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data())
    def write_pattern(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.live)))
        del self.live[address]
        self._new(address)

    @precondition(lambda self: not self.closed and bool(self.live))
    @rule(data=st.data())
    def view(self, data: st.DataObject) -> None:
        address = data.draw(st.sampled_from(sorted(self.live)))
        view = self._pool().view(address)
        assert view.tobytes() == self.live[address]
        self.views.append((address, view))

    @precondition(lambda self: bool(self.views))
    @rule(data=st.data())
    def release_view(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.views) - 1))
        address, view = self.views.pop(index)
        if address in self.live:
            assert view.tobytes() == self.live[address]
        view.release()

    @precondition(lambda self: not self.closed)
    @rule()
    def close(self) -> None:
        pool = self._pool()
        if self.views:
            with pytest.raises(BufferError):
                pool.close()
            return
        pool.close()
        self.closed = True
        self.live.clear()
        self.freed.clear()

    @precondition(lambda self: self.closed)
    @rule()
    def use_after_close(self) -> None:
        with pytest.raises(ValueError, match="closed"):
            self._pool().alloc()

    @invariant()
    def length_matches(self) -> None:
        if self.pool is not None:
            assert len(self.pool) == len(self.live)

    @invariant()
    def objects_are_aligned_disjoint_and_hold_their_patterns(self) -> None:
        if self.pool is None:
            return
        pool = self._pool()
        ordered = sorted(self.live)
        assert all(b - a >= pool.obj_size for a, b in itertools.pairwise(ordered))
        for address, data in self.live.items():
            assert address % pool.align == 0
            assert address in pool
            assert read(address, pool.obj_size) == data
        assert not any(address in pool for address in self.freed)

    def teardown(self) -> None:
        for _, view in self.views:
            view.release()
        if self.pool is not None:
            self.pool.close()


def test_pool_against_a_model() -> None:
    """The state machine runs in a forked child: hypothesis grows Python's heap
    between the slabs the pools map and unmap, which leaves the parent with
    more (smaller) mappings than it had, though none leaked."""
    run_forked(_run_pool_machine, timeout=300)


def _run_pool_machine() -> None:
    run_state_machine_as_test(  # type: ignore[no-untyped-call,unused-ignore]
        PoolMachine,
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
