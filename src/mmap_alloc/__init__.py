"""mmap_alloc: page-granular memory straight from the kernel.

Memory with chosen read/write/exec permissions, explicit commit and uncommit,
in-place resizing and huge pages, after the Rust crate mmap-alloc; and code
memory for JITs (CodeHeap: one memfd mapped read/write and read/exec).
"""

from ._version import __version__
from .allocator import Layout, MapAlloc
from .backings import Backing
from .builder import MapAllocBuilder
from .exceptions import AllocError, CannotReallocInPlace, MapAllocError, MemoryCorruptionError
from .jit import CodeBlock, CodeHeap, CodeHeapStats
from .perm import Perm
from .pool import ObjectPool, PoolStats
from .region import Region
from .secret import SecretBuffer
from .shared import SharedRegion
from .stats import AllocStats, RegionStats

__all__ = [
    "AllocError",
    "AllocStats",
    "Backing",
    "CannotReallocInPlace",
    "CodeBlock",
    "CodeHeap",
    "CodeHeapStats",
    "Layout",
    "MapAlloc",
    "MapAllocBuilder",
    "MapAllocError",
    "MemoryCorruptionError",
    "ObjectPool",
    "Perm",
    "PoolStats",
    "Region",
    "RegionStats",
    "SecretBuffer",
    "SharedRegion",
    "__version__",
]
