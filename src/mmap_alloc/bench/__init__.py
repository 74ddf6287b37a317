"""The benchmark suite behind ``python -m mmap_alloc bench``.

mmap_alloc against the same system calls made from a C loop (the reference,
"C loop") and against what Python users would use instead, as ratios
measured in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from . import cases, report
from .harness import Case, CaseResult, Runner
from .suite import CASE_GROUPS

__all__ = ["NoCaseMatches", "run"]


class NoCaseMatches(ValueError):
    """``only`` selects no case; the message lists the case names."""


class _Progress:
    """The case being measured and its rounds, on one line of a terminal.

    rich draws it when installed (a bar, removed when the run ends); without
    rich a plain line is rewritten in place. When the stream is not a
    terminal nothing at all is written, so logs and files get only the report.
    """

    def __init__(self, cases: int, rounds: int, stream: TextIO, *, enabled: bool) -> None:
        self._cases = cases
        self._rounds = rounds
        self._stream = stream
        self._enabled = enabled
        self._index = 0
        self._label = ""
        self._bar: Any = None
        self._task: Any = None
        self._plain = False

    def __enter__(self) -> _Progress:
        if not self._enabled:
            return self
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
        except ImportError:
            self._plain = True
            return self
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=Console(file=self._stream),
            transient=True,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task("", total=self._rounds)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
        elif self._plain:
            self._stream.write("\r\x1b[K")  # a terminal only: clear the line
            self._stream.flush()

    def describe(self, label: str, *, rounds: int | None = None) -> None:
        """Start a new step: a case (``rounds`` to run) or a measurement without rounds."""
        if rounds is not None:
            self._index += 1
            label = f"[{self._index}/{self._cases}] {label}"
        self._label = label
        if self._bar is not None:
            self._bar.reset(self._task, total=rounds or 1, description=label)
        elif self._plain:
            self._stream.write(f"\r\x1b[K{label}")
            self._stream.flush()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def run(
    *,
    quick: bool = False,
    json_path: Path | None = None,
    plot_path: Path | None = None,
    rounds: int | None = None,
    only: str | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    progress: bool | None = None,
) -> list[CaseResult]:
    """Run the suite, print the report to ``out``, and write JSON or a chart if asked.

    ``progress`` shows which case runs on ``err``; by default only when ``err``
    is a terminal. ``NoCaseMatches`` when ``only`` selects no case;
    ``ValueError`` when ``rounds`` is below 1.
    """
    scale = cases.Scale(quick)
    rounds = rounds if rounds is not None else (3 if quick else 15)
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    warmup = 1
    suite: list[Case] = [case for group in CASE_GROUPS for case in group(scale)]
    # cases left out still own what they set up (and may share it): free it at the end
    skipped = [case for case in suite if only is not None and only not in case.name]
    suite = [case for case in suite if case not in skipped]
    if not suite:
        _close(skipped)
        names = ", ".join(repr(case.name) for case in skipped)
        raise NoCaseMatches(f"no case name contains {only!r}; the cases are {names}")
    if progress is None:
        progress = err.isatty()
    results = []
    with _Progress(len(suite), rounds + warmup, err, enabled=progress) as bar:
        runner = Runner(rounds=rounds, warmup=warmup, on_round=bar.advance)
        try:
            for case in suite:
                bar.describe(case.name, rounds=rounds + warmup)
                results.append(runner.run(case))
        finally:
            _close(skipped)
        extras: dict[str, report.Figures] = {}
        if only is None:
            bar.describe("memory per object and pool overhead")
            extras = {
                "Python heap bytes per live object (tracemalloc)": cases.memory_per_region(),
                "ObjectPool, live 64-byte objects, every byte written": cases.pool_memory(scale),
                "ObjectPool per-object overhead, % (mapped + bookkeeping)": cases.pool_overhead(),
            }
    out.write(report.header(quick=quick, rounds=rounds))
    out.write(report.table(results, extras, quick=quick))
    out.flush()
    command = "python -m mmap_alloc bench" + (" --quick" if quick else "")
    if json_path is not None:
        report.write_json(json_path, report.to_json(results, extras, command, quick=quick))
    if plot_path is not None:
        report.plot(results, plot_path, quick=quick)
    return results


def _close(suite: list[Case]) -> None:
    for case in suite:
        if case.close is not None:
            case.close()
