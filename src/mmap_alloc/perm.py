"""Memory permissions: which of read, write and execute a page allows, and
what each platform gives when asked for a combination."""

from __future__ import annotations

import enum
import sys


class Perm(enum.IntFlag):
    """Read/write/execute permission bits; the values are the POSIX PROT_* bits.

    ``str(Perm.READ | Perm.EXEC) == "r-x"``, the notation of /proc/self/maps.
    """

    NONE = 0
    READ = 1
    WRITE = 2
    EXEC = 4

    def __str__(self) -> str:
        return "".join(
            letter if self & flag else "-"
            for letter, flag in (("r", Perm.READ), ("w", Perm.WRITE), ("x", Perm.EXEC))
        )

    @classmethod
    def parse(cls, text: str) -> Perm:
        """The permissions written as in /proc/self/maps, e.g. ``"r-x"``."""
        if len(text) != 3 or any(
            c not in (letter, "-") for c, letter in zip(text, "rwx", strict=True)
        ):
            raise ValueError(f"permissions must look like 'rwx' or 'r-x', not {text!r}")
        perm = cls.NONE
        for c, flag in zip(text, (cls.READ, cls.WRITE, cls.EXEC), strict=True):
            if c != "-":
                perm |= flag
        return perm

    @classmethod
    def of(cls, *, read: bool, write: bool, exec: bool) -> Perm:
        """The permissions with the given flags set."""
        return (
            (cls.READ if read else cls.NONE)
            | (cls.WRITE if write else cls.NONE)
            | (cls.EXEC if exec else cls.NONE)
        )


ALL_PERMS: tuple[Perm, ...] = tuple(Perm(value) for value in range(8))
"""The eight combinations of read, write and execute, from ``---`` to ``rwx``."""

PLATFORMS = ("linux", "darwin", "win32")
"""The platforms whose permission rules are known (see effective_perms)."""

_RW = Perm.READ | Perm.WRITE
_RWX = Perm.READ | Perm.WRITE | Perm.EXEC

# Requested -> in force, where a platform cannot give exactly what was asked;
# every entry grants at least the requested permissions. Linux is what the
# library runs on; the darwin and win32 tables are the design for those
# platforms (the library does not build there yet), kept as tested data.
_FALLBACKS: dict[str, dict[Perm, Perm]] = {
    "linux": {},
    # Apple's pmap cannot express write without read.
    "darwin": {Perm.WRITE: _RW, Perm.WRITE | Perm.EXEC: _RWX},
    # VirtualAlloc has no write-only page protection (PAGE_READWRITE, PAGE_EXECUTE_READWRITE).
    "win32": {Perm.WRITE: _RW, Perm.WRITE | Perm.EXEC: _RWX},
}


def effective_perms(requested: Perm, platform: str = sys.platform) -> Perm:
    """The permissions in force when ``requested`` is asked for on ``platform``.

    A combination the platform supports is used exactly; one it does not is
    replaced by one that is no more restrictive.
    """
    key = "linux" if platform.startswith("linux") else platform
    try:
        table = _FALLBACKS[key]
    except KeyError:
        raise ValueError(f"unknown platform {platform!r}; known: {', '.join(PLATFORMS)}") from None
    requested = Perm(requested)
    return table.get(requested, requested)
