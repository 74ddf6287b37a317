"""Arrays of shared memory travel by reference inside multiprocessing: an
array made by ndarray() on a SharedRegion or a FileRegion shared with its
file, handed to a Pool (fork, spawn) or a ProcessPoolExecutor, arrives as a
plain numpy.ndarray over the same pages, so the workers' writes are seen by
the parent; every other array keeps numpy's pickling by value."""

from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")

import shared_workers  # noqa: E402
from mmap_alloc import FileRegion, MapAlloc, Region, SharedRegion  # noqa: E402
from mmap_alloc._linux import PAGE_SIZE as P  # noqa: E402

N = 1 << 16  # int64 items: 512 KiB


@pytest.fixture(params=["shared", "file"])
def region(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Region]:
    """A region other processes can map: a SharedRegion, or an r+ FileRegion."""
    if request.param == "shared":
        made: Region = SharedRegion.create(N * 8)
    else:
        made = FileRegion.open(tmp_path / "array.bin", "w+", size=N * 8)
    with made:
        yield made


def round_trip(array: Any) -> Any:
    return ForkingPickler.loads(ForkingPickler.dumps(array))


def halves(array: Any) -> list[tuple[Any, int]]:
    return [(array[: N // 2], 1), (array[N // 2 :], 2)]


def expect_filled(array: Any) -> None:
    assert (array[: N // 2] == 1).all() and (array[N // 2 :] == 2).all()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_fill_halves_the_parent_sees_whole(region: Region, method: str) -> None:
    array = region.ndarray(np.int64, N)
    with multiprocessing.get_context(method).Pool(2) as pool:
        kinds = pool.map(shared_workers.fill, halves(array))
    expect_filled(array)
    assert kinds == ["numpy.ndarray"] * 2  # a plain array in the worker
    del array


def test_process_pool_executor_workers_fill_halves_the_parent_sees_whole(region: Region) -> None:
    array = region.ndarray(np.int64, N)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=spawn) as executor:
        list(executor.map(shared_workers.fill, halves(array)))
    expect_filled(array)
    del array


@pytest.mark.parametrize(
    "view",
    [lambda a: a[::-3], lambda a: a.reshape(256, -1).T[5:9], lambda a: a[100:101]],
    ids=["reversed-strided", "transposed", "one-item"],
)
def test_views_travel_by_reference_to_the_same_bytes(
    region: Region, view: Callable[[Any], Any]
) -> None:
    array = region.ndarray(np.int64, N)
    sent = view(array)
    arrived = round_trip(sent)
    assert type(arrived) is np.ndarray
    assert arrived.shape == sent.shape and arrived.strides == sent.strides
    arrived[...] = 7
    assert (sent == 7).all() and (array == 7).sum() == sent.size
    del array, sent, arrived


def test_a_read_only_array_arrives_read_only(region: Region) -> None:
    array = region.ndarray(np.int64, N)
    array.flags.writeable = False
    arrived = round_trip(array)
    assert not arrived.flags.writeable
    del array, arrived


def test_arrays_of_other_memory_still_travel_by_value(tmp_path: Path) -> None:
    SharedRegion.create(P).ndarray(np.uint8, P)  # the reducer is registered from here on
    with MapAlloc().alloc(P) as private:
        array = private.ndarray(np.uint8, P)
        arrived = round_trip(array)
        arrived[0] = 5
        assert array[0] == 0  # a copy
        del array
    plain = np.arange(10)
    assert (round_trip(plain) == plain).all()
    (tmp_path / "c.bin").write_bytes(bytes(P))
    with FileRegion.open(tmp_path / "c.bin", "c") as copy_on_write:
        array = copy_on_write.ndarray(np.uint8, P)
        round_trip(array)[0] = 5
        assert array[0] == 0  # a copy: the region's changes are this process's own
        del array


def test_an_array_a_worker_hands_back_comes_by_value(region: Region) -> None:
    array = region.ndarray(np.int64, N)
    array[:4] = 3
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        back = pool.apply(shared_workers.array_back, (array,))
    assert (back == 3).all()
    back[0] = 9
    assert array[0] == 3  # a copy: the worker's region was gone before it arrived
    del array


def test_pickle_outside_multiprocessing_is_by_value(region: Region) -> None:
    array = region.ndarray(np.int64, N)
    copy = pickle.loads(pickle.dumps(array))
    copy[0] = 1
    assert array[0] == 0
    del array


def test_the_library_imports_numpy_only_when_an_array_is_made() -> None:
    code = (
        "import sys; from mmap_alloc import SharedRegion\n"
        "SharedRegion.create(4096).close(); print('numpy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
