"""The documentation site's examples run as written.

Every ```python block of every page under docs/ runs, page by page, in the
order of the page, in one fresh namespace per page (so a later block may use
what an earlier one defined). A block that imports numpy is skipped when
numpy is missing; a block right after the line ``<!-- no-test -->`` is not
run at all (use it sparingly: for output that cannot run anywhere); one
right after ``<!-- needs-cpu -->`` is not run under an emulator
(ARM64_EMULATED, set by the arm64 runs under qemu-user): for code that
rewrites machine code which already ran, which qemu-user does not see; nor
one right after ``<!-- needs-kernel -->``: for a kernel effect qemu-user does
not reproduce (hugetlb pages, mlock2(MLOCK_ONFAULT); see tests/support.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.util import find_spec, module_from_spec, spec_from_file_location
from pathlib import Path

import pytest

from support import EMULATED

DOCS = Path(__file__).resolve().parent.parent / "docs"
NO_TEST = "<!-- no-test -->"
NEEDS_CPU = "<!-- needs-cpu -->"
NEEDS_KERNEL = "<!-- needs-kernel -->"
FENCE = re.compile(r"^```python\n(.*?)^```$", flags=re.M | re.S)
NEEDS_NUMPY = re.compile(r"^\s*(import numpy|from numpy|import mmap_alloc\.numpy)", flags=re.M)


@dataclass(frozen=True)
class Block:
    line: int
    code: str
    skipped: bool
    needs_cpu: bool = False
    needs_kernel: bool = False


def blocks(text: str) -> list[Block]:
    """The ```python blocks of a page: where each starts, its code, whether it
    is marked not to be run."""
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append(
            Block(
                text.count("\n", 0, match.start(1)) + 1,
                match.group(1),
                before == NO_TEST,
                before == NEEDS_CPU,
                before == NEEDS_KERNEL,
            )
        )
    return found


PAGES = sorted(DOCS.rglob("*.md"))
WITH_CODE = [page for page in PAGES if blocks(page.read_text())]


def test_the_site_has_pages_with_examples() -> None:
    assert len(WITH_CODE) >= 6


def test_blocks_finds_each_block_its_line_and_its_marker() -> None:
    text = "# t\n\n```python\na = 1\n```\n\n<!-- no-test -->\n```python\nb = 2\n```\n"
    assert blocks(text) == [Block(4, "a = 1\n", False), Block(9, "b = 2\n", True)]
    text = "<!-- needs-cpu -->\n```python\nc = 3\n```\n"
    assert blocks(text) == [Block(3, "c = 3\n", False, True)]
    text = "<!-- needs-kernel -->\n```python\nd = 4\n```\n"
    assert blocks(text) == [Block(3, "d = 4\n", False, False, True)]


@pytest.mark.parametrize("page", WITH_CODE, ids=[str(page.relative_to(DOCS)) for page in WITH_CODE])
def test_page_examples_run_in_order(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "docs"}
    for block in blocks(page.read_text()):
        if block.skipped or ((block.needs_cpu or block.needs_kernel) and EMULATED):
            continue
        if NEEDS_NUMPY.search(block.code) and find_spec("numpy") is None:
            continue
        # padded so that a traceback names the page's own line numbers
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        exec(code, namespace)


def test_every_page_is_in_the_sites_navigation() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    for page in PAGES:
        assert f": {page.relative_to(DOCS)}\n" in nav, f"{page} is not in mkdocs.yml's nav"


def test_the_tour_page_is_the_readmes_tour() -> None:
    spec = spec_from_file_location("docs_hooks", DOCS.parent / "tools" / "docs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = module_from_spec(spec)
    spec.loader.exec_module(hooks)
    readme = (DOCS.parent / "README.md").read_text()
    tour = hooks.readme_tour(readme)
    assert hooks.MARKER in (DOCS / "tour.md").read_text()
    assert "## The builder" in tour  # the README's ### headings, one level up
    assert "alloc = MapAlloc()" in tour
    assert "\n## Protection and JIT" not in tour  # the next section of the README stays out
