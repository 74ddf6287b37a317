"""The programs under examples/ run as written."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

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
    return result.stdout


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
