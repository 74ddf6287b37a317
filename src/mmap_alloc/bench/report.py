"""Benchmark output: a table for people, JSON for scripts, a chart for the docs."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._linux import PAGE_SIZE, thp_mode
from .harness import CaseResult

Figures = dict[str, int | float]
"""Named figures of a measurement without rounds: counts are ints, the rest floats."""

REFERENCE_NOTE = (
    'Reference "C loop": the same system calls mmap_alloc makes, made from a C loop with\n'
    "no Python in between; the ratio to it is what mmap_alloc adds on top of the kernel.\n"
    "It is not a lower bound for other strategies: a peer that does the work another way\n"
    "(huge pages, memory malloc already holds, a copy instead of mremap) may beat it.\n"
)

QUICK_NOTE = (
    "QUICK RUN: a smoke test with smaller cases and few rounds. Its figures are not\n"
    "measurements and its verdicts are not verdicts; run without --quick to measure.\n"
)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "page_size": PAGE_SIZE,
        "thp": thp_mode(),
    }


def format_time(ns: float) -> str:
    """A duration with a unit that keeps three significant figures."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def header(*, quick: bool, rounds: int) -> str:
    """What the report's figures are: the method in one line, the reference, a quick run's label."""
    lines = (
        f"mmap_alloc bench: {rounds} measured round(s) per case; times are medians per\n"
        "operation, ratios medians of per-round ratios to the case's reference.\n"
    )
    return (QUICK_NOTE if quick else "") + lines + REFERENCE_NOTE + "\n"


def verdict(result: CaseResult, *, quick: bool = False) -> str:
    """``met`` or ``MISSED`` against the case's target; a quick run gives none."""
    if result.case.target is None:
        return ""
    sign = ">=" if result.case.higher_is_better else "<="
    target = f"({sign} {result.case.target:.2f})"
    if quick:
        return f"quick run: not a verdict {target}"
    return f"{'met' if result.met else 'MISSED'} {target}"


def format_figure(value: float) -> str:
    """A count as an integer with thousands separators, any other figure with one decimal."""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}"


def table(results: Sequence[CaseResult], extras: dict[str, Figures], *, quick: bool = False) -> str:
    """The results as a plain-text table, a block per case."""
    lines = []
    for result in results:
        case = result.case
        lines.append(f"{case.name}  [{case.note}]  {verdict(result, quick=quick)}".rstrip())
        width = max(len(v.name) for v in result.variants)
        for v in result.variants:
            lines.append(
                f"  {v.name:<{width}}  {format_time(v.median_ns):>10} per op"
                f"  ({format_time(v.min_ns)} .. {format_time(v.max_ns)})"
                f"  x{v.ratio:.3f} of {case.reference}"
            )
        lines.append("")
    for title, values in extras.items():
        lines.append(title)
        width = max(len(name) for name in values)
        for name, value in values.items():
            lines.append(f"  {name:<{width}}  {format_figure(value)}")
        lines.append("")
    return "\n".join(lines)


def to_json(
    results: Sequence[CaseResult],
    extras: dict[str, Figures],
    command: str,
    *,
    quick: bool = False,
) -> dict[str, Any]:
    """The results as plain data; a quick run is marked and has no verdicts (``met`` null)."""
    return {
        "command": command,
        "quick": quick,
        "note": (QUICK_NOTE if quick else "") + REFERENCE_NOTE,
        "machine": machine(),
        "cases": [
            {
                "name": r.case.name,
                "group": r.case.group,
                "note": r.case.note,
                "operations_per_batch": r.case.n,
                "rounds": r.rounds,
                "subject": r.case.subject,
                "reference": r.case.reference,
                "target": r.case.target,
                "higher_is_better": r.case.higher_is_better,
                "ratio": r.ratio,
                "met": None if quick else r.met,
                "verdict": verdict(r, quick=quick),
                "variants": [
                    {
                        "name": v.name,
                        "median_ns": v.median_ns,
                        "min_ns": v.min_ns,
                        "max_ns": v.max_ns,
                        "ratio": v.ratio,
                        "samples_ns": list(v.samples_ns),
                    }
                    for v in r.variants
                ],
            }
            for r in results
        ],
        "extras": extras,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def plot(results: Sequence[CaseResult], path: Path, *, quick: bool = False) -> None:
    """A horizontal bar chart of every variant's ratio to its case's reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, colours = [], [], []
    for result in results:
        for v in result.variants:
            if v.name == result.case.reference:
                continue
            labels.append(f"{result.case.name}: {v.name}")
            ratios.append(v.ratio)
            colours.append("tab:blue" if v.name == result.case.subject else "tab:gray")
    figure, axes = plt.subplots(figsize=(10, 0.28 * len(labels) + 1.5))
    positions = range(len(labels))
    axes.barh(list(positions), ratios, color=colours)
    axes.set_yticks(list(positions), labels, fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xlabel("time relative to the case's reference (log scale; 1 = reference)")
    title = "mmap_alloc (blue) and peers (grey) against the reference of each case"
    axes.set_title(("quick run, not a measurement: " if quick else "") + title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
