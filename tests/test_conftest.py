"""The leak fixture itself: it must fail a test that leaves a mapping behind."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

LEAKY_TESTS = """
from mmap_alloc import MapAlloc, ObjectPool

KEEP = []

def test_clean():
    with MapAlloc().alloc(10):
        pass

def test_keeps_a_region():
    KEEP.append(MapAlloc().alloc(3 * 4096))

def test_keeps_a_pool_slab():
    pool = ObjectPool(64)
    pool.alloc()
    KEEP.append(pool)

def test_leaks_through_a_reference_cycle_only_until_collected():
    cycle = []
    cycle.append((cycle, MapAlloc().alloc(1)))
"""


def test_the_leak_fixture_fails_exactly_the_leaking_tests(pytester: pytest.Pytester) -> None:
    here = Path(__file__).parent
    pytester.makeconftest((here / "conftest.py").read_text())
    pytester.makepyfile(
        support=(here / "support.py").read_text(),
        secret_support=(here / "secret_support.py").read_text(),  # the conftest imports it
        test_leaky=LEAKY_TESTS,
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*test_keeps_a_region*",
            "12288 byte(s) left mapped by this test; open regions:",
            "  <Region rw- address=0x* size=12288 capacity=12288>",
            "*test_keeps_a_pool_slab*",
            "1048576 byte(s) left mapped by this test; open regions:",
        ]
    )
