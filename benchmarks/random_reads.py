"""Random 8-byte reads over a large buffer: huge pages against 4 KiB pages.

Each configuration maps a buffer of --size bytes with mmap_alloc, faults it
in, and times numpy gathers (np.take, native code) of --reads uint64 values
at precomputed random indices: nearly every read misses the cache and, with
4 KiB pages, the TLB, so page walks dominate. Configurations: 4 KiB pages,
transparent huge pages (huge="thp"), and hugetlb 2 MiB pages (reserved for
the run when running as root, the pool restored afterwards; skipped
otherwise). Prints ns per read and the ratio to 4 KiB pages, from one run.

    python benchmarks/random_reads.py [--size 1G] [--reads 4000000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import numpy as np

import mmap_alloc
from mmap_alloc import MapAlloc, Region, _mman
from mmap_alloc._platform import format_size, hugepage_dir, hugepage_pool, thp_mode
from mmap_alloc.hugepages import thp_available

HUGE = 2 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


@contextmanager
def hugetlb_pages(count: int) -> Iterator[bool]:
    """At least ``count`` free 2 MiB hugetlb pages for the block (reserved as
    root if need be, then restored); yields whether they are there."""
    pool = hugepage_pool(HUGE)
    if pool is None:
        yield False
        return
    missing = count - pool.free
    path = hugepage_dir(HUGE) / "nr_hugepages"
    if missing > 0 and os.geteuid() == 0:
        path.write_text(str(pool.reserved + missing))
    try:
        current = hugepage_pool(HUGE)
        yield current is not None and current.free >= count
    finally:
        if missing > 0 and os.geteuid() == 0:
            path.write_text(str(pool.reserved))


def base_pages(size: int) -> Region:
    """A committed region of 4 KiB pages (advised against THP if THP is ``always``)."""
    alloc = MapAlloc()
    region = alloc.alloc(size)
    if thp_mode() == "always":
        region._advise(0, region.capacity, _mman.MADV_NOHUGEPAGE)
    alloc.commit(region)
    return region


def gather(region: Region, indices: np.ndarray) -> Callable[[], float]:
    """A timer of one gather of ``indices`` from the region, in seconds."""
    values = region.ndarray(np.uint64, region.size // 8)
    out = np.empty(len(indices), np.uint64)

    def run() -> float:
        start = time.perf_counter()
        np.take(values, indices, out=out)
        return time.perf_counter() - start

    run()  # warm up
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--reads", type=int, default=4_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    size = -(-args.size // HUGE) * HUGE
    indices = np.random.default_rng(1).integers(0, size // 8, args.reads, dtype=np.intp)
    print(
        f"mmap_alloc {mmap_alloc.__version__}, numpy {np.__version__}; buffer "
        f"{format_size(size)}, {args.reads} random 8-byte reads, best of {args.repeat} "
        f"(configurations interleaved); THP mode {thp_mode()!r}"
    )
    with ExitStack() as stack:
        regions = [("4 KiB pages", stack.enter_context(base_pages(size)))]
        if thp_available():
            thp = MapAlloc(huge="thp", commit=True).alloc(size)
            regions.append(("THP", stack.enter_context(thp)))
        if stack.enter_context(hugetlb_pages(size // HUGE)):
            hugetlb = MapAlloc(huge_pagesize=HUGE, commit=True).alloc(size)
            regions.append(("hugetlb 2 MiB", stack.enter_context(hugetlb)))
        else:
            print(f"hugetlb 2 MiB: skipped ({size // HUGE} free pages needed; run as root)")
        timers = [gather(region, indices) for _, region in regions]
        best = [float("inf")] * len(timers)
        for _ in range(args.repeat):
            for i in range(len(timers)):
                best[i] = min(best[i], timers[i]())
        timers.clear()  # the arrays pin the regions
        huge = [region.stats().huge_bytes for _, region in regions]

    print(f"{'backing':<16}{'ns/read':>10}{'huge pages':>14}{'speed-up':>10}")
    for (name, _), seconds, nbytes in zip(regions, best, huge, strict=True):
        per_read = seconds / args.reads
        print(
            f"{name:<16}{per_read * 1e9:>10.1f}{format_size(nbytes):>14}{best[0] / seconds:>9.2f}x"
        )


if __name__ == "__main__":
    main()
