"""The stateful model of MapAlloc (test_reliability_model.py): the Python model
of a region, and the machine's base: its helpers, the invariants checked
after every step, and the strategies its rules draw from."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant

from mmap_alloc import MapAlloc, Perm, Region
from mmap_alloc._linux import PAGE_SIZE
from support import mapped_bytes, page_perms, read_maps

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
