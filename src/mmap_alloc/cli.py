"""The command line: ``python -m mmap_alloc COMMAND`` (or ``mmap-alloc COMMAND``).

Each command is a function that adds its subparser; to add one, write such a
function and list it in COMMANDS. A command writes its output through
``emit``: output that cannot be written (standard output closed, a full
disk) is one line on standard error and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._linux import (
    PAGE_SIZE,
    format_size,
    hugepage_pools,
    mappings,
    max_map_count,
    memlock_limit,
    overcommit_mode,
    thp_mode,
)
from ._version import __version__
from .allocator import MapAlloc
from .features import Feature, all_features
from .perm import ALL_PERMS, Perm

OVERCOMMIT_MODES = {0: "heuristic", 1: "always", 2: "never"}

INFO_SCHEMA = 1
"""The version of the ``info --json`` document (its ``schema`` key). It goes
up when a key is removed, renamed or changes meaning; keys may be added
without a new version."""


class OutputError(Exception):
    """Standard output cannot take the command's output; the message says why."""


def emit(text: str) -> None:
    """Write ``text`` and a newline to standard output and flush it.

    OutputError when standard output is closed or the write fails (a full
    disk, a closed terminal); BrokenPipeError passes through (the reader
    left: main() exits quietly). After a failure standard output points at
    /dev/null, so that the interpreter's last flush at exit stays quiet.
    """
    stream = sys.stdout
    if stream is None:
        raise OutputError("standard output is closed: nowhere to write the output")
    try:
        stream.write(text + "\n")
        stream.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: the stream was closed from Python
        _silence_stdout()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(f"cannot write to standard output: {reason}") from None


def _silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null (what is still buffered goes there)."""
    stream = sys.stdout
    if stream is None:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # no descriptor (a replaced sys.stdout): nothing to silence


# ---------------------------------------------------------------- info


def probe_perms(perms: Perm) -> dict[str, Any]:
    """Allocate one page with ``perms`` and read what the kernel set from /proc/self/maps.

    ``in_force`` is None when the page could not be allocated (``error`` says
    why) or /proc/self/maps could not be read (``unprobed`` says why).
    """
    alloc = MapAlloc(
        read=bool(perms & Perm.READ), write=bool(perms & Perm.WRITE), exec=bool(perms & Perm.EXEC)
    )
    entry: dict[str, Any] = {"requested": str(perms), "reported": str(alloc.perms)}
    try:
        region = alloc.alloc(PAGE_SIZE)
    except OSError as exc:  # AllocError included; e.g. EACCES where exec memory is forbidden
        entry.update(in_force=None, exact=False, error=str(exc))
        return entry
    with region:
        address = region.address
        try:
            probed = next(m.perms for m in mappings() if m.start <= address < m.end)
        except OSError as exc:  # no /proc
            name = exc.filename or "/proc/self/maps"
            entry.update(
                in_force=None, exact=False, unprobed=f"cannot read {name}: {exc.strerror or exc}"
            )
            return entry
    entry.update(in_force=str(probed), exact=probed == perms)
    return entry


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def _known(value: int) -> int | None:
    """A sysctl read from /proc, or None where it could not be read (-1)."""
    return None if value < 0 else value


def machine_info() -> dict[str, Any]:
    """What this machine offers to mmap_alloc, as plain data (the ``info --json`` output)."""
    soft, hard = memlock_limit()
    return {
        "schema": INFO_SCHEMA,
        "mmap_alloc": __version__,
        "platform": sys.platform,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "page_size": PAGE_SIZE,
        "huge_pages": [
            {"size": pool.size, "reserved": pool.reserved, "free": pool.free}
            for pool in hugepage_pools()
        ],
        "thp_mode": thp_mode(),
        "max_map_count": _known(max_map_count()),
        "overcommit_mode": _known(overcommit_mode()),
        "memlock_limit": {"soft": _limit(soft), "hard": _limit(hard)},
        "permissions": [probe_perms(perms) for perms in ALL_PERMS],
        "features": [
            {"name": f.name, "available": f.available, "detail": f.detail} for f in all_features()
        ],
    }


def _bytes(n: int | None) -> str:
    return "unlimited" if n is None else f"{format_size(n)} ({n} bytes)" if n >= 1024 else f"{n} B"


def format_info(info: dict[str, Any]) -> str:
    """The ``info`` output as a readable table."""
    rows: list[tuple[str, str]] = [("page size", _bytes(info["page_size"]))]
    pools = info["huge_pages"] or [None]
    for i, pool in enumerate(pools):
        text = (
            "none"
            if pool is None
            else f"{format_size(pool['size'])}: {pool['reserved']} reserved, {pool['free']} free"
        )
        rows.append(("huge pages" if i == 0 else "", text))
    rows.append(("transparent huge pages", info["thp_mode"]))
    unread = "unknown (cannot read /proc/sys/vm)"
    count = info["max_map_count"]
    rows.append(("vm.max_map_count", unread if count is None else str(count)))
    mode = info["overcommit_mode"]
    rows.append(
        (
            "vm.overcommit_memory",
            unread if mode is None else f"{mode} ({OVERCOMMIT_MODES.get(mode, 'unknown')})",
        )
    )
    memlock = info["memlock_limit"]
    rows.append(
        ("RLIMIT_MEMLOCK", f"soft {_bytes(memlock['soft'])}, hard {_bytes(memlock['hard'])}")
    )
    width = max(len(name) for name, _ in rows)
    lines = [
        f"mmap_alloc {info['mmap_alloc']} on {info['platform']} {info['machine']} "
        f"(kernel {info['kernel']}, Python {info['python']})",
        "",
        *(f"{name:<{width}}  {value}" for name, value in rows),
        "",
        "permissions (probed: one page allocated, its line in /proc/self/maps)",
        f"  {'requested':<10} {'in force':<10} note",
    ]
    for entry in info["permissions"]:
        if entry["in_force"] is None and "unprobed" in entry:
            note = f"not probed: {entry['unprobed']}"
        elif entry["in_force"] is None:
            note = f"allocation failed: {entry['error']}"
        elif entry["reported"] != entry["in_force"]:
            note = f"but MapAlloc.perms reports {entry['reported']}"
        elif entry["exact"]:
            note = "exact"
        else:
            note = "replaced by a less restrictive combination"
        lines.append(f"  {entry['requested']:<10} {entry['in_force'] or '?':<10} {note}")
    lines += ["", "kernel features (probed: mmap_alloc.features)"]
    width = max((len(entry["name"]) for entry in info["features"]), default=0)
    for entry in info["features"]:
        feature = Feature(entry["name"], entry["available"], entry["detail"])
        lines.append(f"  {feature.name:<{width}}  {feature}")
    return "\n".join(lines)


def _run_info(args: argparse.Namespace) -> int:
    if sys.stdout is None:  # before the probes: nothing could show their answers
        raise OutputError("standard output is closed: nowhere to write the output")
    info = machine_info()
    emit(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _add_info(commands: argparse._SubParsersAction[CommandParser]) -> None:
    parser = commands.add_parser(
        "info",
        help="show what this machine offers: page sizes, huge pages, limits, permissions, "
        "kernel features",
        description="Show page and huge page sizes, THP mode, limits, which "
        "permission combinations the kernel gives (probed by real allocations), and which "
        "kernel features are available (each probed; a missing one says why).",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print JSON for scripts (schema version {INFO_SCHEMA}: the `schema` key)",
    )
    parser.set_defaults(run=_run_info, prog=parser.prog)


# ---------------------------------------------------------------- bench


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written, or None when it can.

    Found out by opening it for appending, which leaves an existing file as it
    was; a file the check created is removed again.
    """
    if path.is_dir():
        return f"{path} is a directory"
    existed = path.exists()
    try:
        with path.open("ab"):
            pass
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    if not existed:
        path.unlink(missing_ok=True)
    return None


def plot_problem(path: Path) -> str | None:
    """Why a chart cannot be drawn into ``path``, or None when it can."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return "needs matplotlib: pip install 'mmap-alloc[bench]'"
    formats: dict[str, str] = FigureCanvasAgg.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        known = ", ".join(sorted(formats))
        return f"{path.name!r} does not end in a format matplotlib writes ({known})"
    return unwritable(path)


def _run_bench(args: argparse.Namespace) -> int:
    from . import bench

    error: Callable[[str], NoReturn] = args.error
    # checked before the run, which takes minutes, rather than after it
    if sys.stdout is None:
        raise OutputError("standard output is closed: nowhere to write the report")
    if args.json is not None and (problem := unwritable(args.json)) is not None:
        error(f"argument --json: {problem}")
    if args.plot is not None and (problem := plot_problem(args.plot)) is not None:
        error(f"argument --plot: {problem}")
    report = io.StringIO()  # written out by emit(), which turns a failed write into one line
    try:
        bench.run(
            quick=args.quick,
            json_path=args.json,
            plot_path=args.plot,
            rounds=args.rounds,
            only=args.only,
            out=report,
            err=sys.stderr if sys.stderr is not None else io.StringIO(),
            progress=None if sys.stderr is not None else False,
        )
    except bench.NoCaseMatches as exc:
        error(f"argument --only: {exc}")
    except OSError as exc:  # writing the JSON or the chart: the disk filled up, the folder went
        if report.getvalue():
            emit(report.getvalue().rstrip("\n"))
        name = exc.filename if exc.filename is not None else "the results"
        error_line(args.prog, f"cannot write {name}: {exc.strerror or exc}")
        return 1
    emit(report.getvalue().rstrip("\n"))
    return 0


def _add_bench(commands: argparse._SubParsersAction[CommandParser]) -> None:
    parser = commands.add_parser(
        "bench",
        help="measure mmap_alloc against the system calls from C, and against peers",
        description="Time each case's variants interleaved in rounds and print, per case, "
        "the median time per operation with its range and each variant's ratio to the "
        'case\'s reference: the same system calls made from a C loop ("C loop"), which '
        "is what mmap_alloc costs on top of the kernel, not a lower bound for other ways "
        "of doing the work.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of seconds (smaller cases, 3 rounds): no measurement, no verdicts",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="also draw a chart (needs matplotlib)"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        metavar="N",
        help="measured rounds per case, at least 1 (default 15, quick 3)",
    )
    parser.add_argument(
        "--only", metavar="TEXT", help="run only the cases whose name contains TEXT"
    )
    parser.set_defaults(run=_run_bench, error=parser.error, prog=parser.prog)


# ---------------------------------------------------------------- the parser


class CommandParser(argparse.ArgumentParser):
    """A command's parser: an argument it does not know is a usage error of the
    command (its usage line), not of the top-level parser."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


COMMANDS: list[Callable[[argparse._SubParsersAction[CommandParser]], None]] = [
    _add_info,
    _add_bench,
]
"""Functions that each add one subcommand; its parser sets ``run`` (args -> exit status)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="mmap-alloc"
        if os.path.basename(sys.argv[0]) == "mmap-alloc"
        else "python -m mmap_alloc",
        description="Page-granular memory straight from the kernel.",
    )
    parser.add_argument("--version", action="version", version=f"mmap_alloc {__version__}")
    commands = parser.add_subparsers(
        title="commands", metavar="COMMAND", required=True, parser_class=CommandParser
    )
    for add in COMMANDS:
        add(commands)
    return parser


def error_line(prog: str, message: str) -> None:
    """``prog: error: message`` on standard error, if there is one to write to."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except BrokenPipeError:  # e.g. piped into head: not an error worth a traceback
        _silence_stdout()
        return 1
    except OutputError as exc:
        error_line(args.prog, str(exc))
        return 1
    return status
