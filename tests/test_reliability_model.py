"""A stateful model of MapAlloc: any sequence of safe calls keeps every promise.

A hypothesis RuleBasedStateMachine drives allocators of several permission
settings through alloc / alloc_zeroed / alloc_excess / alloc_obj / reserve /
realloc / grow_in_place / shrink_in_place / commit / uncommit / protect /
make_exec / make_writable / writable() / writes / exports (memoryview, numpy,
ctypes) / functions / release / dealloc / close / use after free, and after
every step checks the library against a plain Python model and the kernel:

- live regions never overlap, and are mapped in full;
- their contents are what the model says (zero-filled growth, uncommit);
- the protection of every page is what /proc/self/maps says, and ``mixed``
  and ``perms`` agree with it;
- a freed region is unmapped at once;
- exported or pinned regions refuse to move, shrink, be freed or lose
  READ/WRITE (EXEC for pins) with BufferError, and nothing changes.

The machine runs in a child pytest (``test_model_*`` below) so that a crash
fails a test instead of killing the runner. The model and the machine's base
are in model_machine.py; its rules come in mixins (CoreRules, ProtectionRules
in model_rules.py); features that land later add their own mixin to
MapAllocMachine's bases (see the note above it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from model_machine import EXAMPLES_ENV, IN_CHILD_ENV, REPORT_ENV, STEPS_ENV
from model_rules import CoreRules, ProtectionRules
from support import HOST_MAPS, emulated_skip


# Features that land later add a mixin of rules (in model_rules.py), e.g.
#   class PoolRules(MachineBase): pools in self.pools, rules pool_alloc / pool_free /
#       pool_view / pool_close, an @invariant that live objects never overlap and
#       keep their cookies;
#   class ArrayRules(MachineBase): region.ndarray() exports (pins like a memoryview),
#       mmap_alloc.numpy.empty / zeros;
# and list it first in the bases below.
class MapAllocMachine(ProtectionRules, CoreRules):
    """Every rule of the model."""


def model_settings() -> settings:
    return settings(
        max_examples=int(os.environ.get(EXAMPLES_ENV, "40")),
        stateful_step_count=int(os.environ.get(STEPS_ENV, "30")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


if os.environ.get(IN_CHILD_ENV):
    MapAllocMachine.TestCase.settings = model_settings()
    TestMapAllocModel = MapAllocMachine.TestCase

    @pytest.fixture(autouse=True, scope="module")
    def no_mapping_leak() -> Iterator[None]:
        """Replaces the conftest's count in the child: hypothesis keeps large
        malloc blocks and loads libraries as it goes, so the process's mapping
        count says nothing here. Instead every freed region is checked to be
        unmapped at once (MachineBase.forget), and test_reliability_leaks
        counts mappings over 10,000 cycles."""
        yield


# ---------------------------------------------------------------- the tests run by the runner


def run_model(examples: int, steps: int) -> dict[str, int]:
    """Run the machine in a child pytest; fail on any failure or crash."""
    with tempfile.TemporaryDirectory() as folder:
        return _run_model(examples, steps, Path(folder) / "model-report.json")


def _run_model(examples: int, steps: int, report: Path) -> dict[str, int]:
    env = dict(os.environ)
    env.update(
        {
            IN_CHILD_ENV: "1",
            EXAMPLES_ENV: str(examples),
            STEPS_ENV: str(steps),
            REPORT_ENV: str(report),
        }
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:timeout",
            f"{__file__}::TestMapAllocModel",
            "-m",
            "",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    if done.returncode < 0:
        pytest.fail(
            f"the model crashed the child with {signal.Signals(-done.returncode).name}:\n"
            f"{done.stdout[-8000:]}\n{done.stderr[-4000:]}"
        )
    assert done.returncode == 0, f"{done.stdout[-12000:]}\n{done.stderr[-4000:]}"
    counts: dict[str, int] = json.loads(report.read_text())
    print(json.dumps(counts, indent=1, sort_keys=True))
    return counts


@emulated_skip(HOST_MAPS)
def test_model_keeps_every_promise() -> None:
    counts = run_model(40, 30)
    assert counts["examples"] >= 40
    assert counts.get("realloc", 0) > 0 and counts.get("protect", 0) > 0


@pytest.mark.stress
@emulated_skip(HOST_MAPS)
def test_model_keeps_every_promise_long() -> None:
    counts = run_model(
        int(os.environ.get(EXAMPLES_ENV, "3000")), int(os.environ.get(STEPS_ENV, "60"))
    )
    assert counts["examples"] >= 1000
