"""The benchmark suite behind ``python -m mmap_alloc bench``.

mmap_alloc against the same system calls made from a C loop (the floor) and
against what Python users would use instead, as ratios measured in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from . import cases, report
from .harness import Case, CaseResult, Runner

__all__ = ["run"]


class _Progress:
    """Rounds done out of a total, on a stream: rich's bar when rich is installed."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self._total = total
        self._done = 0
        self._label = ""
        self._stream = stream
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        try:
            from rich.console import Console
            from rich.progress import Progress
        except ImportError:
            return self
        self._bar = Progress(console=Console(file=self._stream), transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task("", total=self._total)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        else:
            self._stream.write("\n")

    def describe(self, label: str) -> None:
        self._label = label
        if self._bar is not None:
            self._bar.update(self._task, description=label)

    def advance(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.advance(self._task)
        else:
            self._stream.write(f"\r[{self._done}/{self._total}] {self._label:<60}")
            self._stream.flush()


def run(
    *,
    quick: bool = False,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    rounds: int | None = None,
    only: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> list[CaseResult]:
    """Run the suite, print the table to ``out``, and write JSON or a chart if asked."""
    scale = cases.Scale(quick)
    rounds = rounds if rounds is not None else (3 if quick else 15)
    warmup = 1
    suite: list[Case] = [case for group in cases.CASE_GROUPS for case in group(scale)]
    # cases left out still own what they set up (and may share it): free it at the end
    skipped = [case for case in suite if only is not None and only not in case.name]
    suite = [case for case in suite if case not in skipped]
    results = []
    with _Progress(len(suite) * (rounds + warmup), err) as progress:
        runner = Runner(rounds=rounds, warmup=warmup, on_round=progress.advance)
        for case in suite:
            progress.describe(case.name)
            results.append(runner.run(case))
        for case in skipped:
            if case.close is not None:
                case.close()
        extras = {}
        if only is None:
            progress.describe("memory")
            extras = {
                "Python heap bytes per live object (tracemalloc)": cases.memory_per_region(),
                "ObjectPool, live 64-byte objects, every byte written": cases.pool_memory(scale),
                "ObjectPool per-object overhead, % (mapped + bookkeeping)": cases.pool_overhead(),
            }
    out.write(report.table(results, extras))
    command = "python -m mmap_alloc bench" + (" --quick" if quick else "")
    if json_path is not None:
        report.write_json(json_path, report.to_json(results, extras, command))
    if plot_path is not None:
        report.plot(results, plot_path)
    return results
