"""Functions that the test_shared*.py files run in other processes (spawned children
import this module by name, so it stays small and importable)."""

from __future__ import annotations

import os
import signal
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from mmap_alloc import SharedRegion


def write_then_read(region: SharedRegion, ready: Event, go: Event, out: Queue[Any]) -> None:
    """Write b"child" at 0, then report what the parent wrote at 5 once told to."""
    region[0:5] = b"child"
    ready.set()
    go.wait(60)
    out.put(bytes(region[5:11]))
    region.close()


def grow(region: SharedRegion, new_size: int) -> None:
    """Grow the region and mark its last byte."""
    region.resize(new_size)
    region[new_size - 1] = 7
    region.close()


def truncate(region: SharedRegion, out: Queue[Any]) -> None:
    """Try to cut the file to nothing, and report the errno (0: it worked)."""
    try:
        os.ftruncate(region.fd, 0)
    except OSError as exc:
        out.put(exc.errno)
    else:
        out.put(0)
    region.close()


def hold(region: SharedRegion, ready: Event) -> None:
    """Write to the region, say so, and keep it until killed."""
    region[0:4] = b"held"
    ready.set()
    while True:
        signal.pause()


def describe(region: SharedRegion) -> tuple[int, int, bytes, bool, bool]:
    """What a worker sees of a region handed to it (the last item: whether its
    descriptor is close-on-exec)."""
    import fcntl

    cloexec = bool(fcntl.fcntl(region.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    return region.size, region.capacity, bytes(region[:5]), region.readonly, cloexec


def array_sum(region: SharedRegion, count: int) -> float:
    """The sum of the float64 array at the start of the region."""
    import numpy as np

    return float(region.ndarray(np.float64, count).sum())


def take_from_queue(inbox: Queue[Any], out: Queue[Any]) -> None:
    """Take a region from a queue (it was put there after this process
    started), write to it, report what it held."""
    region = inbox.get(timeout=60)
    out.put(bytes(region[:5]))
    region[5:10] = b"taken"
    region.close()


def fill(task: tuple[Any, int]) -> str:
    """Fill an array handed to the worker with a value; say what type it came as."""
    array, value = task
    array[...] = value
    return type(array).__module__ + "." + type(array).__qualname__


def array_back(array: Any) -> Any:
    """Hand a view of an array the worker received back to the parent."""
    return array[:4]
