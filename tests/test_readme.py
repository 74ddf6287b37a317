"""The README's examples run as written: every ```python block is a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()


def blocks(language: str) -> list[tuple[int, str]]:
    """(line where the code starts, code) of every fenced block in ``language``."""
    return [
        (TEXT.count("\n", 0, match.start(1)) + 1, match.group(1))
        for match in re.finditer(rf"^```{language}\n(.*?)^```$", TEXT, flags=re.M | re.S)
    ]


PYTHON = blocks("python")


def test_the_readme_has_python_examples() -> None:
    assert len(PYTHON) >= 5


def test_the_readme_opens_with_the_two_commands() -> None:
    first, second = (code.strip() for _, code in blocks("sh")[:2])
    assert first.endswith("pip install . && python -m mmap_alloc info")
    assert second.endswith("pip install '.[test]' && python -m pytest")


@pytest.mark.parametrize(("line", "code"), PYTHON, ids=[f"line{line}" for line, _ in PYTHON])
def test_readme_example_runs(line: int, code: str, capsys: pytest.CaptureFixture[str]) -> None:
    if "import numpy" in code:
        pytest.importorskip("numpy")
    # padded so that a traceback names the README's own line numbers
    exec(compile("\n" * (line - 1) + code, str(README), "exec"), {"__name__": "readme"})
