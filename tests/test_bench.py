"""The benchmark suite: the harness's arithmetic, the C loops, and the command."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pty
import subprocess
import sys
import threading
from importlib.util import find_spec
from pathlib import Path

import pytest

from mmap_alloc import MapAlloc, Perm
from mmap_alloc._linux import MADV_HUGEPAGE
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc.bench import _limits, cases, report
from mmap_alloc.bench.harness import Case, CaseResult, Runner, Variant
from mmap_alloc.bench.suite import CASE_GROUPS
from support import emulated_skip, ignored_advice


def fixed_cost(ns_per_op: float) -> Variant:
    """A variant whose batches take exactly ``ns_per_op`` per operation (no clock)."""
    return Variant(f"{ns_per_op:g} ns", lambda n: None)


def case_of(*variants: Variant, target: float | None = None) -> Case:
    return Case("case", "group", 10, variants, variants[0].name, variants[-1].name, target)


def test_a_case_holds_its_first_variant_to_its_second_unless_told() -> None:
    first, second, third = fixed_cost(1), fixed_cost(2), fixed_cost(3)
    case = Case("case", "group", 10, (first, second, third))
    assert (case.subject, case.reference) == (first.name, second.name)
    chosen = Case("case", "group", 10, (first, second, third), reference=third.name)
    assert (chosen.subject, chosen.reference) == (first.name, third.name)


def test_a_case_naming_a_subject_it_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="subject 'missing' is none of"):
        Case("case", "group", 10, (fixed_cost(1), fixed_cost(2)), subject="missing")


def test_a_case_naming_a_reference_it_lacks_is_refused() -> None:
    with pytest.raises(ValueError, match="reference 'missing' is none of"):
        Case("case", "group", 10, (fixed_cost(1), fixed_cost(2)), reference="missing")


def test_a_case_of_one_variant_names_its_reference() -> None:
    with pytest.raises(ValueError, match="no reference: name one"):
        Case("case", "group", 10, (fixed_cost(1),))
    alone = fixed_cost(1)
    case = Case("case", "group", 10, (alone,), reference=alone.name)
    assert case.subject == case.reference == alone.name


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


def test_c_loops_run_without_error() -> None:
    _limits.map_unmap(100, 64 * 1024, 0, 1)
    _limits.grow_by_doubling(2, P, 64 * P)
    alloc = MapAlloc()
    with alloc.alloc(16 * P) as region:
        _limits.protect_flip(10, region.address, region.capacity)
        _limits.commit_uncommit(2, region.address, region.capacity)
        assert region.perms == Perm.READ | Perm.WRITE
        assert bytes(region) == bytes(16 * P)


@emulated_skip(ignored_advice("12345"))
def test_c_loop_map_unmap_gives_the_advice_it_is_asked_for() -> None:
    _limits.map_unmap(3, 4 << 20, 0, 1, MADV_HUGEPAGE)
    with pytest.raises(OSError):
        _limits.map_unmap(1, P, 0, 0, 12345)  # no such advice: EINVAL


def test_the_cache_and_first_touch_cases_put_the_peers_beside_mmap_alloc() -> None:
    from mmap_alloc.bench.cache_cases import cache_round_trips, first_touch

    cached = list(cache_round_trips(cases.Scale(quick=True)))
    assert [case.target for case in cached if case.target is not None] == [0.35, 0.70]
    for case in cached:
        names = {variant.name for variant in case.variants}
        assert {"mmap_alloc cache=64", "C loop", "bytearray"} <= names
        assert case.subject == "mmap_alloc cache=64" and case.reference == "C loop"
        Runner(rounds=1, warmup=0).run(case)  # every variant runs
    if find_spec("numpy") is not None:
        (touch,) = first_touch(cases.Scale(quick=True))
        assert (touch.subject, touch.reference, touch.target) == (
            "mmap_alloc default",
            "numpy.zeros + touch",
            1.0,
        )
        assert "numpy.zeros" in {variant.name for variant in cached[0].variants}


def test_the_python_floor_maps_and_unmaps_one_mapping_per_call() -> None:
    address = _limits.map_one(P, 0, 0)
    assert address % P == 0
    ctypes.memmove(address, b"floor", 5)  # mapped read/write
    assert ctypes.string_at(address, 6) == b"floor\0"
    _limits.unmap_one(address, P)


def test_the_python_floor_reports_a_refused_mmap_as_oserror() -> None:
    with pytest.raises(OSError) as too_large:
        _limits.map_one(1 << 62, 0, 0)
    assert too_large.value.errno == errno.ENOMEM


@emulated_skip(ignored_advice("12345"))
def test_the_python_floor_reports_refused_advice_as_oserror() -> None:
    with pytest.raises(OSError) as bad_advice:
        _limits.map_one(P, 0, 12345)
    assert bad_advice.value.errno == errno.EINVAL


def test_the_round_trips_put_the_python_floor_beside_mmap_alloc() -> None:
    (case, *_) = cases.round_trips(cases.Scale(quick=True))
    names = [variant.name for variant in case.variants]
    assert (case.subject, case.reference) == ("mmap_alloc", "C loop")
    assert cases.PYTHON_FLOOR in names
    Runner(rounds=1, warmup=0).run(case)  # every variant runs


def test_c_loop_reports_a_failed_mmap_as_oserror() -> None:
    with pytest.raises(OSError):
        _limits.map_unmap(1, 1 << 62, 0, 0)


def test_c_loop_random_reads_read_the_buffer() -> None:
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
    assert data["quick"] is True
    names = [case["name"] for case in data["cases"]]
    assert "alloc+dealloc 4 KiB" in names
    assert "alloc+dealloc 4 KiB, cache=64" in names
    assert any(name.startswith("protect flip") for name in names)
    for case in data["cases"]:
        assert case["name"] in done.stdout
        reference = next(v for v in case["variants"] if v["name"] == case["reference"])
        assert reference["ratio"] == 1.0
    assert data["machine"]["page_size"] == P


def bench(*args: str, stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``python -m mmap_alloc bench ARGS`` in a child, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mmap_alloc", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=300,
        check=False,
    )


def usage_error(*args: str) -> str:
    """The error line of a bench command that must fail as argparse does: exit
    status 2, nothing on stdout, one ``error:`` line on stderr, no traceback."""
    result = bench(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("python -m mmap_alloc bench: error: ")
    assert result.stderr.startswith("usage: ")
    return errors[0]


# ---------------------------------------------------------------- bad arguments


def test_zero_rounds_is_a_usage_error() -> None:
    assert usage_error("--quick", "--rounds", "0").endswith(
        "argument --rounds: must be at least 1, got 0"
    )


def test_negative_rounds_is_a_usage_error() -> None:
    assert "argument --rounds: must be at least 1, got -1" in usage_error("--rounds", "-1")


def test_rounds_that_are_not_a_number_are_a_usage_error() -> None:
    assert "argument --rounds: expected a whole number, got 'many'" in usage_error(
        "--rounds", "many"
    )


def test_only_matching_no_case_is_a_usage_error_listing_the_cases() -> None:
    line = usage_error("--quick", "--only", "no such case")
    assert "argument --only: no case name contains 'no such case'" in line
    assert "'alloc+dealloc 4 KiB'" in line


def test_json_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "bench.json"
    line = usage_error("--quick", "--json", str(path))
    assert f"argument --json: cannot write {path}: No such file or directory" in line


def test_json_onto_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    assert f"argument --json: {tmp_path} is a directory" in usage_error(
        "--quick", "--json", str(tmp_path)
    )


def test_json_below_a_regular_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    line = usage_error("--quick", "--json", str(tmp_path / "file" / "bench.json"))
    assert "argument --json: cannot write" in line
    assert "Not a directory" in line


def test_plot_in_a_missing_directory_is_a_usage_error(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "missing" / "bench.png"
    assert f"argument --plot: cannot write {path}" in usage_error("--quick", "--plot", str(path))


def test_plot_without_matplotlib_is_a_usage_error(tmp_path: Path) -> None:
    if find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    line = usage_error("--quick", "--plot", str(tmp_path / "chart.png"))
    assert "argument --plot: needs matplotlib: pip install 'mmap-alloc[bench]'" in line


def test_plot_to_a_format_matplotlib_cannot_write_is_a_usage_error(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    line = usage_error("--quick", "--plot", str(tmp_path / "chart.txt"))
    assert "argument --plot: 'chart.txt' does not end in a format matplotlib writes" in line
    assert "png" in line


def test_an_unwritable_path_is_found_without_changing_an_existing_file(tmp_path: Path) -> None:
    from mmap_alloc import cli

    existing = tmp_path / "old.json"
    existing.write_text("kept")
    assert cli.unwritable(existing) is None
    assert existing.read_text() == "kept"
    assert cli.unwritable(tmp_path / "new.json") is None
    assert not (tmp_path / "new.json").exists()


def test_run_refuses_fewer_than_one_round() -> None:
    from mmap_alloc import bench as suite

    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        suite.run(quick=True, rounds=0, only="alloc+dealloc 4 KiB")


# ---------------------------------------------------------------- output


def test_output_piped_to_a_file_has_no_carriage_return_and_no_progress(tmp_path: Path) -> None:
    log = tmp_path / "bench.log"
    with log.open("w") as file:
        done = subprocess.run(
            [sys.executable, "-m", "mmap_alloc", "bench", "--quick", "--only", "protect flip"],
            stdout=file,
            stderr=subprocess.STDOUT,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0
    text = log.read_bytes()
    assert b"\r" not in text
    assert b"[1/1]" not in text  # the progress line: only on a terminal
    assert b"protect flip rw- <-> r-x, 64 KiB" in text


def test_progress_on_a_terminal_names_each_case_once_and_is_cleared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("rich")
    # a terminal that can erase a line, whatever the caller's is (rich draws
    # nothing live under TERM=dumb, or when TTY_INTERACTIVE says no)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("TTY_INTERACTIVE", raising=False)
    try:
        controller, terminal = pty.openpty()
    except OSError as exc:  # a chroot with /dev but no /dev/pts mounted (the arm64 runs)
        pytest.skip(f"no pseudo-terminal here: {exc}")
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        done = bench("--quick", "--only", "protect flip", "--rounds", "2", stderr=terminal)
    finally:
        os.close(terminal)
        reader.join(timeout=30)
        os.close(controller)
    assert done.returncode == 0
    shown = b"".join(chunks)
    assert b"[1/1] protect flip rw- <-> r-x, 64 KiB" in shown
    assert shown.rstrip().endswith(b"\x1b[2K")  # the line is erased before the report
    assert "protect flip" in done.stdout


def test_a_quick_run_is_labelled_a_smoke_run_without_verdicts() -> None:
    done = bench("--quick", "--only", "protect flip", "--rounds", "1")
    assert done.returncode == 0
    assert done.stdout.startswith("QUICK RUN: a smoke test")
    assert "quick run: not a verdict (<= 1.10)" in done.stdout
    assert "MISSED" not in done.stdout
    assert " met (" not in done.stdout


def test_the_report_says_what_the_c_loop_reference_is_and_is_not() -> None:
    text = report.header(quick=False, rounds=15)
    assert not text.startswith("QUICK")
    assert 'Reference "C loop": the same system calls mmap_alloc makes' in text
    assert "not a lower bound for other strategies" in text


def test_every_case_with_system_calls_has_a_c_loop_reference() -> None:
    suite = [case for group in CASE_GROUPS for case in group(cases.Scale(quick=True))]
    try:
        names = {variant.name for case in suite for variant in case.variants}
        assert "C loop" in names
        assert "C limit" not in names
        for case in suite:
            if case.group in ("round trip", "round trip, touched", "growth", "protection"):
                assert case.reference == "C loop"
    finally:
        for case in suite:
            if case.close is not None:
                case.close()


def ran(target: float) -> CaseResult:
    """A case with a target whose subject took twice the reference's time."""
    return Runner(rounds=1).run(
        case_of(Variant("slow", lambda n: None), Variant("fast", lambda n: None), target=target)
    )


def test_a_quick_run_gives_no_verdict_even_for_a_missed_target() -> None:
    result = ran(0.001)
    assert report.verdict(result, quick=True) == "quick run: not a verdict (<= 0.00)"


def test_quick_json_has_no_verdicts() -> None:
    data = report.to_json([ran(1.0)], {}, "python -m mmap_alloc bench --quick", quick=True)
    assert data["quick"] is True
    assert data["cases"][0]["met"] is None
    assert data["cases"][0]["verdict"].startswith("quick run: not a verdict")


def test_counts_print_as_integers_and_other_figures_with_decimals() -> None:
    text = report.table([], {"pool": {"live objects": 1_000_000, "slabs": 62, "MiB": 61.25}})
    assert "live objects  1,000,000" in text
    assert "slabs         62\n" in text
    assert "MiB           61.2" in text


def test_pool_memory_counts_are_integers() -> None:
    figures = cases.pool_memory(cases.Scale(quick=True))
    assert figures["live objects"] == 100_000
    for name in ("live objects", "slabs", "new mappings"):
        assert type(figures[name]) is int


def saved_case(
    group: str, name: str, ratios: dict[str, float], target: float | None
) -> dict[str, object]:
    """A case as a JSON report holds it: the first variant the subject, the last the reference."""
    names = list(ratios)
    return {
        "group": group,
        "name": name,
        "subject": names[0],
        "reference": names[-1],
        "target": target,
        "variants": [{"name": n, "ratio": r} for n, r in ratios.items()],
    }


def test_chart_puts_headline_topics_first_and_leaves_the_reference_out() -> None:
    data: dict[str, object] = {
        "cases": [
            saved_case("shared memory", "hand over", {"ours": 0.5, "theirs": 1.0}, None),
            saved_case("a topic of its own", "new", {"ours": 1.0, "ref": 1.0}, None),
            saved_case("round trip", "4 KiB", {"ours": 1.1, "peer": 1.3, "C loop": 1.0}, 1.1),
        ]
    }
    layout = report.chart_layout(data)
    assert [topic for topic, _ in layout] == ["round trip", "shared memory", "a topic of its own"]
    bars = layout[0][1]
    assert [(bar.label, bar.ratio, bar.subject, bar.target) for bar in bars] == [
        ("ours", 1.1, True, 1.1),
        ("peer", 1.3, False, None),
    ]
    assert bars[0].heading == "4 KiB (1 = C loop)"
    assert bars[1].heading == ""


def test_chart_ratios_are_written_so_that_tiny_and_huge_ones_read() -> None:
    assert [report.format_ratio(r) for r in (1.0423, 23.1, 0.000145)] == [
        "1.04x",
        "23x",
        "0.00015x",
    ]


def test_chart_is_redrawn_from_a_saved_report(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data: dict[str, object] = {
        "quick": True,
        "cases": [
            saved_case("round trip", "4 KiB", {"ours": 1.1, "peer": 40.0, "C loop": 1.0}, 1.1),
            saved_case("pool", "64 B", {"ours": 0.001, "list": 1.0}, 2.0),
        ],
    }
    path = tmp_path / "chart.png"
    report.plot_report(data, path)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_file_cases_run_and_remove_their_files(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmap_alloc",
            "bench",
            "--quick",
            "--rounds",
            "1",
            "--only",
            "file:",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert "find a needle at its end" in done.stdout
    assert "first sequential read of a 64 MiB sparse file" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the scanned and the sparse file are gone
