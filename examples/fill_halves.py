"""Workers fill the halves of one numpy array that the parent then sees whole.

The array is made by ``ndarray()`` on a SharedRegion (or, with ``--file``, on
a FileRegion of a file opened "w+"): inside multiprocessing such an array
travels by reference, so each worker gets a plain numpy array over the same
pages, and its writes land in the parent's array. Done three ways: a Pool of
forked workers, a Pool of spawned ones, and a spawned ProcessPoolExecutor.

    python examples/fill_halves.py [--n 1000000] [--file PATH]
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from mmap_alloc import FileRegion, Region, SharedRegion


def fill(part: np.ndarray, value: float) -> str:
    """In a worker: fill its part of the array; say what it received."""
    part[...] = value
    return type(part).__name__


def fill_task(task: tuple[np.ndarray, float]) -> str:
    return fill(*task)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (two halves), got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=positive, default=1_000_000, help="array length (float64)")
    parser.add_argument("--file", help="put the array in this file (created) instead of a memfd")
    args = parser.parse_args()

    region: Region
    if args.file:
        region = FileRegion.open(args.file, "w+", size=args.n * 8)
    else:
        region = SharedRegion.create(args.n * 8)
    with region:
        data = region.ndarray(np.float64, args.n)
        half = args.n // 2
        halves = [(data[:half], 1.0), (data[half:], 2.0)]
        expected = half * 1.0 + (args.n - half) * 2.0
        for method in ("fork", "spawn"):
            data[:] = 0
            with multiprocessing.get_context(method).Pool(2) as pool:
                kinds = pool.starmap(fill, halves)
            print(f"Pool ({method}): workers got {kinds}; sum seen here {data.sum():g}")
            assert data.sum() == expected
        data[:] = 0
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(2, mp_context=spawn) as executor:
            kinds = list(executor.map(fill_task, halves))
        print(f"ProcessPoolExecutor (spawn): workers got {kinds}; sum seen here {data.sum():g}")
        assert data.sum() == expected
        del data, halves


if __name__ == "__main__":
    main()
