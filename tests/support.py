"""Helpers for the tests: what the kernel says about our mappings, and child processes.

/proc: ``read_maps`` (fast, for checks in loops), ``kernel_runs``,
``perms_at``, ``page_perms``, ``mapped_intervals``, ``mapped_bytes``,
``vm_flags``, ``status_kib``, ``rss``. Children, so that a crash on purpose
fails one test instead of the runner: ``run_in_child(body)`` forks and
returns the wait status (-N: killed by signal N); ``run_forked(func, *args)``
forks and fails with the child's traceback, signal or hang;
``fork_child``/``wait_child`` for tests that do work in between;
``run_child(module, function, *args)`` starts a new interpreter (for rlimits,
threads, map count exhaustion) and returns the function's JSON result.
Emulation: ``EMULATED``, ``emulated_skip(effect)`` (a decorator) and
``skip_if_emulated(effect)`` (inside a test) for kernel effects that an
emulator answers itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import pytest

import mmap_alloc
from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE, mappings

T = TypeVar("T")

# ---------------------------------------------------------------- emulation

EMULATED = os.environ.get("ARM64_EMULATED", "")
"""The emulator running the suite ("qemu-user" in the arm64 runs of
tools/arm64-tests), empty on a real machine. qemu-user implements
mmap, mprotect, madvise and friends itself on top of the host kernel, so
some kernel effects the tests check are not the guest kernel's there."""


def _emulated_reason(effect: str) -> str:
    return f"under {EMULATED}: {effect}"


def emulated_skip(effect: str) -> pytest.MarkDecorator:
    """Skip the whole test under emulation: for a test that is about ``effect``,
    a kernel effect the emulator does not reproduce (say which, in words)."""
    return pytest.mark.skipif(EMULATED != "", reason=_emulated_reason(effect))


def skip_if_emulated(effect: str) -> None:
    """Inside a test, right before checking ``effect``: skip the rest under
    emulation (what ran before it still counted); nothing on a real machine."""
    if EMULATED:
        pytest.skip(_emulated_reason(effect))


# What qemu-user (7.2) does differently from the kernel, named once for the
# skips (and the count by kind in docs/reliability.md).
RESIDENCY = (
    "madvise(MADV_POPULATE_*) and MAP_POPULATE do not reach the kernel and mincore is "
    "refused (ENOMEM) on pages the guest cannot read: which pages are resident is not "
    "the kernel's answer"
)
THP = (
    "madvise(MADV_HUGEPAGE, MADV_COLLAPSE) does not reach the kernel (the emulator answers "
    "success and does nothing): no transparent huge pages where the kernel gives them on advice"
)


def ignored_advice(advice: str) -> str:
    """The reason for a test of ``advice`` (madvise names): qemu-user 7.2 hands only
    MADV_DONTNEED to the kernel and answers success to the rest, doing nothing."""
    return f"the emulator answers success to madvise({advice}) without passing it to the kernel"


HUGETLB = "the emulator refuses hugetlb mappings (MAP_HUGETLB, hugetlb memfd) with EINVAL"
MLOCK = "the emulator refuses mlock2(MLOCK_ONFAULT) with EINVAL"
HOST_MAPS = (
    "/proc/self/maps is written by the emulator from its host mappings (never PROT_EXEC), "
    "each shown with the guest protection of its first page or not at all: it does not "
    "show the guest's protections page by page"
)
RLIMIT_AS = (
    "the emulator answers success to setrlimit(RLIMIT_AS) without applying it "
    "(it would bind the emulator's own memory): the address-space limit never binds"
)
TOO_SLOW = (
    "about ten times slower emulated, this case does not finish within its time limit "
    "(it reads /proc at every line of library code)"
)
NOT_ADJACENT = "the emulator never places two new mappings next to each other"
FORGED_FAULT = (
    "the emulator takes a SIGBUS sent with a fault's code for a fault of its own "
    "and stops on an assertion of its own"
)


# ---------------------------------------------------------------- interpreter builds

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
"""A free-threaded CPython (3.13t ...). It starts with about 1 GiB of address
space reserved (mimalloc), and it has no allocator but mimalloc."""

SMALL_ALLOCATIONS_FROM_MALLOC: dict[str, str] = (
    {}
    if FREE_THREADED
    else {
        "PYTHONMALLOC": "malloc",
        "GLIBC_TUNABLES": f"glibc.malloc.top_pad={64 << 20}:glibc.malloc.trim_threshold={1 << 30}",
    }
)
"""The environment of a child that fills vm.max_map_count: the interpreter's
small allocations from malloc's heap rather than pymalloc's arenas, a mapping
each, and the heap grown 64 MiB ahead and never trimmed, so that the test's own
objects still find room once the kernel refuses to grow it (at the limit; 3.14's
interpreter had no free block left there). The free-threaded build refuses
PYTHONMALLOC=malloc; its mimalloc segments are reserved ahead."""


FILLS_THE_MAP_COUNT = emulated_skip(
    "filling vm.max_map_count makes tens of thousands of mappings, each of which the "
    "emulator also tracks in its own page table: the run does not finish in reasonable time"
)
"""For tests that exhaust vm.max_map_count."""


def perms_at(address: int) -> Perm | None:
    """The permissions /proc/self/maps shows at ``address``, or None if unmapped."""
    for m in mappings():
        if m.start <= address < m.end:
            return m.perms
    return None


def kernel_runs(region: Region) -> list[tuple[int, int, Perm]]:
    """(offset, length, perms) of the capacity as /proc/self/maps shows it,
    adjacent equal runs merged, read independently of Region.protections()."""
    start, end = region.address, region.address + region.capacity
    runs: list[tuple[int, int, Perm]] = []
    for m in mappings():
        lo, hi = max(m.start, start), min(m.end, end)
        if lo >= hi:
            continue
        if runs and runs[-1][2] == m.perms and runs[-1][0] + runs[-1][1] == lo - start:
            runs[-1] = (runs[-1][0], hi - start - runs[-1][0], m.perms)
        else:
            runs.append((lo - start, hi - lo, m.perms))
    return runs


def mapped_intervals(
    anonymous_only: bool = False, perms: Container[Perm] | None = None
) -> list[tuple[int, int]]:
    """The address ranges mapped now, adjacent ranges joined.

    ``perms`` keeps only mappings with one of those permissions: tests map
    pages unlike the interpreter's own (rw-), which may map arenas meanwhile.
    """
    joined: list[tuple[int, int]] = []
    for m in mappings():
        if anonymous_only and m.name:
            continue
        if perms is not None and m.perms not in perms:
            continue
        if joined and joined[-1][1] == m.start:
            joined[-1] = (joined[-1][0], m.end)
        else:
            joined.append((m.start, m.end))
    return joined


def subtract(ranges: list[tuple[int, int]], minus: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``ranges`` not covered by ``minus`` (both sorted, disjoint)."""
    result = []
    for start, end in ranges:
        cursor = start
        for lo, hi in minus:
            if hi <= cursor or lo >= end:
                continue
            if lo > cursor:
                result.append((cursor, lo))
            cursor = max(cursor, hi)
        if cursor < end:
            result.append((cursor, end))
    return result


def vm_flags(address: int) -> set[str]:
    """The VmFlags /proc/self/smaps shows for the mapping holding ``address``
    (two-letter codes: "dc" dontfork, "dd" dontdump, "wf" wipeonfork, "hg"
    hugepage, "nh" nohugepage, "rr" random, "sr" sequential, "lo" locked,
    "lf" locked on fault), read here independently of the library."""
    inside = False
    with open("/proc/self/smaps") as lines:
        for line in lines:
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):
                lo, _, hi = key.partition("-")
                inside = int(lo, 16) <= address < int(hi, 16)
            elif inside and key == "VmFlags:":
                return set(rest.split())
    raise AssertionError(f"nothing is mapped at 0x{address:x}")


def open_fds() -> set[int]:
    """The descriptors open now (not the one listing them used, closed by then)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            os.readlink(f"/proc/self/fd/{name}")
            found.add(int(name))
    return found


def run_in_pid_namespace(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter in a new pid namespace (where
    vm.memfd_noexec can be set without touching the machine's); skip where
    no namespace can be made. No --mount-proc: that fails in a chroot."""
    done = subprocess.run(
        ["unshare", "-p", "-f", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no pid namespace here: {done.stderr.strip()}")
    return done


def is_mapped(start: int, end: int) -> bool:
    """Whether any byte of [start, end) is mapped."""
    return any(m.start < end and start < m.end for m in mappings())


def rss() -> int:
    """The resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` reproducible bytes, none of them zero, different on every page."""
    return random.Random(seed).randbytes(n).translate(_NO_ZERO)


_NO_ZERO = bytes.maketrans(b"\0", b"\1")


def adjacent_pair(alloc: MapAlloc, first: int, second: int) -> tuple[Region, Region]:
    """Two regions of ``first`` and ``second`` bytes, the second starting
    right where the first one's capacity ends."""
    spares: list[Region] = []
    try:
        for _ in range(64):
            b = alloc.alloc(second)
            a = alloc.alloc(first)
            if a.address + a.capacity == b.address:
                return a, b
            spares += (a, b)
        skip_if_emulated(NOT_ADJACENT)
        raise AssertionError("the kernel never placed two mappings next to each other")
    finally:
        for spare in spares:
            spare.close()


def run_in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child; return its exit status (0 = body returned,
    1 = it raised, or -N when killed by signal N). Output of the child is kept."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        faulthandler.disable()  # a crash on purpose needs no traceback
        code = 0
        try:
            body()
        except BaseException:
            code = 1  # first: printing may fail (a child that dropped privileges cannot import)
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


SIGSEGV = -signal.SIGSEGV


# ---------------------------------------------------------------- children and /proc (reliability)

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


def fork_child(body: Callable[[], object]) -> int:
    """Fork; run ``body`` in the child, which leaves with 0 if it returns a true
    value or None, 2 if it returns a false one, 3 if it raises. The child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            result = body()
            code = 0 if result is None or result else 2
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = 30.0) -> int:
    """The child's wait status; it is killed (and SIGKILL reported) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


collects_inside_calls = pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="from 3.12 the collector runs only between bytecodes, never inside a C call",
)
"""For tests of a collection that starts inside a call of the library (3.11: any
allocation of a tracked object may start one)."""


def collecting(call: Callable[[], T], meddle: Callable[[], object]) -> T:
    """``call()`` with the collector's threshold at 1, so that the first
    tracked object it allocates starts a collection, whose callback runs
    ``meddle()`` once."""
    armed = [True]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and armed[0]:
            armed[0] = False
            meddle()

    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(1)
    try:
        return call()
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)


def on_entry(function: Callable[..., object], act: Callable[[], object]) -> Any:
    """Run ``act()`` once, from a trace hook, when ``function`` (Python code)
    is entered: its arguments are made, its body has not run."""
    return _once_at(function, "call", act)


def on_return(function: Callable[..., object], act: Callable[[], object]) -> Any:
    """Run ``act()`` once, from a trace hook, as ``function`` (Python code)
    returns: its value is made, its caller has not used it."""
    return _once_at(function, "return", act)


@contextlib.contextmanager
def _once_at(
    function: Callable[..., object], event: str, act: Callable[[], object]
) -> Iterator[None]:
    armed = [True]

    def local(frame: Any, what: str, arg: object) -> Any:
        if what == event and armed[0]:
            armed[0] = False
            act()
        return local

    def hook(frame: Any, what: str, arg: object) -> Any:
        if frame.f_code is not function.__code__:
            return None
        return local(frame, what, arg)

    previous = sys.gettrace()
    sys.settrace(hook)
    try:
        yield
    finally:
        sys.settrace(previous)


# ---------------------------------------------------------------- interrupts at every line

LIBRARY = str(Path(mmap_alloc.__file__).parent)
"""The Python layer of the library: where Injector stops."""


class Injector:
    """A trace function that records the distinct lines of library code run,
    in the order first reached, and runs ``action`` when the ``at``-th of them
    (counting from 1) is first reached. A line run again (a loop) is the same
    point of the path: it is not injected twice."""

    def __init__(self, at: int = 0, action: Callable[[], None] | None = None) -> None:
        self.at = at
        self.action = action
        self.lines: dict[tuple[str, int], None] = {}

    @property
    def count(self) -> int:
        return len(self.lines)

    def __call__(self, frame: FrameType, event: str, arg: object) -> Any:
        if not frame.f_code.co_filename.startswith(LIBRARY):
            return None
        return self.line

    def line(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            key = (frame.f_code.co_filename, frame.f_lineno)
            if key not in self.lines:
                self.lines[key] = None
                if len(self.lines) == self.at and self.action is not None:
                    self.action()  # a raise here surfaces in the traced frame
        return self.line


@contextlib.contextmanager
def traced(injector: Injector) -> Iterator[Injector]:
    """``injector`` is the trace function for the block."""
    previous = sys.gettrace()
    sys.settrace(injector)
    try:
        yield injector
    finally:
        sys.settrace(previous)


def _keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def interrupted_at_line(k: int, call: Callable[[], object]) -> bool:
    """``call()`` with a KeyboardInterrupt at the k-th line of the library's
    code it runs (counting each line once); whether it came."""
    try:
        with traced(Injector(k, _keyboard_interrupt)):
            call()
    except KeyboardInterrupt:
        return True
    return False
