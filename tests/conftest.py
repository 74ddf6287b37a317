"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator

import pytest

from mmap_alloc import MapAlloc
from mmap_alloc._platform import PAGE_SIZE, mapping_count


def interpreter_arenas() -> int:
    """How many 1 MiB arenas pymalloc holds now: mappings of the interpreter's
    own, which it keeps while objects in them live (0 under PYTHONMALLOC=malloc)."""
    with tempfile.TemporaryFile() as out:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        found = re.search(rb"# arenas allocated current +=? *([0-9,]+)", out.read())
    return int(found.group(1).replace(b",", b"")) if found else 0


@pytest.fixture(autouse=True, scope="module")
def no_mapping_leak() -> Iterator[None]:
    """Every test module leaves the process with as many mappings as it found
    (not counting arenas the interpreter took for its own objects meanwhile)."""
    gc.collect()
    before = mapping_count() - interpreter_arenas()
    yield
    gc.collect()
    after = mapping_count() - interpreter_arenas()
    assert after <= before, f"{after - before} mapping(s) leaked by this module"


@pytest.fixture
def alloc() -> MapAlloc:
    """A default allocator: read/write, no exec, commit off, normal pages."""
    return MapAlloc()


@pytest.fixture
def page() -> int:
    """The system page size."""
    return PAGE_SIZE
