"""Helpers for the reliability suite: child processes and the kernel's view of memory.

Anything that could crash the interpreter runs in a child, so that a crash
fails one test instead of killing the test runner:

- ``run_forked(func, *args)`` forks the test process and runs ``func`` in the
  child (cheap: no new interpreter); the child's traceback or signal becomes
  the parent's AssertionError.
- ``run_child(module, function, *args)`` starts a new interpreter that imports
  a test module from this folder and calls one of its functions (for tests
  that need a fresh process: rlimits, threads, fork, map count exhaustion).
  The function's return value (JSON) comes back to the parent.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmap_alloc import Perm

TESTS = Path(__file__).resolve().parent


def describe_status(status: int) -> str:
    """A wait status (or a negative subprocess return code) in words."""
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


# ---------------------------------------------------------------- children


def run_forked(func: Callable[..., object], *args: object, timeout: float = 60.0) -> None:
    """Run ``func(*args)`` in a forked child; fail if it raises, crashes or hangs."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running the parent's cleanup
        status = 0
        try:
            os.close(read_end)
            faulthandler.disable()  # the parent reports a crash; no dump on the runner's stderr
            try:
                func(*args)
            except BaseException:
                status = 1
                os.write(write_end, traceback.format_exc().encode())
        finally:
            os._exit(status)
    os.close(write_end)
    signal.signal(signal.SIGALRM, _timeout_handler)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"{func.__name__} did not finish in {timeout} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if os.WIFSIGNALED(status):
        raise AssertionError(
            f"{func.__name__} crashed the child: {describe_status(-os.WTERMSIG(status))}"
        )
    if os.WEXITSTATUS(status) != 0:
        raise AssertionError(f"{func.__name__} failed in the child:\n{report}")


def _timeout_handler(signum: int, frame: object) -> None:
    raise TimeoutError


@dataclass
class ChildResult:
    """What a child interpreter did: status, output, and its function's result."""

    returncode: int
    stdout: str
    stderr: str
    value: Any

    def check(self) -> Any:
        """The function's return value; AssertionError if the child failed or crashed."""
        assert self.returncode == 0, (
            f"child {describe_status(self.returncode)}\n--- stderr ---\n{self.stderr[-6000:]}"
        )
        return self.value


_RESULT_MARK = "@@reliability-result@@"

_CHILD_MAIN = f"""
import json, sys
sys.path.insert(0, {str(TESTS)!r})
module = __import__(sys.argv[1])
value = getattr(module, sys.argv[2])(*json.loads(sys.argv[3]))
sys.stdout.flush()
print({_RESULT_MARK!r} + json.dumps(value), flush=True)
"""


def run_child(
    module: str,
    function: str,
    *args: object,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Call ``module.function(*args)`` (a module of this folder) in a new interpreter.

    ``env`` adds to (does not replace) the environment. A child still running
    after ``timeout`` seconds is killed (SIGKILL), which the result shows.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD_MAIN, module, function, json.dumps(list(args))],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return ChildResult(
            -signal.SIGKILL, _text(exc.stdout), _text(exc.stderr) + "\n(timeout)", None
        )
    value = None
    stdout = done.stdout
    if _RESULT_MARK in stdout:
        stdout, _, tail = stdout.rpartition(_RESULT_MARK)
        value = json.loads(tail)
    return ChildResult(done.returncode, stdout, done.stderr, value)


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# ---------------------------------------------------------------- the kernel's view


@dataclass(frozen=True)
class Vma:
    """One line of /proc/self/maps: [start, end) with its permissions."""

    start: int
    end: int
    perms: Perm


def read_maps() -> list[Vma]:
    """/proc/self/maps, read in one go with few allocations (so that reading
    it does not itself map memory between a change and the check)."""
    fd = os.open("/proc/self/maps", os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    vmas = []
    for line in b"".join(chunks).splitlines():
        span, flags = line.split(maxsplit=2)[:2]
        lo, hi = span.split(b"-")
        vmas.append(Vma(int(lo, 16), int(hi, 16), _PERMS[flags[:3]]))
    return vmas


_PERMS = {str(perms).encode(): perms for perms in map(Perm, range(8))}


def page_perms(vmas: list[Vma], start: int, length: int, page: int) -> list[Perm | None]:
    """The protection of each page of [start, start + length); None where unmapped."""
    pages: list[Perm | None] = [None] * (length // page)
    end = start + length
    for vma in vmas:
        if vma.end <= start or vma.start >= end:
            continue
        for index in range(
            (max(vma.start, start) - start) // page, (min(vma.end, end) - start) // page
        ):
            pages[index] = vma.perms
    return pages


def mapped_bytes(vmas: list[Vma], start: int, length: int) -> int:
    """How many bytes of [start, start + length) are mapped."""
    end = start + length
    return sum(max(0, min(v.end, end) - max(v.start, start)) for v in vmas)


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmSize, VmRSS ...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)
