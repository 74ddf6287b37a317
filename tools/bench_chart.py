"""Redraw the benchmark chart from a saved run, without running anything:

    python tools/bench_chart.py docs/benchmarks.json docs/benchmarks.png

(``python -m mmap_alloc bench --json ... --plot ...`` draws the same chart as
it measures.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmap_alloc.bench.report import plot_report


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    plot_report(json.loads(Path(argv[0]).read_text()), Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
