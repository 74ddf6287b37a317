"""ObjectPool benchmark: speed ratios against its peers, and memory.

    python benchmarks/pool_bench.py [--rounds 15] [--pairs 200000]

Every variant is timed in each round, in a shuffled order (so that drift of a
shared, noisy machine spreads over all of them); a first round warms up and is
dropped; the figures are medians over the rounds, and ratios are taken between
medians of the same run. Absolute times vary from run to run; the ratios are
what the targets are about.

Targets (issue 5):
  - alloc()+free() at most 2x list.pop()+list.append(), and faster than
    bytearray(64), ctypes.create_string_buffer(64), libc malloc/free via ctypes;
  - alloc_many(10_000)+free_many(): per object at most half the single pair;
  - 1,000,000 live 64-byte objects: at most 70 MiB resident, 200 mappings;
  - per-object memory overhead at most 2% for objects of 64 bytes or more.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import random
import statistics
import sys
import timeit
from typing import Any

from mmap_alloc import ObjectPool
from mmap_alloc._platform import PAGE_SIZE, mapping_count

OBJ_SIZE = 64
BATCH = 10_000
MiB = 1 << 20

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.free.restype = None
_libc.free.argtypes = [ctypes.c_void_p]

# name -> (statement, setup); `pool`, `lst`, `malloc`, `free` ... come from the namespace
PAIRS: dict[str, tuple[str, str]] = {
    "list.pop()+list.append()": ("x = lst.pop(); lst.append(x)", ""),
    "pool.alloc()+pool.free()": ("a = pool.alloc(); pool.free(a)", ""),
    "bytearray(64)": ("b = bytearray(64); del b", ""),
    "ctypes.create_string_buffer(64)": ("b = create_string_buffer(64); del b", ""),
    "libc malloc(64)+free() via ctypes": ("p = malloc(64); free(p)", ""),
    # the same pairs through bound methods held in locals
    "bound pop()+append()": ("x = pop(); append(x)", "pop = lst.pop; append = lst.append"),
    "bound alloc()+free()": ("a = alloc(); free_(a)", "alloc = pool.alloc; free_ = pool.free"),
}
BATCH_STMT = "pool.free_many(pool.alloc_many(BATCH))"


def measure(rounds: int, pairs: int) -> dict[str, list[float]]:
    """Seconds per pair (per object for the batch) of every variant, one
    sample per round."""
    pool = ObjectPool(OBJ_SIZE)
    keep = pool.alloc_many(1000)  # a pool in use, not an empty one
    namespace: dict[str, Any] = {
        "pool": pool,
        "lst": [object() for _ in range(1000)],
        "create_string_buffer": ctypes.create_string_buffer,
        "malloc": _libc.malloc,
        "free": _libc.free,
        "BATCH": BATCH,
    }
    timers: dict[str, tuple[timeit.Timer, int, int]] = {
        name: (timeit.Timer(stmt, setup, globals=namespace), pairs, pairs)
        for name, (stmt, setup) in PAIRS.items()
    }
    batch_loops = max(1, pairs // BATCH // 4)
    timers["pool.alloc_many(10_000)+free_many()"] = (
        timeit.Timer(BATCH_STMT, globals=namespace),
        batch_loops,
        batch_loops * BATCH,
    )
    samples: dict[str, list[float]] = {name: [] for name in timers}
    order = list(timers)
    for round_ in range(rounds + 1):
        random.shuffle(order)
        for name in order:
            timer, number, objects = timers[name]
            seconds = timer.timeit(number) / objects
            if round_:  # round 0 warms up
                samples[name].append(seconds)
    pool.free_many(keep)
    pool.close()
    return samples


def ratio(samples: dict[str, list[float]], name: str, base: str) -> float:
    """The median over the rounds of name / base measured in the same round."""
    return statistics.median(a / b for a, b in zip(samples[name], samples[base], strict=True))


def resident_bytes() -> int:
    """The process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def million_objects() -> dict[str, float]:
    """Memory of 1,000,000 live 64-byte objects, every byte written."""
    gc.collect()
    maps, rss = mapping_count(), resident_bytes()
    pool = ObjectPool(OBJ_SIZE)
    memset = ctypes.memset
    for _ in range(1_000_000 // BATCH):
        for address in pool.alloc_many(BATCH):
            memset(address, 0xA5, OBJ_SIZE)
    gc.collect()
    stats = pool.stats()
    figures = {
        "live objects": stats.live,
        "slabs": stats.slabs,
        "pool resident (slabs, MiB)": stats.resident / MiB,
        "pool bookkeeping (MiB)": stats.metadata / MiB,
        "process RSS growth (MiB)": (resident_bytes() - rss) / MiB,
        "new mappings": mapping_count() - maps,
    }
    pool.close()
    return figures


def overhead(obj_size: int, align: int | None) -> tuple[int, float, float]:
    """(stride, bookkeeping overhead, overhead including alignment padding) of
    a pool filled to 16 full slabs: bytes mapped + bookkeeping beyond the
    objects, as a fraction of the objects' bytes."""
    pool = ObjectPool(obj_size, align=align)
    per_slab = pool.slab_size // pool.stride
    pool.alloc_many(16 * per_slab)
    stats = pool.stats()
    used = stats.mapped + stats.metadata
    result = (
        pool.stride,
        used / (stats.live * pool.stride) - 1,
        used / (stats.live * obj_size) - 1,
    )
    pool.close()
    return result


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--pairs", type=int, default=200_000, help="pairs per round (200000)")
    args = parser.parse_args(argv)

    print(f"Python {platform.python_version()} on {platform.machine()}, {sys.platform}")
    print(f"{args.rounds} rounds of {args.pairs} pairs; objects of {OBJ_SIZE} bytes\n")
    samples = measure(args.rounds, args.pairs)
    base, pair = "list.pop()+list.append()", "pool.alloc()+pool.free()"
    print(f"{'variant':<40} {'median ns':>9} {'x list':>7}")
    for name, values in samples.items():
        print(
            f"{name:<40} {statistics.median(values) * 1e9:9.1f} {ratio(samples, name, base):7.2f}"
        )

    peers = (
        "bytearray(64)",
        "ctypes.create_string_buffer(64)",
        "libc malloc(64)+free() via ctypes",
    )
    rows = [
        (pair, base, "<= 2", 2.0),
        ("bound alloc()+free()", "bound pop()+append()", "<= 2", 2.0),
        *((pair, peer, "< 1", 1.0) for peer in peers),
        ("pool.alloc_many(10_000)+free_many()", pair, "<= 0.5", 0.5),
    ]
    print("\nratios (median over the rounds of the ratio within a round):")
    for name, other, target, limit in rows:
        value = ratio(samples, name, other)
        ok = value < limit if target.startswith("< ") else value <= limit
        print(f"  {name} / {other}")
        print(f"      {value:5.2f}  (target {target}) {verdict(ok)}")

    print("\n1,000,000 live 64-byte objects, every byte written:")
    memory = million_objects()
    for name, value in memory.items():
        shown = f"{value:10.2f}" if isinstance(value, float) else f"{value:10}"
        print(f"  {name:<30} {shown}")
    resident = memory["pool resident (slabs, MiB)"] + memory["pool bookkeeping (MiB)"]
    print(f"  pool resident + bookkeeping <= 70 MiB: {verdict(resident <= 70)}")
    print(f"  new mappings <= 200:                   {verdict(memory['new mappings'] <= 200)}")

    print("\nPer-object memory overhead (16 full slabs; mapped + bookkeeping beyond the objects):")
    print(f"  {'obj_size':>8} {'align':>5} {'stride':>6} {'bookkeeping':>12} {'with padding':>13}")
    for obj_size, align in (
        (64, None),
        (100, None),
        (100, 4),
        (256, None),
        (1000, 8),
        (4096, None),
    ):
        stride, book, padded = overhead(obj_size, align)
        print(f"  {obj_size:>8} {align or 16:>5} {stride:>6} {book:>11.2%} {padded:>12.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
