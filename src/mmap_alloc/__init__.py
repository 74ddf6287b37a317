"""mmap_alloc: page-granular memory straight from the kernel.

Memory with chosen read/write/exec permissions, explicit commit and uncommit,
in-place resizing and huge pages, after the Rust crate mmap-alloc.
"""

from ._version import __version__
from .allocator import Layout, MapAlloc
from .backings import Backing
from .builder import MapAllocBuilder
from .exceptions import AllocError, CannotReallocInPlace, MapAllocError
from .perm import Perm
from .pool import ObjectPool, PoolStats
from .region import Region
from .shared import SharedRegion
from .stats import AllocStats, RegionStats

__all__ = [
    "AllocError",
    "AllocStats",
    "Backing",
    "CannotReallocInPlace",
    "Layout",
    "MapAlloc",
    "MapAllocBuilder",
    "MapAllocError",
    "ObjectPool",
    "Perm",
    "PoolStats",
    "Region",
    "RegionStats",
    "SharedRegion",
    "__version__",
]
