"""Every group of benchmark cases, in the order ``python -m mmap_alloc bench`` runs them.

A group is a function ``(Scale) -> Iterator[Case]``; a new capability adds
its module of cases and lists its groups here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .cases import (
    Scale,
    commit_uncommit,
    growth,
    pool_pairs,
    protect_flips,
    random_reads,
    round_trips,
    touched_round_trips,
)
from .file_cases import file_cases
from .harness import Case
from .jit_cases import code_heap
from .region_cases import CASES as REGION_CASES
from .secret_cases import secret_round_trips
from .shared_cases import shared_memory_cases

CASE_GROUPS: tuple[Callable[[Scale], Iterator[Case]], ...] = (
    round_trips,
    touched_round_trips,
    growth,
    protect_flips,
    commit_uncommit,
    pool_pairs,
    random_reads,
    secret_round_trips,
    code_heap,
    *REGION_CASES,
    shared_memory_cases,
    file_cases,
)
