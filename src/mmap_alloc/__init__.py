"""mmap_alloc: page-granular memory straight from the kernel.

Memory with chosen read/write/exec permissions, explicit commit and uncommit,
in-place resizing and huge pages, after the Rust crate mmap-alloc; code
memory for JITs (CodeHeap: one memfd mapped read/write and read/exec); and
files mapped so that no truncation can crash the process (FileRegion).

The public names load with the module that defines them, on first use
(PEP 562): ``import mmap_alloc`` costs about what ``import json`` does, and a
program that only allocates regions never imports the code heap, secret or
shared memory modules (nor ``socket`` and ``secrets``, which they need).
"""

from ._version import __version__

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:  # what type checkers and the API reference see
    from .allocator import Layout, MapAlloc
    from .backings import Backing
    from .builder import MapAllocBuilder
    from .exceptions import (
        AllocError,
        CannotReallocInPlace,
        FileTruncatedError,
        MapAllocError,
        MemoryCorruptionError,
    )
    from .files import FileRegion
    from .jit import CodeBlock, CodeHeap, CodeHeapStats
    from .perm import Perm
    from .pool import ObjectPool, PoolStats
    from .region import Region
    from .secret import SecretBuffer
    from .shared import SharedRegion
    from .stats import AllocStats, RegionStats
del TYPE_CHECKING

# Each public name and the module that defines it (tests/test_init.py checks
# that this agrees with the imports above and with __all__).
_HOMES = {
    "AllocError": "exceptions",
    "AllocStats": "stats",
    "Backing": "backings",
    "CannotReallocInPlace": "exceptions",
    "CodeBlock": "jit",
    "CodeHeap": "jit",
    "CodeHeapStats": "jit",
    "FileRegion": "files",
    "FileTruncatedError": "exceptions",
    "Layout": "allocator",
    "MapAlloc": "allocator",
    "MapAllocBuilder": "builder",
    "MapAllocError": "exceptions",
    "MemoryCorruptionError": "exceptions",
    "ObjectPool": "pool",
    "Perm": "perm",
    "PoolStats": "pool",
    "Region": "region",
    "RegionStats": "stats",
    "SecretBuffer": "secret",
    "SharedRegion": "shared",
}

__all__ = [
    "AllocError",
    "AllocStats",
    "Backing",
    "CannotReallocInPlace",
    "CodeBlock",
    "CodeHeap",
    "CodeHeapStats",
    "FileRegion",
    "FileTruncatedError",
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


def __getattr__(name: str) -> object:
    """Import the module that defines a public name, on its first use."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'mmap_alloc' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later uses find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
