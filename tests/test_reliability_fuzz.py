"""The atheris harness (fuzz/fuzz_mmap_alloc.py) runs clean for a bounded number of inputs.

Skipped where atheris cannot be imported (it is in the ``fuzz`` and ``test``
extras). The long form and the ASan build are in docs/reliability.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from support import TESTS, describe_status

pytest.importorskip("atheris", reason="atheris is not installed (pip install 'mmap-alloc[fuzz]')")

HARNESS = TESTS.parent / "fuzz" / "fuzz_mmap_alloc.py"
RUNS_ENV = "MMAP_ALLOC_FUZZ_RUNS"


def fuzz(runs: int, seed: int, timeout: float) -> str:
    """Run the harness on ``runs`` generated inputs; fail on any finding or crash."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run(
            [
                sys.executable,
                str(HARNESS),
                f"-runs={runs}",
                f"-seed={seed}",
                f"-artifact_prefix={folder}/",
                "-print_final_stats=1",
                "-rss_limit_mb=2048",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    assert done.returncode == 0, (
        f"the fuzzer {describe_status(done.returncode)}:\n{done.stderr[-6000:]}"
    )
    return done.stderr


def test_fuzz_harness_finds_nothing_in_a_few_thousand_inputs() -> None:
    stats = fuzz(int(os.environ.get(RUNS_ENV, "8000")), seed=1, timeout=300)
    assert "Done" in stats


@pytest.mark.stress
def test_fuzz_harness_finds_nothing_long() -> None:
    stats = fuzz(int(os.environ.get(RUNS_ENV, "1000000")), seed=2, timeout=7200)
    print(stats[-2000:])
