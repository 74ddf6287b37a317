"""Memory permissions: which of read, write and execute a page allows."""

from __future__ import annotations

import enum


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
