"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mmap_alloc import MapAlloc
from mmap_alloc._platform import PAGE_SIZE, mapping_count


@pytest.fixture(autouse=True, scope="module")
def no_mapping_leak() -> Iterator[None]:
    """Every test module leaves the process with as many mappings as it found."""
    gc.collect()
    before = mapping_count()
    yield
    gc.collect()
    after = mapping_count()
    assert after <= before, f"{after - before} mapping(s) leaked by this module"


@pytest.fixture
def alloc() -> MapAlloc:
    """A default allocator: read/write, no exec, commit off, normal pages."""
    return MapAlloc()


@pytest.fixture
def page() -> int:
    """The system page size."""
    return PAGE_SIZE
