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

import dataclasses
import os
import re
import subprocess
import sys
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


# ---------------------------------------------------------------- the API reference

# The members issue 26 found missing from the reference (most are written in C).
NAMED_IN_THE_ISSUE = {
    "Region": [
        *["size", "address", "capacity", "closed", "close", "view", "protect"],
        *["make_exec", "make_writable", "find", "rfind"],
    ],
    "MapAlloc": ["dealloc"],
    "ObjectPool": ["alloc", "free", "alloc_many", "free_many", "view", "close"],
    "SecretBuffer": [
        *["write", "compare", "close", "readonly", "readwrite", "noaccess", "size"],
        "access",
    ],
    "CodeHeap": ["free", "close"],
    "CodeBlock": ["write", "close"],
    "AllocError": ["errno", "size"],
}
INTERNALS = ["secret_pages", "MAPPINGS_PER_BUFFER", "SPARE_MAPPINGS", "noun", "closed_word"]
SITE_ID = re.compile(r'id="(mmap_alloc[^"]*)"')


@pytest.fixture(scope="module")
def api_ids(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The element ids of the API reference's pages: of the site that
    MMAP_ALLOC_SITE names (CI builds it once), or of one built here."""
    site = os.environ.get("MMAP_ALLOC_SITE")
    if site is None:
        if find_spec("mkdocs") is None or find_spec("mkdocstrings_handlers") is None:
            pytest.skip("building the site needs the docs extra: pip install '.[docs]'")
        site = str(tmp_path_factory.mktemp("site"))
        subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", site],
            cwd=DOCS.parent,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
            check=True,
        )
    pages = sorted(Path(site, "api").rglob("*.html"))
    assert pages, f"no API pages under {site}"
    return {found for page in pages for found in SITE_ID.findall(page.read_text())}


def public_members(cls: type) -> set[str]:
    """A class's public attributes and methods, its own and inherited from the
    library's classes (not from builtins or the enum machinery)."""
    foreign = {
        name
        for base in cls.__mro__
        if base.__module__ in ("builtins", "enum")
        for name in vars(base)
    }
    names = {name for name in dir(cls) if not name.startswith("_") and name not in foreign}
    if dataclasses.is_dataclass(cls):
        names |= {field.name for field in dataclasses.fields(cls)}
    return names


def public_names() -> list[str]:
    """Every public name of the package and of its modules with names of their own."""
    import mmap_alloc.features
    import mmap_alloc.numpy

    return [
        *(f"mmap_alloc.{name}" for name in mmap_alloc.__all__ if name != "__version__"),
        *(f"mmap_alloc.numpy.{name}" for name in mmap_alloc.numpy.__all__),
        *(f"mmap_alloc.features.{name}" for name in mmap_alloc.features.__all__),
    ]


@pytest.mark.parametrize(
    "member", [f"{cls}.{name}" for cls, names in NAMED_IN_THE_ISSUE.items() for name in names]
)
def test_api_reference_has_an_entry_for_each_member_written_in_c(
    api_ids: set[str], member: str
) -> None:
    assert f"mmap_alloc.{member}" in api_ids


def test_api_reference_has_an_entry_for_every_public_name(api_ids: set[str]) -> None:
    missing = [name for name in public_names() if name not in api_ids]
    assert not missing, f"public names missing from docs/api: {missing}"


def test_api_reference_has_an_entry_for_every_public_member_of_every_class(
    api_ids: set[str],
) -> None:
    import mmap_alloc

    missing = []
    for name in mmap_alloc.__all__:
        value = getattr(mmap_alloc, name)
        if isinstance(value, type):
            missing += [
                f"{name}.{member}"
                for member in sorted(public_members(value))
                if f"mmap_alloc.{name}.{member}" not in api_ids
            ]
    assert not missing, f"members missing from docs/api: {missing}"


def test_api_reference_shows_no_internal_name(api_ids: set[str]) -> None:
    private = [i for i in api_ids if any(part.startswith("_") for part in i.split(".")[1:])]
    assert not private
    internal = [i for i in api_ids if i.rsplit(".", 1)[-1] in INTERNALS]
    assert not internal
    modules = {"mmap_alloc.numpy": public_names(), "mmap_alloc.features": public_names()}
    for module, names in modules.items():
        shown = {i for i in api_ids if i.startswith(module + ".") and i.count(".") == 2}
        assert shown <= set(names), f"{module} shows names outside its __all__"
