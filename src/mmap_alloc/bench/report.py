"""Benchmark output: a table for people, JSON for scripts, a chart for the docs."""

from __future__ import annotations

import json
import os
import platform
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

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


# Topics in the order the chart shows them: the headline (what a region costs
# on top of the kernel) first; a topic the list does not name comes last.
TOPICS = (
    "round trip",
    "round trip, touched",
    "growth",
    "protection",
    "commit",
    "pool",
    "region as bytes",
    "secret memory",
    "code heap",
    "shared memory",
    "huge pages",
)

SUBJECT_COLOUR, PEER_COLOUR, TARGET_COLOUR = "#1f6fb4", "#a8a8a8", "#c0392b"


def format_ratio(ratio: float) -> str:
    """A ratio as the chart labels it: two decimals, fewer digits when large, two
    significant figures when tiny."""
    if ratio >= 10:
        return f"{ratio:.0f}x"
    if ratio >= 0.1:
        return f"{ratio:.2f}x"
    return f"{ratio:.2g}x"


class Bar(NamedTuple):
    """One bar of the chart: where it sits, its variant, and for the first bar
    of a case the case's heading."""

    y: float
    label: str
    ratio: float
    subject: bool
    target: float | None
    heading: str


def chart_layout(data: dict[str, Any]) -> list[tuple[str, list[Bar]]]:
    """The bars of a JSON report by topic, headline topics first; within a case
    mmap_alloc's variant first, the reference left out (it is the line at 1).
    Above a case's bars, its heading names the case and its reference."""
    order = {topic: i for i, topic in enumerate(TOPICS)}
    topics: dict[str, list[dict[str, Any]]] = {}
    for case in data["cases"]:
        topics.setdefault(case["group"], []).append(case)
    layout = []
    for topic, cases in sorted(topics.items(), key=lambda item: order.get(item[0], len(order))):
        bars: list[Bar] = []
        y = 0.0
        for case in cases:
            variants = [v for v in case["variants"] if v["name"] != case["reference"]]
            variants.sort(key=lambda v: v["name"] != case["subject"])
            for v in variants:
                subject = v["name"] == case["subject"]
                heading = ""
                if subject:
                    heading = textwrap.fill(f"{case['name']} (1 = {case['reference']})", 46)
                    y += (0.5 if bars else 0) + 0.55 * (heading.count("\n") + 1)
                target = case["target"] if subject else None
                bars.append(Bar(y, v["name"], v["ratio"], subject, target, heading))
                y += 1
        layout.append((topic, bars))
    return layout


def plot(results: Sequence[CaseResult], path: Path, *, quick: bool = False) -> None:
    """The chart of a run: see plot_report."""
    plot_report(to_json(results, {}, "", quick=quick), path)


def plot_report(data: dict[str, Any], path: Path) -> None:
    """A bar chart of a JSON report: each variant's time as a ratio to its case's
    reference, on a linear axis with the reference at 1, topics as panels.

    mmap_alloc's variant of each case is blue, peers grey, the case's target a
    red tick. The axis ends at 2.5: a longer bar stops at the edge with an
    arrow, and every bar carries its ratio as text.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit, row, top, bottom = 2.5, 0.26, 0.9, 0.5  # axis end; inches per bar, above, below
    layout = chart_layout(data)
    heights = [(bars[-1].y + 1) * row + 0.75 for _, bars in layout]
    figure, panels = plt.subplots(
        len(layout),
        1,
        figsize=(8.5, sum(heights) + top + bottom),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for axes, (topic, bars) in zip(panels[:, 0], layout, strict=True):
        for bar in bars:
            length = min(bar.ratio, limit)
            colour = SUBJECT_COLOUR if bar.subject else PEER_COLOUR
            axes.barh(bar.y, length, height=0.75, color=colour)
            if bar.target is not None:
                axes.plot([bar.target] * 2, [bar.y - 0.45, bar.y + 0.45], color=TARGET_COLOUR)
            past = bar.ratio > limit
            axes.text(
                limit - 0.03 if past else max(length, bar.target or 0) + 0.03,
                bar.y,
                format_ratio(bar.ratio) + (" \u2192" if past else ""),
                va="center",
                ha="right" if past else "left",
                fontsize=8,
                color="white" if past else "black",
                fontweight="bold" if bar.subject else "normal",
            )
            if bar.heading:
                axes.text(
                    -0.012,
                    bar.y - 0.42,
                    bar.heading,
                    transform=axes.get_yaxis_transform(),
                    ha="right",
                    va="bottom",
                    fontsize=8,
                    fontweight="bold",
                )
        axes.set_yticks([bar.y for bar in bars], [bar.label for bar in bars])
        for label, bar in zip(axes.get_yticklabels(), bars, strict=True):
            label.set_fontsize(7.5)
            label.set_color("#1a4f80" if bar.subject else "#555555")
        axes.set_ylim(bars[-1].y + 0.6, -0.6)
        axes.set_xlim(0, limit)
        axes.axvline(1.0, color="black", linewidth=1)
        axes.set_title(topic, loc="left", fontsize=10, fontweight="bold")
        axes.grid(axis="x", color="#e5e5e5")
        axes.set_axisbelow(True)
        axes.tick_params(axis="y", length=0)
        axes.tick_params(axis="x", labelsize=8)
    panels[-1, 0].set_xlabel(
        "time as a ratio to the case's reference (1 = as fast; below 1 = faster)", fontsize=9
    )
    title = "mmap_alloc (blue) and alternatives (grey) against each case's reference"
    if data.get("quick"):
        title = "QUICK RUN, not a measurement: " + title
    inches = figure.get_figheight()
    figure.text(0.5, 1 - 0.3 / inches, title, ha="center", fontsize=12, fontweight="bold")
    figure.text(
        0.5,
        1 - 0.6 / inches,
        "red tick: the case's target; an arrow: the bar goes on past the axis"
        " (its ratio is written)",
        ha="center",
        fontsize=9,
        color="#444444",
    )
    figure.tight_layout(rect=(0, 0, 1, 1 - top / inches))
    figure.savefig(path, dpi=120)
    plt.close(figure)
