"""Fixtures shared by the test modules."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from mmap_alloc import CodeHeap, MapAlloc, ObjectPool, Perm, Region, SecretBuffer, _mman, secret
from mmap_alloc._linux import PAGE_SIZE
from secret_support import Make, missing, needs_guard_install, needs_memfd_secret
from support import EMULATED

if EMULATED:
    # about ten times slower under emulation: hypothesis's 200 ms deadline and
    # its too-slow health check would fail examples on time, not on behaviour
    settings.register_profile(
        "emulated", deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("emulated")


def _open_regions() -> list[_mman.Region]:
    return [o for o in gc.get_objects() if isinstance(o, _mman.Region) and not o.closed]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long forms (``-m stress``) run as long as they need: the per-test
    timeout of pyproject.toml is for the normal run."""
    for item in items:
        if item.get_closest_marker("stress") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(0))


@pytest.fixture(autouse=True)
def no_mapping_leak() -> Iterator[None]:
    """Every test unmaps every byte the library mapped for it, and no more.

    This counts exactly: the C layer adds up what its own mmap, mremap and
    munmap calls map and unmap (``_mman.mapped_bytes()``). Counting lines of
    /proc/self/maps instead is noisy both ways: imports (numpy: its .so files
    and its thread stacks), obmalloc arenas and malloc come and go between
    tests, and a leaked region that merges with a neighbour adds no line.
    """
    before = _mman.mapped_bytes()
    yield
    if _mman.mapped_bytes() != before:
        gc.collect()  # regions held only by reference cycles (tracebacks)
    leaked = _mman.mapped_bytes() - before
    if leaked:
        regions = "".join(f"\n  {region!r}" for region in _open_regions())
        pytest.fail(
            f"{abs(leaked)} byte(s) {'left mapped' if leaked > 0 else 'unmapped twice'} "
            f"by this test; open regions:{regions or ' none'}",
            pytrace=False,
        )


@pytest.fixture
def alloc() -> MapAlloc:
    """A default allocator: read/write, no exec, commit off, normal pages."""
    return MapAlloc()


@pytest.fixture
def page() -> int:
    """The system page size."""
    return PAGE_SIZE


# ---------------------------------------------------------------- regions (tests/test_region_*.py)
# test_protection_protect.py has a ``region`` fixture of its own (four pages).


@pytest.fixture
def region(alloc: MapAlloc) -> Iterator[Region]:
    """A 10-byte read/write region holding b"0123456789"; freed after the test."""
    r = alloc.alloc(10)
    r[:] = b"0123456789"
    yield r
    r.close()


@pytest.fixture
def mixed(alloc: MapAlloc, page: int) -> Iterator[Region]:
    """Four pages: read/write, no access, read-only, read/write; page k filled with k + 1."""
    region = alloc.alloc(4 * page)
    region[:] = b"".join(bytes([k + 1]) * page for k in range(4))
    region.protect(Perm.NONE, page, page)
    region.protect(Perm.READ, 2 * page, page)
    yield region
    region.close()


# ---------------------------------------------------------------- SecretBuffer
# For tests/test_secret_*.py.


@pytest.fixture(
    params=[
        pytest.param("anonymous+madvise", marks=needs_guard_install),
        "anonymous+mprotect",
        pytest.param("memfd_secret", marks=needs_memfd_secret),
    ]
)
def make(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Make:
    """SecretBuffer() for each backend and guard mode this kernel offers."""
    kind: str = request.param
    if kind == "anonymous+mprotect":
        monkeypatch.setattr(secret, "madv_guard_install", missing("madv_guard_install"))
    backend = "memfd_secret" if kind == "memfd_secret" else "anonymous"

    def new(size: int, **options: Any) -> SecretBuffer:
        buf = SecretBuffer(size, backend=backend, **options)
        assert (buf.backend, buf.guard) == {
            "anonymous+madvise": ("anonymous", "madvise"),
            "anonymous+mprotect": ("anonymous", "mprotect"),
            "memfd_secret": ("memfd_secret", "mprotect"),
        }[kind]
        return buf

    return new


# ---------------------------------------------------------------- ObjectPool
# For tests/test_pool_*.py.


@pytest.fixture
def pool() -> Iterator[ObjectPool]:
    with ObjectPool(64) as p:
        yield p


# ---------------------------------------------------------------- CodeHeap
# For tests/test_jit_*.py.


@pytest.fixture
def heap() -> Iterator[CodeHeap]:
    from jit_support import SMALL  # here: test_conftest.py runs this file with support.py only

    heap = CodeHeap(SMALL)
    yield heap
    try:
        heap.close()
    except BufferError:  # a function held by a failed test's traceback
        gc.collect()
        heap.close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 64 KiB (a full disk at hand); skipped where mounting is not allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.system(f"mount -t tmpfs -o size=64k tmpfs {mount} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here (needs root, outside a locked-down container)")
    yield mount
    os.system(f"umount {mount}")
