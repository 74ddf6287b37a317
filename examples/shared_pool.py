"""Sum a numpy array in a pool of worker processes without copying it.

The array lives on a SharedRegion (memfd memory). Each task carries the
region, which multiprocessing passes by file descriptor: the workers map the
same pages, read their slice, and send back one float. Nothing is pickled
but the descriptor, and nothing is left in /dev/shm.

    python examples/shared_pool.py [--n 10000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import time

import numpy as np

import mmap_alloc.numpy as mnp
from mmap_alloc import SharedRegion


def partial_sum(region: SharedRegion, n: int, start: int, stop: int) -> float:
    """In a worker: the sum of elements [start, stop) of the float64 array
    that fills the region (n elements)."""
    data = region.ndarray(np.float64, n)
    return float(data[start:stop].sum())


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=positive, default=10_000_000, help="array length")
    parser.add_argument("--workers", type=positive, default=2, help="worker processes")
    args = parser.parse_args()

    data = mnp.empty(args.n, np.float64, shared=True)  # on a SharedRegion of its own
    data[:] = np.arange(args.n, dtype=np.float64)
    region = mnp.region_of(data)
    bounds = np.linspace(0, args.n, args.workers + 1).astype(int)
    tasks = [(region, args.n, int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        started = time.perf_counter()
        total = sum(pool.starmap(partial_sum, tasks))
        elapsed = time.perf_counter() - started

    expected = float(data.sum())
    print(f"sum of {args.n:,} float64 by {args.workers} worker(s): {total:.6g} in {elapsed:.3f} s")
    print(f"in this process: {expected:.6g}; equal: {np.isclose(total, expected)}")


if __name__ == "__main__":
    main()
