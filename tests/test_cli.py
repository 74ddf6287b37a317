"""The command line: ``python -m mmap_alloc info`` and the ``mmap-alloc`` script."""

from __future__ import annotations

import errno
import io
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mmap_alloc
from mmap_alloc import cli, features
from mmap_alloc.perm import ALL_PERMS
from support import RLIMIT_AS, emulated_skip, run_in_child

KEYS = {
    "schema",
    "mmap_alloc",
    "platform",
    "kernel",
    "machine",
    "python",
    "page_size",
    "huge_pages",
    "thp_mode",
    "max_map_count",
    "overcommit_mode",
    "memlock_limit",
    "permissions",
    "features",
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmap_alloc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def info() -> dict[str, Any]:
    """``info --json`` from a child process."""
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


# ---------------------------------------------------------------- info --json


def test_info_json_has_every_key(info: dict[str, Any]) -> None:
    assert set(info) == KEYS


def test_info_json_carries_its_schema_version(info: dict[str, Any]) -> None:
    assert info["schema"] == cli.INFO_SCHEMA == 1
    assert next(iter(info)) == "schema"


def test_info_json_describes_this_interpreter_and_kernel(info: dict[str, Any]) -> None:
    assert info["mmap_alloc"] == mmap_alloc.__version__
    assert info["platform"] == sys.platform
    assert info["kernel"] == os.uname().release
    assert info["machine"] == os.uname().machine
    assert info["python"] == platform.python_version()


def test_info_json_page_size_is_the_kernels(info: dict[str, Any]) -> None:
    assert info["page_size"] == resource.getpagesize()


def test_info_json_huge_pages_match_sysfs(info: dict[str, Any]) -> None:
    folders = sorted(
        Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB"), key=lambda p: int(p.name[10:-2])
    )
    assert [pool["size"] for pool in info["huge_pages"]] == [
        int(p.name[len("hugepages-") : -2]) * 1024 for p in folders
    ]
    for pool, folder in zip(info["huge_pages"], folders, strict=True):
        # other processes may take or give back pages in between: check the kind of value
        assert isinstance(pool["reserved"], int) and pool["reserved"] >= 0
        assert (
            0 <= pool["free"] <= max(pool["reserved"], int((folder / "nr_hugepages").read_text()))
        )


def test_info_json_thp_mode_matches_sysfs(info: dict[str, Any]) -> None:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    assert f"[{info['thp_mode']}]" in text


def test_info_json_sysctls_match_proc(info: dict[str, Any]) -> None:
    assert info["max_map_count"] == int(Path("/proc/sys/vm/max_map_count").read_text())
    assert info["overcommit_mode"] == int(Path("/proc/sys/vm/overcommit_memory").read_text())


def test_info_json_memlock_limit_is_the_rlimit(info: dict[str, Any]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert info["memlock_limit"] == {"soft": limit(soft), "hard": limit(hard)}


def test_info_json_lists_the_eight_permission_combinations(info: dict[str, Any]) -> None:
    assert [entry["requested"] for entry in info["permissions"]] == [str(p) for p in ALL_PERMS]


def test_info_json_linux_gives_every_permission_combination_exactly(
    info: dict[str, Any],
) -> None:
    for entry in info["permissions"]:
        assert entry == {
            "requested": entry["requested"],
            "reported": entry["requested"],
            "in_force": entry["requested"],
            "exact": True,
        }


def test_info_json_lists_every_kernel_feature_probe(info: dict[str, Any]) -> None:
    assert [entry["name"] for entry in info["features"]] == [
        probe.__name__ for probe in features.PROBES
    ]
    for entry in info["features"]:
        assert set(entry) == {"name", "available", "detail"}
        assert isinstance(entry["available"], bool)
        assert entry["available"] or entry["detail"]


def test_info_json_features_are_the_probes_answers(info: dict[str, Any]) -> None:
    answers = {f.name: f for f in features.all_features()}
    for name in ("memfd_secret", "madv_guard_install", "madv_populate", "thp", "shmem_thp"):
        entry = next(e for e in info["features"] if e["name"] == name)
        assert entry["available"] == answers[name].available


# ---------------------------------------------------------------- info as a table


def test_info_prints_a_readable_table() -> None:
    result = run("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in (
        "page size",
        "huge pages",
        "transparent huge pages",
        "vm.max_map_count",
        "vm.overcommit_memory",
        "RLIMIT_MEMLOCK",
        "requested",
        "in force",
    ):
        assert label in out
    assert f"{resource.getpagesize()} bytes" in out
    assert "  rwx        rwx        exact" in out
    assert out.count("exact") == 8


def test_info_table_says_available_or_missing_with_the_reason_for_each_feature() -> None:
    result = run("info")
    assert result.returncode == 0, result.stderr
    section = result.stdout.split("kernel features", 1)[1].splitlines()[1:]
    assert [line.split()[0] for line in section] == [p.__name__ for p in features.PROBES]
    for line in section:
        state = line.split(None, 1)[1]
        assert state.startswith(("available", "missing: "))


def test_format_info_shows_a_missing_feature_with_its_reason() -> None:
    data = cli.machine_info()
    data["features"] = [
        {"name": "memfd_secret", "available": False, "detail": "kernel lacks memfd_secret"},
        {"name": "thp", "available": True, "detail": "enabled = madvise"},
    ]
    text = cli.format_info(data)
    assert "  memfd_secret  missing: kernel lacks memfd_secret" in text
    assert "  thp           available (enabled = madvise)" in text


def test_format_info_shows_failed_and_replaced_probes() -> None:
    data = cli.machine_info()
    data["huge_pages"] = []
    data["memlock_limit"] = {"soft": None, "hard": None}
    data["permissions"][2] = {
        "requested": "-w-",
        "reported": "rw-",
        "in_force": "rw-",
        "exact": False,
    }
    data["permissions"][4] = {
        "requested": "--x",
        "reported": "--x",
        "in_force": None,
        "exact": False,
        "error": "[Errno 13] Permission denied",
    }
    text = cli.format_info(data)
    assert "huge pages              none" in text
    assert "soft unlimited, hard unlimited" in text
    assert "  -w-        rw-        replaced by a less restrictive combination" in text
    assert "  --x        ?          allocation failed: [Errno 13] Permission denied" in text


# ---------------------------------------------------------------- in-process


def test_main_info_json_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == KEYS
    assert data == {**cli.machine_info(), "huge_pages": data["huge_pages"]}


def test_main_info_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    assert "vm.max_map_count" in capsys.readouterr().out


def test_probe_perms_reads_the_kernels_answer() -> None:
    for perms in ALL_PERMS:
        assert cli.probe_perms(perms) == {
            "requested": str(perms),
            "reported": str(perms),
            "in_force": str(perms),
            "exact": True,
        }


# ---------------------------------------------------------------- the parser


def test_no_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert "COMMAND" in result.stderr


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "info" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"mmap_alloc {mmap_alloc.__version__}"


def test_commands_are_added_by_the_functions_in_commands() -> None:
    assert cli._add_info in cli.COMMANDS


def test_console_script_runs_info() -> None:
    script = Path(sys.executable).parent / "mmap-alloc"
    if not script.exists():
        pytest.skip("the mmap-alloc script is not installed next to this interpreter")
    result = subprocess.run(
        [str(script), "info", "--json"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == KEYS


def test_an_unknown_option_of_a_command_prints_that_commands_usage() -> None:
    result = run("info", "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m mmap_alloc info [-h] [--json]")
    assert "python -m mmap_alloc info: error: unrecognized arguments: --bogus" in result.stderr


# ---------------------------------------------------------------- output that cannot be written


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """The command failed with exit status 1 and one line on stderr, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def run_with_stdout_closed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmap_alloc", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(1),  # the child starts with no descriptor 1 (`>&-`)
    )


@pytest.mark.parametrize("args", [["info"], ["info", "--json"], ["bench", "--quick"]])
def test_a_closed_stdout_is_a_one_line_error(args: list[str]) -> None:
    result = run_with_stdout_closed(*args)
    one_line_error(result, f"python -m mmap_alloc {args[0]}: error:", "standard output is closed")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this machine")
@pytest.mark.parametrize("args", [["info"], ["info", "--json"]])
def test_a_full_stdout_is_a_one_line_error(args: list[str]) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "mmap_alloc", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    one_line_error(result, "cannot write to standard output: No space left on device")


def test_emit_turns_a_failed_write_into_an_output_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Full(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sys, "stdout", Full())
    with pytest.raises(cli.OutputError, match="No space left on device"):
        cli.emit("text")


def test_a_broken_pipe_ends_quietly() -> None:
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads: the first write fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "mmap_alloc", "info", "--json"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert result.returncode == 1
    assert result.stderr == ""


# ---------------------------------------------------------------- low limits, no /proc


@emulated_skip(RLIMIT_AS)
def test_bench_under_a_low_address_space_limit_skips_what_cannot_run() -> None:
    """``ulimit -v 262144``: the random reads over 64 MiB cannot be set up;
    they are skipped with the reason, no traceback."""
    limit = 256 << 20
    result = subprocess.run(
        [sys.executable, "-m", "mmap_alloc", "bench", "--quick", "--only", "random reads"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    skipped = result.stdout.split("skipped: cannot run on this machine\n", 1)[1]
    assert skipped.startswith("  random reads: AllocError: cannot map 67108864 bytes"), skipped


def test_bench_as_an_unprivileged_user_without_locked_memory_skips_the_secret_cases(
    tmp_path: Path,
) -> None:
    """``ulimit -l 0`` as a user without CAP_IPC_LOCK (root bypasses the
    limit: the child drops to nobody): the secret cases, which lock their
    pages, are skipped with the reason."""
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")
    out, err = tmp_path / "out", tmp_path / "err"
    tmp_path.chmod(0o777)

    def body() -> None:
        import importlib
        import pkgutil

        from mmap_alloc import bench

        for module in pkgutil.iter_modules(bench.__path__):  # before the interpreter's
            importlib.import_module(f"mmap_alloc.bench.{module.name}")  # files are unreadable
        sys.stdout = open(out, "w")  # noqa: SIM115 - the child's exit closes them
        sys.stderr = open(err, "w")  # noqa: SIM115
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        os.setgid(65534)
        os.setuid(65534)
        status = cli.main(["bench", "--quick", "--only", "secret"])
        sys.stdout.flush()
        sys.stderr.flush()
        assert status == 0

    status = run_in_child(body)
    assert status == 0, err.read_text()
    assert "Traceback" not in err.read_text()
    skipped = out.read_text().split("skipped: cannot run on this machine\n", 1)[1]
    assert "secret buffer create+close" in skipped and "RLIMIT_MEMLOCK is 0 bytes" in skipped


def run_without_proc(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The command in a mount namespace where /proc is an empty tmpfs (skip
    where no such namespace can be made: it needs CAP_SYS_ADMIN)."""
    command = shlex.join([sys.executable, "-m", "mmap_alloc", *args])
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs none /proc && exec {command}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0 and ("unshare" in result.stderr or "mount" in result.stderr):
        pytest.skip(f"no mount namespace with an empty /proc here: {result.stderr.strip()}")
    return result


def test_info_without_proc_says_what_it_could_not_read() -> None:
    result = run_without_proc("info")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "vm.max_map_count        unknown (cannot read /proc/sys/vm)" in result.stdout
    assert result.stdout.count("not probed: cannot read /proc/self/maps") == 8


def test_info_json_without_proc_has_null_for_what_it_could_not_read() -> None:
    result = run_without_proc("info", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["max_map_count"] is None and data["overcommit_mode"] is None
    assert all(entry["in_force"] is None for entry in data["permissions"])
    assert all(entry["unprobed"].startswith("cannot read ") for entry in data["permissions"])


def test_bench_without_proc_skips_what_needs_it() -> None:
    result = run_without_proc("bench", "--quick", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = result.stdout.split("skipped: cannot run on this machine\n", 1)[1]
    assert "/proc/self/" in skipped
