"""The rules of the stateful model of MapAlloc (test_reliability_model.py), in
mixins: CoreRules (allocation, resizing, commit, contents, exports, freeing)
and ProtectionRules."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import precondition, rule

from mmap_alloc import CannotReallocInPlace, Perm
from model_machine import (
    COUNTS,
    EXPORT_KINDS,
    MAX_LIVE,
    MAX_PAGES,
    PAGE,
    RW,
    SETTINGS,
    Export,
    MachineBase,
    Model,
    NoArgs,
    R,
    W,
    X,
    capacity_of,
    indexes,
    lengths,
    offsets,
    perm_values,
    sizes,
)

try:
    import numpy
    import numpy.random
except ImportError:  # numpy is optional: the model then exports memoryviews and ctypes only
    numpy = None  # type: ignore[assignment]


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
