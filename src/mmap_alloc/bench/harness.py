"""Timing for benchmarks: interleaved variants, medians, and ratios from one run.

Machines here are noisy, so absolute times mean little; what a case reports
is the ratio of each variant to a reference variant measured in the same
round. Each round runs every variant once, in an order rotated from round to
round, so slow drift of the machine falls on all of them alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    """One way of doing a case's work: ``run(n)`` does it ``n`` times."""

    name: str
    run: Callable[[int], object]


@dataclass(frozen=True)
class Case:
    """A unit of work, the variants that do it, and what they are held to.

    ``subject`` names the variant under test (by default the first),
    ``reference`` the one every ratio is taken against (by default the
    second); ``target`` is the largest subject/reference ratio the project
    aims for (None: reported only). ``close`` frees what the case's variants
    share once the case has run.
    """

    name: str
    group: str
    n: int
    variants: tuple[Variant, ...]
    subject: str = ""
    reference: str = ""
    target: float | None = None
    higher_is_better: bool = False
    note: str = ""
    close: Callable[[], object] | None = None

    def __post_init__(self) -> None:
        names = [variant.name for variant in self.variants]
        for role, index in (("subject", 0), ("reference", 1)):
            chosen = getattr(self, role) or (names[index] if index < len(names) else "")
            if not chosen:
                raise ValueError(f"case {self.name!r}: no {role}: name one, or add variants")
            if chosen not in names:
                raise ValueError(f"case {self.name!r}: {role} {chosen!r} is none of {names}")
            object.__setattr__(self, role, chosen)


@dataclass(frozen=True)
class VariantResult:
    """Time per operation of one variant: every sample, and their median and spread."""

    name: str
    samples_ns: tuple[float, ...]
    ratio: float

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples_ns)

    @property
    def min_ns(self) -> float:
        return min(self.samples_ns)

    @property
    def max_ns(self) -> float:
        return max(self.samples_ns)


@dataclass(frozen=True)
class CaseResult:
    """What one case measured; ``ratio`` is subject/reference (median of rounds)."""

    case: Case
    variants: tuple[VariantResult, ...]
    rounds: int

    @property
    def ratio(self) -> float:
        return self.variant(self.case.subject).ratio

    @property
    def met(self) -> bool | None:
        """Whether the subject met the target; None when the case has none."""
        if self.case.target is None:
            return None
        if self.case.higher_is_better:
            return self.ratio >= self.case.target
        return self.ratio <= self.case.target

    def variant(self, name: str) -> VariantResult:
        for result in self.variants:
            if result.name == name:
                return result
        raise KeyError(name)


@dataclass
class Runner:
    """Runs cases with ``rounds`` measured rounds after ``warmup`` unmeasured ones."""

    rounds: int
    warmup: int = 1
    on_round: Callable[[], object] = field(default=lambda: None)

    def run(self, case: Case) -> CaseResult:
        try:
            samples = self._measure(case)
        finally:
            if case.close is not None:
                case.close()
        reference = samples[case.reference]
        results = []
        for variant in case.variants:
            own = samples[variant.name]
            ratio = statistics.median(a / b for a, b in zip(own, reference, strict=True))
            results.append(VariantResult(variant.name, tuple(own), ratio))
        return CaseResult(case, tuple(results), self.rounds)

    def _measure(self, case: Case) -> dict[str, list[float]]:
        samples: dict[str, list[float]] = {variant.name: [] for variant in case.variants}
        variants = case.variants
        for round_ in range(self.warmup + self.rounds):
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                elapsed = _time_batch(variant.run, case.n)
                if round_ >= self.warmup:
                    samples[variant.name].append(elapsed / case.n)
            self.on_round()
        return samples


def _time_batch(run: Callable[[int], object], n: int) -> float:
    """Nanoseconds ``run(n)`` takes, with the garbage collector held off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        run(n)
        return time.perf_counter_ns() - start
    finally:
        if enabled:
            gc.enable()
