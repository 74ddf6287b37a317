"""ObjectPool: fixed-size objects carved from mapped slabs.

Views of an object's bytes."""

from __future__ import annotations

import pytest

from mmap_alloc import MapAlloc, ObjectPool, _mman
from mmap_alloc import pool as pool_module
from mmap_alloc._linux import PAGE_SIZE
from pool_support import pattern, read, write
from support import collecting, collects_inside_calls, run_forked

# ---------------------------------------------------------------- views


def test_view_is_the_object_bytes(pool: ObjectPool) -> None:
    a = pool.alloc()
    write(a, pattern(7, 64))
    with pool.view(a) as view:
        assert view.nbytes == 64
        assert view.tobytes() == pattern(7, 64)
        view[:4] = b"abcd"
    assert read(a, 4) == b"abcd"


def test_view_of_a_free_or_foreign_address_raises(pool: ObjectPool) -> None:
    a = pool.alloc()
    pool.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        pool.view(a)
    with pytest.raises(ValueError, match="not an object"):
        pool.view(12345)


def test_close_with_a_live_view_raises_and_changes_nothing(pool: ObjectPool) -> None:
    a = pool.alloc()
    view = pool.view(a)
    with pytest.raises(BufferError):
        pool.close()
    assert not pool.closed
    assert a in pool
    view.release()
    pool.close()
    assert pool.closed


def test_view_keeps_an_emptied_slab_mapped() -> None:
    with ObjectPool(64, slab_size=PAGE_SIZE) as pool:
        per_slab = PAGE_SIZE // 64
        addresses = pool.alloc_many(per_slab * (pool_module.KEEP_EMPTY + 3))
        view = pool.view(addresses[0])
        pool.free_many(addresses)
        view[:] = pattern(3, 64)  # the slab is still mapped and writable
        assert view.tobytes() == pattern(3, 64)
        assert pool.stats().slabs >= 1
        view.release()


def _view_while_a_collection_closes_the_pool() -> None:
    pool = ObjectPool(64, slab_size=PAGE_SIZE)
    a = pool.alloc()
    with pytest.raises(ValueError, match="pool is closed"):
        collecting(lambda: pool.view(a), pool.close)
    assert pool.closed


@collects_inside_calls
def test_view_raises_when_a_collection_it_starts_closes_the_pool() -> None:
    """view() checks the object after it allocates the view (which may start a
    collection), never a view of unmapped memory."""
    run_forked(_view_while_a_collection_closes_the_pool)


def _view_while_a_collection_frees_the_object() -> None:
    pool = ObjectPool(64, slab_size=PAGE_SIZE)
    a = pool.alloc()
    with pytest.raises(ValueError, match="not allocated"):
        collecting(lambda: pool.view(a), lambda: pool.free(a))
    pool.close()  # no view counted


@collects_inside_calls
def test_view_raises_when_a_collection_it_starts_frees_the_object() -> None:
    run_forked(_view_while_a_collection_frees_the_object)


def test_view_of_a_read_only_pool_is_read_only() -> None:
    with ObjectPool(64, alloc=MapAlloc(write=False)) as pool:
        a = pool.alloc()
        with pool.view(a) as view:
            assert view.readonly
            assert view.tobytes() == bytes(64)
        b = pool.alloc_zeroed()
        pool.free_many([a, b])


def test_view_of_an_inaccessible_pool_raises_buffer_error() -> None:
    with ObjectPool(64, alloc=MapAlloc(read=False, write=False)) as pool:
        a = pool.alloc()
        with pytest.raises(BufferError):
            pool.view(a)
        pool.free(a)


def test_a_views_exporter_cannot_reach_the_slab(pool: ObjectPool) -> None:
    a = pool.alloc()
    with pool.view(a) as view:
        exporter = view.obj
        assert type(exporter) is _mman.View
        assert not [name for name in dir(exporter) if not name.startswith("__")]
    pool.free(a)
    assert pool.alloc_zeroed() == a
    assert read(a, 64) == bytes(64)


def test_executable_pool_hands_out_objects() -> None:
    with ObjectPool(64, alloc=MapAlloc(exec=True)) as pool:
        a = pool.alloc_zeroed()
        write(a, b"\xc3")
        assert read(a, 1) == b"\xc3"
