"""The programs under examples/ run as written."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from machine_code import REWRITES_RUN_CODE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MACHINE = platform.machine().lower()
X86_64 = MACHINE in ("x86_64", "amd64")


def nested(depth: int) -> str:
    """An expression that needs ``depth`` + 1 xmm registers besides x."""
    return "x * (" * depth + "x + 1" + ")" * depth


def run_example(name: str, *args: str) -> str:
    """Run an example in a child process; its standard output."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def usage_error(name: str, *args: str) -> str:
    """Run an example that must refuse its arguments as argparse does: exit
    status 2, one ``error:`` line, no traceback; that line."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.skipif(
    not X86_64 and MACHINE not in ("aarch64", "arm64"), reason="x86-64 and arm64 only"
)
def test_jit_add_prints_the_sums() -> None:
    out = run_example("jit_add.py")
    assert "add(2, 3) = 5" in out
    assert "add(40, 2) = 42" in out
    assert "(r-x)" in out


@pytest.mark.skipif(not X86_64, reason="the expression JIT emits x86-64 code")
def test_jit_expr_agrees_with_python_and_reports_its_speed() -> None:
    out = run_example("jit_expr.py", "--n", "20000", "--runs", "1")
    assert "faster than pure Python" in out
    assert "max relative difference from Python: 0" in out


@pytest.mark.skipif(not X86_64, reason="the expression JIT emits x86-64 code")
@pytest.mark.parametrize(
    "expression",
    [
        "x",
        "2.5",
        "-x",
        "+x - 1",
        "x ** 0 + x ** 1 + x ** 5",
        "sqrt(abs(x)) / (x * x + 1)",
        "min(x, 0) * max(x, 1) - min(1, 2)",
        "-(((x + 1) * 2 - 3) / 4)",
        nested(14),
    ],
)
def test_jit_expr_compiles_every_construct(expression: str) -> None:
    out = run_example("jit_expr.py", "--n", "1000", "--runs", "1", "--", expression)
    assert "max relative difference from Python" in out


@pytest.mark.skipif(not X86_64, reason="the expression JIT emits x86-64 code")
@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("y + 1", "cannot compile"),
        ("x ** 0.5", "integer constant exponents"),
        ("x ** 17", "between 0 and 16"),
        ("cos(x)", "unknown function"),
        (nested(15), "too deeply nested"),
        ("x +", "invalid syntax"),
    ],
)  # fmt: skip
def test_jit_expr_refuses_what_it_cannot_compile(expression: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "jit_expr.py"), "--n", "10", "--", expression],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- IEEE results and arguments

jit_only = pytest.mark.skipif(not X86_64, reason="the expression JIT emits x86-64 code")


@jit_only
def test_jit_expr_gives_nan_where_python_sqrt_raises() -> None:
    out = run_example("jit_expr.py", "--n", "1001", "--runs", "1", "--", "sqrt(-1 - x*x)")
    with pytest.raises(ValueError) as info:  # the text is the interpreter's, by version
        math.sqrt(-1 - 5.0 * 5.0)
    assert f"pure Python raises ValueError ({info.value}) at x = -5" in out
    assert "non-finite  : 0 inf, 1001 NaN" in out
    assert "max relative difference from Python: 0\n" in out


@jit_only
def test_jit_expr_gives_inf_where_python_division_raises() -> None:
    out = run_example("jit_expr.py", "--n", "1001", "--runs", "1", "--", "1/(x-x)")
    assert "pure Python raises ZeroDivisionError" in out
    assert "non-finite  : 1001 inf, 0 NaN" in out
    assert "max relative difference from Python: 0\n" in out


@jit_only
def test_jit_expr_counts_inf_equal_to_inf() -> None:
    out = run_example("jit_expr.py", "--n", "1001", "--runs", "1", "--", "1e308 * x * 10")
    assert "raises" not in out  # Python overflows to inf without raising here
    assert " inf, 0 NaN" in out
    assert "max relative difference from Python: 0\n" in out


@jit_only
def test_jit_expr_zero_by_zero_is_nan_on_both_sides() -> None:
    out = run_example("jit_expr.py", "--n", "11", "--runs", "1", "--", "(x - x) / (x - x)")
    assert "non-finite  : 0 inf, 11 NaN" in out
    assert "max relative difference from Python: 0\n" in out


@jit_only
def test_jit_expr_with_no_values_has_nothing_to_time() -> None:
    out = run_example("jit_expr.py", "--n", "0")
    assert "nothing to time" in out
    assert "faster" not in out


@jit_only
def test_jit_expr_negative_n_is_a_usage_error() -> None:
    assert "argument --n: must be 0 or more, got -5" in usage_error("jit_expr.py", "--n", "-5")


@jit_only
def test_jit_expr_zero_runs_is_a_usage_error() -> None:
    assert "argument --runs: must be at least 1, got 0" in usage_error("jit_expr.py", "--runs", "0")


@jit_only
def test_jit_expr_runs_that_are_not_a_number_are_a_usage_error() -> None:
    assert "argument --runs: expected a whole number, got 'x'" in usage_error(
        "jit_expr.py", "--runs", "x"
    )


@jit_only
def test_jit_expr_refuses_a_constant_too_large_for_a_double() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "jit_expr.py"), "--n", "10", "--", "x + " + "9" * 400],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "too large for a float64" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(
    not X86_64 and MACHINE not in ("aarch64", "arm64"), reason="x86-64 and arm64 only"
)
@REWRITES_RUN_CODE
def test_jit_inline_cache_rewrites_the_call_site_a_thousand_times() -> None:
    out = run_example("jit_inline_cache.py")
    assert "1000 rewrites of the call site, 4000 calls through one function object" in out
    assert "every result matched Python (4000 checked)" in out
    assert "heap views in /proc/self/maps: r-x, rw-\n" in out


@pytest.mark.skipif(
    not X86_64 and MACHINE not in ("aarch64", "arm64"), reason="x86-64 and arm64 only"
)
@REWRITES_RUN_CODE
def test_jit_inline_cache_takes_its_counts_and_seed() -> None:
    out = run_example("jit_inline_cache.py", "--rewrites", "7", "--hits", "0", "--seed", "3")
    assert "7 rewrites of the call site, 7 calls" in out


def test_jit_inline_cache_refuses_zero_rewrites() -> None:
    assert "--rewrites must be at least 1" in usage_error("jit_inline_cache.py", "--rewrites", "0")


def test_jit_add_refuses_arguments() -> None:
    assert "unrecognized arguments: --n" in usage_error("jit_add.py", "--n", "3")


# ---------------------------------------------------------------- shared memory


@pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")
def test_shared_pool_sums_the_array_in_the_workers() -> None:
    out = run_example("shared_pool.py", "--n", "100000", "--workers", "2")
    assert "sum of 100,000 float64 by 2 worker(s): 4.99995e+09" in out
    assert "equal: True" in out


@pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--n", "0"), "argument --n: must be positive, got 0"),
        (("--workers", "-1"), "argument --workers: must be positive, got -1"),
        (("--n", "x"), "argument --n: expected a whole number, got 'x'"),
    ],
)
def test_shared_pool_refuses_bad_arguments(args: tuple[str, ...], message: str) -> None:
    assert message in usage_error("shared_pool.py", *args)


@pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")
@pytest.mark.parametrize("backing", ["memfd", "file"])
def test_fill_halves_workers_fill_an_array_the_parent_sees_whole(
    backing: str, tmp_path: Path
) -> None:
    args = ("--n", "100000") + (("--file", str(tmp_path / "array")) if backing == "file" else ())
    out = run_example("fill_halves.py", *args)
    assert out.count("sum seen here 150000") == 3
    assert "Pool (fork): workers got ['ndarray', 'ndarray']" in out


@pytest.mark.skipif(find_spec("numpy") is None, reason="needs numpy")
def test_fill_halves_refuses_bad_arguments() -> None:
    assert "argument --n: must be at least 2 (two halves), got 1" in usage_error(
        "fill_halves.py", "--n", "1"
    )
