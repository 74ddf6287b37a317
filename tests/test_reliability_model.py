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
fails a test instead of killing the runner. Rules come in mixins (CoreRules,
ProtectionRules); features that land later add their own mixin to
MapAllocMachine's bases (see the note above it).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mmap_alloc import CannotReallocInPlace, MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from support import HOST_MAPS, emulated_skip, mapped_bytes, page_perms, read_maps

try:
    import numpy
    import numpy.random
except ImportError:  # numpy is optional: the model then exports memoryviews and ctypes only
    numpy = None  # type: ignore[assignment]

PAGE = PAGE_SIZE
R, W, X = Perm.READ, Perm.WRITE, Perm.EXEC
RW = R | W
ALL = R | W | X
MAX_LIVE = 6
MAX_PAGES = 5

IN_CHILD_ENV = "MMAP_ALLOC_MODEL_CHILD"
EXAMPLES_ENV = "MMAP_ALLOC_MODEL_EXAMPLES"
STEPS_ENV = "MMAP_ALLOC_MODEL_STEPS"
REPORT_ENV = "MMAP_ALLOC_MODEL_REPORT"

# Allocator settings the model uses: name -> MapAlloc keyword arguments.
SETTINGS: dict[str, dict[str, Any]] = {
    "rw": {},
    "r": {"write": False},
    "rx": {"write": False, "exec": True},
    "rwx": {"exec": True},
    "w": {"read": False},
    "none": {"read": False, "write": False},
    "rw-commit": {"commit": True},
}

EXPORT_KINDS = ["memoryview", "ctypes"] + (["numpy"] if numpy is not None else [])
NoArgs = ctypes.CFUNCTYPE(None)

COUNTS: Counter[str] = Counter()
"""Rules run and outcomes seen, over all examples of this process (for the report)."""


def capacity_of(size: int) -> int:
    return -(-size // PAGE) * PAGE


def common(pages: list[Perm]) -> Perm:
    """The protection all pages share: what the region's buffer may rely on."""
    result = ALL
    for perms in pages:
        result &= perms
    return result


@dataclass
class Export:
    """A live buffer of a region: the pages it covers and whether it is writable."""

    obj: Any
    pages: range
    writable: bool


@dataclass
class Model:
    """What one live region should be."""

    region: Region
    alloc: MapAlloc
    data: bytearray  # the bytes [0, size)
    pages: list[Perm]  # the protection of each page of the capacity
    address: int
    exports: list[Export] = field(default_factory=list)
    functions: list[Any] = field(default_factory=list)

    def touched(self, start: int, stop: int) -> list[Perm]:
        """The protections of the pages bytes [start, stop) touch."""
        return [self.pages[i] for i in range(start // PAGE, -(-stop // PAGE))]

    def access(self, start: int, stop: int) -> Perm:
        """What every page bytes [start, stop) touch allows."""
        return common(self.touched(start, stop))

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def capacity(self) -> int:
        return len(self.pages) * PAGE

    @property
    def busy(self) -> bool:
        """Exported or pinned: no move, shrink or free."""
        return bool(self.exports or self.functions)

    def resize(self, size: int, capacity: int) -> None:
        """Size and capacity change: growth reads as zero and takes the last page's protection."""
        if size < self.size:
            del self.data[size:]
        else:
            self.data.extend(bytes(size - self.size))
        pages = capacity // PAGE
        self.pages = self.pages[:pages] + [self.pages[-1]] * (pages - len(self.pages))


class MachineBase(RuleBasedStateMachine):
    """State, helpers and invariants shared by the rule mixins."""

    def __init__(self) -> None:
        super().__init__()
        self.allocs = {name: MapAlloc(**kwargs) for name, kwargs in SETTINGS.items()}
        self.live: list[Model] = []
        self.freed: list[tuple[Region, MapAlloc]] = []

    # ------------------------------------------------------------ helpers

    def pick(self, index: int) -> Model:
        return self.live[index % len(self.live)]

    @contextmanager
    def expect(self, what: str, error: type[BaseException] | None) -> Iterator[None]:
        """The block raises ``error`` (and the caller changes no model), or
        nothing when ``error`` is None."""
        COUNTS[what] += 1
        if error is None:
            yield
            return
        with pytest.raises(error):
            yield
        COUNTS[f"{what}: {error.__name__}"] += 1

    def add(self, region: Region, alloc: MapAlloc, perms: Perm, zero_size: int) -> None:
        assert not region.closed
        self.live.append(
            Model(
                region,
                alloc,
                bytearray(zero_size),
                [perms] * (region.capacity // PAGE),
                region.address,
            )
        )

    def forget(self, model: Model) -> None:
        """The region was freed: it must be unmapped now."""
        self.live.remove(model)
        assert model.region.closed
        assert mapped_bytes(read_maps(), model.address, model.capacity) == 0
        self.freed.append((model.region, model.alloc))
        del self.freed[:-4]

    def range_of(
        self, model: Model, offset_pages: int, misalign: bool, length: int | None
    ) -> tuple[int, int | None, bool]:
        """(offset, length, valid) for the page-range arguments of commit/protect."""
        offset = offset_pages * PAGE + (1 if misalign else 0)
        valid = not misalign and offset <= model.capacity
        if valid and length is not None:
            valid = offset + capacity_of(length) <= model.capacity if length else True
        return offset, length, valid

    @staticmethod
    def span(model: Model, offset: int, length: int | None) -> range:
        """The pages a valid (offset, length) covers."""
        end = model.capacity if length is None else offset + capacity_of(length)
        return range(offset // PAGE, end // PAGE)

    # ------------------------------------------------------------ invariants

    @invariant()
    def regions_match_model_and_kernel(self) -> None:
        vmas = read_maps()
        spans = []
        for model in self.live:
            region = model.region
            assert not region.closed
            assert (region.address, region.size, len(region), region.capacity) == (
                model.address,
                model.size,
                model.size,
                model.capacity,
            )
            assert region._exports == len(model.exports)
            assert region._pins == len(model.functions)
            assert page_perms(vmas, model.address, model.capacity, PAGE) == model.pages, (
                "protections differ from /proc/self/maps"
            )
            assert region.mixed == (len(set(model.pages)) > 1)
            if not region.mixed:
                assert region.perms == model.pages[0]
            assert region._prot == (-1 if region.mixed else model.pages[0])
            self.check_contents(model)
            spans.append((model.address, model.address + model.capacity))
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, "live regions overlap"

    def check_contents(self, model: Model) -> None:
        region = model.region
        if model.access(0, model.size) & R:
            assert bytes(region) == model.data
            return
        # Not readable through the buffer: compare the readable pages directly.
        for index, perms in enumerate(model.pages):
            start, end = index * PAGE, min((index + 1) * PAGE, model.size)
            if perms & R and start < end:
                assert (
                    ctypes.string_at(region.address + start, end - start) == model.data[start:end]
                )

    def teardown(self) -> None:
        for model in list(self.live):
            model.exports.clear()
            model.functions.clear()
            model.alloc.dealloc(model.region)
            self.forget(model)
        COUNTS["examples"] += 1
        report = os.environ.get(REPORT_ENV)
        if report:
            Path(report).write_text(json.dumps(COUNTS, indent=1, sort_keys=True))


offsets = st.integers(0, MAX_PAGES + 1)
lengths = st.none() | st.integers(0, (MAX_PAGES + 1) * PAGE)
indexes = st.integers(0, MAX_LIVE - 1)  # small: steps often meet the same region
# Sizes anywhere, and often just around page boundaries, where rounding goes wrong.
sizes = st.integers(1, MAX_PAGES * PAGE) | st.builds(
    lambda pages, delta: max(1, pages * PAGE + delta),
    st.integers(0, MAX_PAGES - 1),
    st.sampled_from([-10, -1, 0, 1, 10]),
)
perm_values = st.sampled_from([Perm(value) for value in range(8)])


class CoreRules(MachineBase):
    """Allocation, resizing, commit, contents, exports and freeing."""

    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(
        kind=st.sampled_from(sorted(SETTINGS)),
        method=st.sampled_from(["alloc", "alloc_zeroed", "alloc_excess", "alloc_obj"]),
        size=sizes,
        align=st.none() | st.sampled_from([PAGE // 2, PAGE, 4 * PAGE, 16 * PAGE]),
    )
    def allocate(self, kind: str, method: str, size: int, align: int | None) -> None:
        alloc = self.allocs[kind]
        with self.expect(method, None):
            if method == "alloc_obj":
                region = alloc.alloc_obj()
                size, align = alloc.obj_layout
            else:
                region = getattr(alloc, method)(size, align)
        if method == "alloc_excess":
            size = capacity_of(size)
        assert region.address % max(align or PAGE, PAGE) == 0
        assert region.capacity == capacity_of(size)
        self.add(region, alloc, alloc.perms, size)

    @precondition(lambda self: len(self.live) < MAX_LIVE)
    @rule(size=sizes, align=st.none() | st.just(8 * PAGE))
    def reserve(self, size: int, align: int | None) -> None:
        alloc = self.allocs["rw"]
        with self.expect("reserve", None):
            region = alloc.reserve(size, align)
        self.add(region, alloc, Perm.NONE, size)

    @precondition(lambda self: self.live)
    @rule(index=indexes, new_size=sizes)
    def realloc(self, index: int, new_size: int) -> None:
        model = self.pick(index)
        new_capacity = capacity_of(new_size)
        stays = new_capacity == model.capacity or (new_capacity < model.capacity and model.exports)
        if (
            (new_capacity > model.capacity and model.busy)
            or (stays and model.functions and new_size > model.size)  # would re-zero pinned code
            or (not stays and model.functions)  # would drop or move pinned code
        ):
            with self.expect("realloc", BufferError):
                model.alloc.realloc(model.region, new_size)
            return
        with self.expect("realloc", None):
            assert model.alloc.realloc(model.region, new_size) is model.region
        if stays:
            assert model.region.address == model.address, "realloc moved a region it must keep"
            model.resize(new_size, model.capacity)
        else:
            model.resize(new_size, new_capacity)
            model.address = model.region.address

    @precondition(lambda self: self.live)
    @rule(index=indexes, new_size=sizes)
    def grow_in_place(self, index: int, new_size: int) -> None:
        model = self.pick(index)
        if new_size < model.size:
            with self.expect("grow_in_place", ValueError):
                model.alloc.grow_in_place(model.region, new_size)
            return
        if model.functions and min(new_size, model.capacity) > model.size:
            with self.expect("grow_in_place", BufferError):  # would re-zero pinned code
                model.alloc.grow_in_place(model.region, new_size)
            return
        COUNTS["grow_in_place"] += 1
        try:
            model.alloc.grow_in_place(model.region, new_size)
        except CannotReallocInPlace:
            COUNTS["grow_in_place: CannotReallocInPlace"] += 1
            assert capacity_of(new_size) > model.capacity
            return
        model.resize(new_size, max(capacity_of(new_size), model.capacity))

    @precondition(lambda self: self.live)
    @rule(index=indexes, new_size=sizes)
    def shrink_in_place(self, index: int, new_size: int) -> None:
        model = self.pick(index)
        error = ValueError if new_size > model.size else BufferError if model.busy else None
        with self.expect("shrink_in_place", error):
            model.alloc.shrink_in_place(model.region, new_size)
        if error is None:
            model.resize(new_size, capacity_of(new_size))

    @precondition(lambda self: self.live)
    @rule(
        index=indexes, offset=offsets, misalign=st.booleans(), length=lengths, commit=st.booleans()
    )
    def commit_or_uncommit(
        self, index: int, offset: int, misalign: bool, length: int | None, commit: bool
    ) -> None:
        model = self.pick(index)
        start, length, valid = self.range_of(model, offset, misalign, length)
        name = "commit" if commit else "uncommit"
        call = model.alloc.commit if commit else model.alloc.uncommit
        if not valid:
            with self.expect(name, ValueError):
                call(model.region, start, length)
            return
        pages = self.span(model, start, length)
        if commit:  # pages that can be read or written are committed; none at all: ValueError
            reachable = any(model.pages[i] & RW for i in pages)
            with self.expect(name, None if reachable or not pages else ValueError):
                call(model.region, start, length)
            return
        if model.functions and pages:
            with self.expect(name, BufferError):  # pinned code keeps its contents
                call(model.region, start, length)
            return
        with self.expect(name, None):
            call(model.region, start, length)
        if pages:
            end = min(pages.stop * PAGE, model.size)
            if start < end:
                model.data[start:end] = bytes(end - start)

    @precondition(lambda self: self.live)
    @rule(
        index=indexes,
        at=st.integers(0, MAX_PAGES * PAGE),
        length=st.integers(1, 3 * PAGE),
        fill=st.integers(0, 255),
    )
    def write(self, index: int, at: int, length: int, fill: int) -> None:
        """region[a:b] = pattern through the safe API (or directly into pages the
        model knows are writable when the region's buffer cannot be)."""
        model = self.pick(index)
        start = at % model.size
        stop = min(start + length, model.size)
        payload = bytes((fill + i) & 0xFF for i in range(stop - start))
        error = None if model.access(start, stop) & W else TypeError  # writing needs WRITE only
        with self.expect("write", error):
            model.region[start:stop] = payload
        if error is None:
            model.data[start:stop] = payload
        elif all(model.pages[i] & RW == RW for i in range(start // PAGE, (stop - 1) // PAGE + 1)):
            ctypes.memmove(model.region.address + start, payload, len(payload))
            model.data[start:stop] = payload

    @precondition(lambda self: self.live)
    @rule(index=indexes, at=st.integers(0, MAX_PAGES * PAGE), length=st.integers(0, 2 * PAGE))
    def read(self, index: int, at: int, length: int) -> None:
        model = self.pick(index)
        start = at % model.size
        stop = min(start + length, model.size)
        readable = model.access(start, start + 1) & R and model.access(start, stop) & R
        error = None if readable else BufferError
        with self.expect("read", error):
            assert model.region[start] == model.data[start]
            assert model.region[start : start + length] == model.data[start : start + length]

    @precondition(lambda self: self.live)
    @rule(index=indexes, kind=st.sampled_from(EXPORT_KINDS))
    def export(self, index: int, kind: str) -> None:
        model = self.pick(index)
        perms = model.access(0, model.size)  # a buffer of the region covers its size
        region = model.region
        pages = range(-(-model.size // PAGE))
        writable = bool(perms & R and perms & W)
        if kind == "ctypes":
            error = BufferError if not perms & R else TypeError if not perms & W else None
            with self.expect("export ctypes", error):
                obj: Any = (ctypes.c_char * model.size).from_buffer(region)
                model.exports.append(Export(obj, pages, writable))
            return
        error = None if perms & R else BufferError
        with self.expect(f"export {kind}", error):
            if kind == "numpy":
                assert numpy is not None
                array = numpy.frombuffer(region, dtype=numpy.uint8)  # type: ignore[call-overload]
                assert array.flags.writeable == writable
                model.exports.append(Export(array, pages, writable))
            else:
                view = memoryview(region)
                assert view.readonly == (not writable)
                model.exports.append(Export(view, pages, writable))

    @precondition(lambda self: any(model.exports for model in self.live))
    @rule(index=indexes, which=indexes, fill=st.integers(0, 255))
    def write_through_export(self, index: int, which: int, fill: int) -> None:
        model = next(m for m in self.live[index % len(self.live) :] + self.live if m.exports)
        export = model.exports[which % len(model.exports)].obj
        with memoryview(export).cast("B") as view:  # a view of its own: released here
            if view.readonly:
                return
            COUNTS["write through export"] += 1
            n = min(len(view), 2 * PAGE)
            payload = bytes([fill]) * n
            view[:n] = payload
        visible = min(n, model.size)
        model.data[:visible] = payload[:visible]

    @precondition(lambda self: any(model.exports for model in self.live))
    @rule(index=indexes, which=indexes)
    def release_export(self, index: int, which: int) -> None:
        model = next(m for m in self.live[index % len(self.live) :] + self.live if m.exports)
        export = model.exports.pop(which % len(model.exports)).obj
        COUNTS["release"] += 1
        if isinstance(export, memoryview):
            export.release()
        del export

    @precondition(lambda self: self.live)
    @rule(index=indexes, how=st.sampled_from(["dealloc", "close", "with", "dealloc_obj"]))
    def free(self, index: int, how: str) -> None:
        model = self.pick(index)
        region = model.region
        if how == "dealloc_obj" and model.size != model.alloc.obj_layout.size:
            with self.expect(how, ValueError):
                model.alloc.dealloc_obj(region)
            return
        with self.expect(how, BufferError if model.busy else None):
            if how in ("dealloc", "dealloc_obj"):
                getattr(model.alloc, how)(region)
            elif how == "close":
                region.close()
            else:
                with region:
                    pass
        if not model.busy:
            self.forget(model)

    @precondition(lambda self: self.live)
    @rule(index=indexes)
    def free_with_another_allocator(self, index: int) -> None:
        model = self.pick(index)
        other = next(a for a in self.allocs.values() if a is not model.alloc)
        with self.expect("dealloc by another allocator", ValueError):
            other.dealloc(model.region)
        with self.expect("realloc by another allocator", ValueError):
            other.realloc(model.region, PAGE)

    @precondition(lambda self: self.freed)
    @rule(
        index=indexes,
        op=st.sampled_from(
            [
                "dealloc",
                "realloc",
                "grow",
                "shrink",
                "commit",
                "uncommit",
                "getitem",
                "setitem",
                "bytes",
                "memoryview",
                "protect",
                "protections",
                "address",
                "function",
                "close",
            ]
        ),
    )
    def use_after_free(self, index: int, op: str) -> None:
        region, alloc = self.freed[index % len(self.freed)]
        calls: dict[str, Callable[[], object]] = {
            "dealloc": lambda: alloc.dealloc(region),
            "realloc": lambda: alloc.realloc(region, PAGE),
            "grow": lambda: alloc.grow_in_place(region, 10 * PAGE),
            "shrink": lambda: alloc.shrink_in_place(region, 1),
            "commit": lambda: alloc.commit(region),
            "uncommit": lambda: alloc.uncommit(region),
            "getitem": lambda: region[0],
            "setitem": lambda: region.__setitem__(0, 1),
            "bytes": lambda: bytes(region),
            "memoryview": lambda: memoryview(region),
            "protect": lambda: region.protect(RW),
            "protections": region.protections,
            "address": lambda: region.address,
            "function": lambda: region.function(NoArgs),
            "close": region.close,
        }
        with self.expect(f"use after free: {op}", None if op == "close" else ValueError):
            calls[op]()
        assert region.closed


class ProtectionRules(MachineBase):
    """protect(), make_exec(), make_writable(), writable() and function()."""

    @staticmethod
    def expected_protect_error(
        model: Model, before: list[Perm], perms: Perm, pages: range
    ) -> type[BaseException] | None:
        """BufferError when protecting ``pages`` of a region whose pages are
        ``before`` would take EXEC from a pinned page or READ/WRITE from the
        exported buffer; else None."""
        changed = [i for i in pages if before[i] != perms]
        if model.functions and any(before[i] & X and not perms & X for i in changed):
            return BufferError
        for export in model.exports:  # each needs READ, and WRITE if writable, of its pages
            covered = [i for i in changed if i in export.pages]
            if covered and (not perms & R or (export.writable and not perms & W)):
                return BufferError
        return None

    def apply_protect(
        self,
        model: Model,
        name: str,
        call: Callable[[], object],
        perms: Perm,
        offset: int,
        length: int | None,
    ) -> bool:
        pages = self.span(model, offset, length)
        error = self.expected_protect_error(model, model.pages, perms, pages)
        with self.expect(name, error):
            call()
        if error is None:
            for i in pages:
                model.pages[i] = perms
        return error is None

    @precondition(lambda self: self.live)
    @rule(
        index=indexes,
        perms=perm_values,
        offset=offsets,
        misalign=st.booleans(),
        length=lengths,
        as_int=st.booleans(),
    )
    def protect(
        self, index: int, perms: Perm, offset: int, misalign: bool, length: int | None, as_int: bool
    ) -> None:
        model = self.pick(index)
        start, length, valid = self.range_of(model, offset, misalign, length)
        value: Any = int(perms) if as_int else perms

        def call() -> None:
            model.region.protect(value, start, length)

        if not valid:
            with self.expect("protect", ValueError):
                call()
            return
        self.apply_protect(model, "protect", call, perms, start, length)

    @precondition(lambda self: self.live)
    @rule(
        index=indexes,
        helper=st.sampled_from(["make_exec", "make_writable"]),
        offset=offsets,
        length=lengths,
    )
    def flip(self, index: int, helper: str, offset: int, length: int | None) -> None:
        model = self.pick(index)
        start, length, valid = self.range_of(model, offset, False, length)

        def call() -> None:
            getattr(model.region, helper)(start, length)

        if not valid:
            with self.expect(helper, ValueError):
                call()
            return
        perms = R | X if helper == "make_exec" else RW
        self.apply_protect(model, helper, call, perms, start, length)

    @precondition(lambda self: self.live)
    @rule(index=indexes, fill=st.integers(0, 255))
    def writable_block(self, index: int, fill: int) -> None:
        """with region.writable(): write; read/exec after. Entry refuses (BufferError,
        nothing changed) what leaving could not undo: functions pinning executable
        pages, or writable buffers that read/exec pages would break."""
        model = self.pick(index)
        all_pages = range(len(model.pages))
        enter_error = self.expected_protect_error(
            model, model.pages, R | X, all_pages
        ) or self.expected_protect_error(model, model.pages, RW, all_pages)
        COUNTS["writable()"] += 1
        if enter_error is not None:
            with pytest.raises(enter_error), model.region.writable():
                pass
            COUNTS["writable(): BufferError on entry"] += 1
            return
        with model.region.writable():
            model.pages = [RW] * len(all_pages)
            model.region[0] = fill
            model.data[0] = fill
        model.pages = [R | X] * len(all_pages)

    @precondition(lambda self: self.live)
    @rule(index=indexes, at=st.integers(0, MAX_PAGES * PAGE))
    def function(self, index: int, at: int) -> None:
        """region.function() pins the region (the code is never called: it is data)."""
        model = self.pick(index)
        offset = at % model.capacity // 4 * 4  # instructions are 4-byte aligned on arm64
        error = None if model.pages[offset // PAGE] & X else ValueError
        with self.expect("function", error):
            model.functions.append(model.region.function(NoArgs, offset))

    @precondition(lambda self: any(model.functions for model in self.live))
    @rule(index=indexes)
    def release_function(self, index: int) -> None:
        model = next(m for m in self.live[index % len(self.live) :] + self.live if m.functions)
        COUNTS["release function"] += 1
        model.functions.pop()

    @precondition(lambda self: self.live)
    @rule(index=indexes, offset=offsets, length=lengths)
    def flush_icache(self, index: int, offset: int, length: int | None) -> None:
        model = self.pick(index)
        start, length, valid = self.range_of(model, offset, False, length)
        with self.expect("flush_icache", None if valid else ValueError):
            model.region.flush_icache(start, length)


# Features that land later add a mixin of rules here, e.g.
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
