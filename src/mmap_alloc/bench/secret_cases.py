"""The secret memory case: SecretBuffer create+close against libsodium's
``sodium_malloc`` + ``sodium_free`` (through ctypes), and a plain Region.

Both sides lock their pages (mlock), exclude them from core dumps and guard
them with a page on each side; libsodium also makes a read-only header page
and fills new memory with garbage. The case needs libsodium's shared library
(Debian: ``apt-get install libsodium23``); without it, it runs against the
Region only and says why in its note.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import MapAlloc, SecretBuffer, features
from .harness import Case, Variant

if TYPE_CHECKING:
    from .cases import Scale

SECRET_SIZE = 32
"""Bytes of the secret: a 256-bit key."""
LIBSODIUM = "libsodium sodium_malloc+sodium_free (ctypes)"
REGION = "Region alloc+dealloc"


def libsodium() -> ctypes.CDLL | None:
    """libsodium, initialised, with the signatures the case calls; None if missing."""
    name = ctypes.util.find_library("sodium")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    if lib.sodium_init() < 0:
        return None
    lib.sodium_malloc.restype = ctypes.c_void_p
    lib.sodium_malloc.argtypes = [ctypes.c_size_t]
    lib.sodium_free.restype = None
    lib.sodium_free.argtypes = [ctypes.c_void_p]
    return lib


def _secret_variant(name: str, backend: str) -> Variant:
    def run(n: int) -> None:
        make = SecretBuffer
        for _ in range(n):
            make(SECRET_SIZE, backend=backend).close()

    return Variant(name, run)


def secret_round_trips(scale: Scale) -> Iterator[Case]:
    """Case 9: SecretBuffer(32) + close() against sodium_malloc(32) + sodium_free()."""
    guard = "madvise" if features.madv_guard_install().available else "mprotect"
    subject = f"SecretBuffer anonymous, guard {guard}"
    variants = [_secret_variant(subject, "anonymous")]
    if features.memfd_secret().available:
        variants.append(_secret_variant("SecretBuffer memfd_secret", "memfd_secret"))
    allocator = MapAlloc()
    alloc, dealloc = allocator.alloc, allocator.dealloc

    def region(n: int) -> None:
        for _ in range(n):
            dealloc(alloc(SECRET_SIZE))

    variants.append(Variant(REGION, region))
    sodium = libsodium()
    if sodium is None:
        reference, target = REGION, None
        note = "libsodium not found (apt-get install libsodium23): no comparison with it"
    else:
        malloc, free = sodium.sodium_malloc, sodium.sodium_free

        def by_libsodium(n: int) -> None:
            for _ in range(n):
                free(malloc(SECRET_SIZE))

        variants.insert(1, Variant(LIBSODIUM, by_libsodium))
        reference, target = LIBSODIUM, 1.0
        note = f"{SECRET_SIZE} B, locked, guard pages both sides"
    yield Case(
        f"secret buffer create+close, {SECRET_SIZE} B",
        "secret memory",
        scale.ops(2000),
        tuple(variants),
        reference=reference,
        target=target,
        note=note,
    )
