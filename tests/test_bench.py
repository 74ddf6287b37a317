"""The benchmark suite: the harness's arithmetic, the C limits, and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmap_alloc import MapAlloc, Perm
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc.bench import _limits, cases, report
from mmap_alloc.bench.harness import Case, Runner, Variant


def fixed_cost(ns_per_op: float) -> Variant:
    """A variant whose batches take exactly ``ns_per_op`` per operation (no clock)."""
    return Variant(f"{ns_per_op:g} ns", lambda n: None)


def case_of(*variants: Variant, target: float | None = None) -> Case:
    return Case("case", "group", 10, variants, variants[0].name, variants[-1].name, target)


def test_runner_takes_ratios_against_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    costs = {"subject": 300.0, "reference": 200.0}
    monkeypatch.setattr(
        "mmap_alloc.bench.harness._time_batch",
        lambda run, n: costs[run.__name__] * n,
    )

    def subject(n: int) -> None: ...
    def reference(n: int) -> None: ...

    result = Runner(rounds=5).run(
        case_of(Variant("subject", subject), Variant("reference", reference), target=1.6)
    )
    assert result.ratio == pytest.approx(1.5)
    assert result.variant("reference").ratio == 1.0
    assert result.variant("subject").median_ns == 300.0
    assert result.met is True
    assert len(result.variant("subject").samples_ns) == 5


def test_a_ratio_above_the_target_is_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mmap_alloc.bench.harness._time_batch", lambda run, n: n * run(1))
    result = Runner(rounds=3).run(
        case_of(Variant("slow", lambda n: 2.0), Variant("fast", lambda n: 1.0), target=1.5)
    )
    assert result.ratio == 2.0
    assert result.met is False
    assert "MISSED" in report.verdict(result)


def test_a_case_without_a_target_has_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mmap_alloc.bench.harness._time_batch", lambda run, n: n * run(1))
    result = Runner(rounds=1).run(case_of(Variant("a", lambda n: 1.0), Variant("b", lambda n: 1.0)))
    assert result.met is None
    assert report.verdict(result) == ""


def test_warmup_rounds_are_not_measured() -> None:
    calls: list[int] = []
    Runner(rounds=2, warmup=3).run(case_of(Variant("a", calls.append), Variant("b", calls.append)))
    assert len(calls) == 2 * (2 + 3)


def test_variants_take_turns_at_going_first() -> None:
    order: list[str] = []
    Runner(rounds=2, warmup=0).run(
        case_of(
            Variant("a", lambda n: order.append("a")), Variant("b", lambda n: order.append("b"))
        )
    )
    assert order == ["a", "b", "b", "a"]


def test_a_case_is_closed_after_it_runs() -> None:
    closed: list[bool] = []
    case = Case(
        "c", "g", 1, (Variant("a", lambda n: None),), "a", "a", close=lambda: closed.append(True)
    )
    Runner(rounds=1).run(case)
    assert closed == [True]


def test_c_limit_loops_run_without_error() -> None:
    _limits.map_unmap(100, 64 * 1024, 0, 1)
    _limits.grow_by_doubling(2, P, 64 * P)
    alloc = MapAlloc()
    with alloc.alloc(16 * P) as region:
        _limits.protect_flip(10, region.address, region.capacity)
        _limits.commit_uncommit(2, region.address, region.capacity)
        assert region.perms == Perm.READ | Perm.WRITE
        assert bytes(region) == bytes(16 * P)


def test_c_limit_reports_a_failed_mmap_as_oserror() -> None:
    with pytest.raises(OSError):
        _limits.map_unmap(1, 1 << 62, 0, 0)


def test_c_limit_random_reads_read_the_buffer() -> None:
    alloc = MapAlloc()
    with alloc.alloc(P) as region:
        assert _limits.random_reads(1000, region.address, P, 7) == 0
        region[:] = b"\1" * P
        assert _limits.random_reads(1000, region.address, P, 7) == 1000 * 0x0101010101010101 % 2**64


def test_memory_per_region_counts_python_heap_bytes() -> None:
    figures = cases.memory_per_region(count=200)
    assert 32 < figures["mmap_alloc Region"] < 1024


def test_quick_command_prints_every_case_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmap_alloc",
            "bench",
            "--quick",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    data = json.loads(out.read_text())
    names = [case["name"] for case in data["cases"]]
    assert "alloc+dealloc 4 KiB" in names
    assert any(name.startswith("protect flip") for name in names)
    for case in data["cases"]:
        assert case["name"] in done.stdout
        reference = next(v for v in case["variants"] if v["name"] == case["reference"])
        assert reference["ratio"] == 1.0
    assert data["machine"]["page_size"] == P
