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


def verdict(result: CaseResult) -> str:
    met = result.met
    if met is None:
        return ""
    sign = ">=" if result.case.higher_is_better else "<="
    return f"{'met' if met else 'MISSED'} ({sign} {result.case.target:.2f})"


def table(results: Sequence[CaseResult], extras: dict[str, dict[str, float]]) -> str:
    """The results as a plain-text table, a block per case."""
    lines = []
    for result in results:
        case = result.case
        lines.append(f"{case.name}  [{case.note}]  {verdict(result)}".rstrip())
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
            lines.append(f"  {name:<{width}}  {value:,.1f}")
        lines.append("")
    return "\n".join(lines)


def to_json(
    results: Sequence[CaseResult], extras: dict[str, dict[str, float]], command: str
) -> dict[str, Any]:
    """The results as plain data."""
    return {
        "command": command,
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
                "met": r.met,
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


def plot(results: Sequence[CaseResult], path: Path) -> None:
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
    axes.set_title("mmap_alloc (blue) and peers (grey) against the reference of each case")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
