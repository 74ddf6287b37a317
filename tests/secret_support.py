"""Helpers shared by the SecretBuffer tests (tests/test_secret_*.py): marks for
the backends this kernel offers, and what the kernel says of a buffer's access.
The ``make`` fixture (a SecretBuffer of each backend) is in conftest.py.

Not in support.py: importing mmap_alloc.secret and mmap_alloc.features there
grew the heap of every child that support.py's run_child starts, and
test_reliability_faults' child at vm.max_map_count then had no room left to
read /proc/self/maps."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mmap_alloc import Perm, SecretBuffer, features
from mmap_alloc.features import Feature
from support import perms_at

HAS_MEMFD_SECRET = features.memfd_secret().available
HAS_GUARD_INSTALL = features.madv_guard_install().available
needs_memfd_secret = pytest.mark.skipif(
    not HAS_MEMFD_SECRET, reason=f"memfd_secret: {features.memfd_secret().detail}"
)
needs_guard_install = pytest.mark.skipif(
    not HAS_GUARD_INSTALL, reason=f"MADV_GUARD_INSTALL: {features.madv_guard_install().detail}"
)

Make = Callable[..., SecretBuffer]


def missing(name: str) -> Callable[[], Feature]:
    return lambda: Feature(name, False, "missing for this test")


def kernel_access(buf: SecretBuffer) -> Perm | None:
    """What /proc/self/maps says the secret pages allow."""
    return perms_at(buf._mapping[2])


ACCESS_PERMS = {"none": Perm.NONE, "read": Perm.READ, "readwrite": Perm.READ | Perm.WRITE}
