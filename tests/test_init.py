"""The package's front door: public names load on first use, and importing the
package pulls in nothing heavy (a guard on what is imported, not a timing)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmap_alloc
from support import FREE_THREADED

INIT = Path(mmap_alloc.__file__)

# Standard library modules that cost milliseconds to import, each pulled in by
# a part of the library that few programs use (or by nothing of ours at all).
HEAVY = [
    "dataclasses",
    "hmac",
    "inspect",
    "ipaddress",
    "pathlib",
    "platform",
    "secrets",
    "socket",
    "ssl",
    "subprocess",
    "threading",
    "typing",
]


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\n{statement}\nprint(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(ast.literal_eval(done.stdout))


def test_import_loads_no_submodule_and_no_heavy_module() -> None:
    loaded = modules_after("import mmap_alloc")
    assert {name for name in loaded if name.startswith("mmap_alloc.")} == {"mmap_alloc._version"}
    assert loaded.isdisjoint(HEAVY), sorted(loaded.intersection(HEAVY))


def test_allocating_a_region_loads_none_of_the_secret_shared_or_code_modules() -> None:
    loaded = modules_after("from mmap_alloc import MapAlloc\nMapAlloc().alloc(4096).close()")
    others = {"mmap_alloc.jit", "mmap_alloc.secret", "mmap_alloc.shared", "mmap_alloc._fdshare"}
    assert loaded.isdisjoint(others), sorted(loaded.intersection(others))
    costly = {"hmac", "ipaddress", "pathlib", "platform", "secrets", "socket", "ssl"}
    assert loaded.isdisjoint(costly), sorted(loaded.intersection(costly))


@pytest.mark.parametrize("name", mmap_alloc.__all__)
def test_every_public_name_is_the_object_its_module_defines(name: str) -> None:
    value = getattr(mmap_alloc, name)
    if name != "__version__":
        assert value.__module__.startswith("mmap_alloc.")
        module = sys.modules[value.__module__]
        assert getattr(module, name) is value


def test_the_lazy_table_agrees_with_the_imports_type_checkers_see() -> None:
    tree = ast.parse(INIT.read_text())
    seen = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module != "_version"
        for alias in node.names
    }
    homes = mmap_alloc._HOMES
    assert seen == homes
    assert sorted(mmap_alloc.__all__) == sorted([*homes, "__version__"])


def test_dir_lists_every_public_name_before_first_use() -> None:
    loaded = modules_after(
        "import mmap_alloc\n"
        "missing = set(mmap_alloc.__all__) - set(dir(mmap_alloc))\n"
        "assert not missing, missing"
    )
    assert "mmap_alloc.region" not in loaded


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="'Bogus'"):
        mmap_alloc.Bogus  # noqa: B018


@pytest.mark.skipif(not FREE_THREADED, reason="a free-threaded CPython (3.13t ...) only")
def test_importing_the_kernel_leaves_a_free_threaded_interpreter_without_the_gil() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", _GIL_AFTER_IMPORT],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON_GIL": ""},  # the build's default: off
        check=False,
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "False", "")


_GIL_AFTER_IMPORT = """
import sys
import mmap_alloc._mman, mmap_alloc.bench._limits
print(sys._is_gil_enabled())
"""
