"""The benchmark suite behind ``python -m mmap_alloc bench``.

mmap_alloc against the same system calls made from a C loop (the reference,
"C loop") and against what Python users would use instead, as ratios
measured in one run.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from ..exceptions import MapAllocError
from . import cases, report
from .harness import Case, CaseResult, Runner
from .suite import CASE_GROUPS

__all__ = ["NoCaseMatches", "Skipped", "run"]

T = TypeVar("T")

CANNOT_RUN = (MapAllocError, MemoryError, OSError)
"""What a case that cannot run on this machine raises: memory the kernel or a
limit refuses (RLIMIT_AS, RLIMIT_MEMLOCK, no huge pages), a file under /proc
or /sys that is not there. Such a case is skipped with the reason."""


class NoCaseMatches(ValueError):
    """``only`` selects no case; the message lists the case names."""


@dataclass(frozen=True)
class Skipped:
    """A case (or a group of cases, or a figure) that could not run here, and why."""

    name: str
    reason: str


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _collect(scale: cases.Scale, skipped: list[Skipped]) -> list[Case]:
    """Every case of every group; a group whose set-up fails is skipped."""
    suite: list[Case] = []
    for group in CASE_GROUPS:
        made: Iterator[Case] = group(scale)
        while True:
            try:
                case = next(made)
            except StopIteration:
                break
            except CANNOT_RUN as exc:
                skipped.append(Skipped(group.__name__.replace("_", " "), _reason(exc)))
                break
            suite.append(case)
    return suite


def _attempt(name: str, skipped: list[Skipped], work: Callable[[], T]) -> T | None:
    """``work()``, or None and a Skipped entry when it cannot run here."""
    try:
        return work()
    except CANNOT_RUN as exc:
        skipped.append(Skipped(name, _reason(exc)))
        return None


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
    cannot: list[Skipped] = []
    suite: list[Case] = _collect(scale, cannot)
    # cases left out still own what they set up (and may share it): free it at the end
    skipped = [case for case in suite if only is not None and only not in case.name]
    suite = [case for case in suite if case not in skipped]
    cannot = [entry for entry in cannot if only is None or only in entry.name]
    if not suite and not cannot:
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
                result = _attempt(case.name, cannot, functools.partial(runner.run, case))
                if result is not None:
                    results.append(result)
        finally:
            _close(skipped)
        extras: dict[str, report.Figures] = {}
        if only is None:
            bar.describe("memory per object and pool overhead")
            for title, measure in (
                ("Python heap bytes per live object (tracemalloc)", cases.memory_per_region),
                (
                    "ObjectPool, live 64-byte objects, every byte written",
                    lambda: cases.pool_memory(scale),
                ),
                ("ObjectPool per-object overhead, % (mapped + bookkeeping)", cases.pool_overhead),
            ):
                figures = _attempt(title, cannot, measure)
                if figures is not None:
                    extras[title] = figures
    out.write(report.header(quick=quick, rounds=rounds))
    out.write(report.table(results, extras, quick=quick))
    if cannot:
        out.write("\nskipped: cannot run on this machine\n")
        out.writelines(f"  {entry.name}: {entry.reason}\n" for entry in cannot)
    out.flush()
    command = "python -m mmap_alloc bench" + (" --quick" if quick else "")
    if json_path is not None:
        data = report.to_json(results, extras, command, quick=quick)
        data["skipped"] = [{"name": entry.name, "reason": entry.reason} for entry in cannot]
        report.write_json(json_path, data)
    if plot_path is not None:
        report.plot(results, plot_path, quick=quick)
    return results


def _close(suite: list[Case]) -> None:
    for case in suite:
        if case.close is not None:
            case.close()
