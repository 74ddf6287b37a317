"""JIT code memory: a code heap mapped twice, so that code can be patched
while it runs and no page is ever writable and executable at once.

A :class:`CodeHeap` is one memfd mapped twice (MAP_SHARED): a read/write
view that code is written through and a read/exec view that it runs from.
Blocks of it are handed out by a bump allocator with a free list; writing
a block needs no mprotect, and functions made from a block stay callable
while the block is rewritten (inline caches, hot patching). This is the
dual mapping .NET and others use; see docs/jit.md for when to prefer
it to the make_writable()/make_exec() flip of a Region.

The state that keeps memory safe (both mappings, the blocks, their pins and
exports, the free list) is the C kernel's (``_mman.CodeHeap``,
``_mman.CodeBlock``); this module holds options, argument checks, messages
and the function type.
"""

from __future__ import annotations

import errno
import os
from _ctypes import CFuncPtr
from dataclasses import dataclass
from typing import TypeVar, cast

from ._args import power_of_two
from ._args import size as size_argument
from ._linux import (
    MFD_CLOEXEC,
    MFD_EXEC,
    PAGE_SIZE,
    format_size,
    memfd_noexec,
    selinux_mode,
)
from ._mman import CodeBlock as KernelCodeBlock
from ._mman import CodeHeap as KernelCodeHeap
from ._mman import View, _view_exported
from ._near import DEFAULT_WITHIN, PLACEMENT_ERRORS, check_near, map_near
from .closing import ClosesOnExit, RestoresOnExit
from .exceptions import AllocError
from .protection import code_offset, pinned_function

__all__ = ["CodeBlock", "CodeHeap", "CodeHeapStats"]

F = TypeVar("F", bound=CFuncPtr)

DEFAULT_CAPACITY = 64 << 20
"""The capacity of a CodeHeap made without one: 64 MiB of address space (pages
are only used once written)."""

MEMFD_NAME = "mmap_alloc-codeheap"
"""The name of the heaps' memfds, as /proc/self/maps shows them
(``/memfd:mmap_alloc-codeheap (deleted)``)."""


@dataclass(frozen=True)
class CodeHeapStats:
    """The blocks of a CodeHeap, measured now.

    ``used`` counts the bytes of live blocks (sizes rounded up to 16 bytes);
    ``free`` is the rest of the capacity, of which ``largest_free`` bytes
    are one run; ``fragments`` is the number of free runs below the bump
    pointer. ``pinned`` and ``exported`` count the blocks that functions or
    writer buffers hold (they cannot be freed)."""

    capacity: int
    used: int
    free: int
    blocks: int
    largest_free: int
    fragments: int
    pinned: int
    exported: int


class CodeBlock(KernelCodeBlock, ClosesOnExit):
    """A block of a :class:`CodeHeap`: ``size`` bytes of code at ``address``.

    Made by :meth:`CodeHeap.alloc`. ``address`` is in the heap's read/exec
    view; :meth:`write` and :meth:`writer` write through its read/write view,
    and make the change visible to instruction fetch. Functions from
    :meth:`function` pin the block (it cannot be freed, nor its heap closed)
    but not its bytes: the code may be rewritten while they live.

    ``write(data, offset=0)`` stores bytes (one atomic store for 1, 2, 4 or
    8 bytes at a multiple of their size, so that a thread running the code
    sees the old or the new bytes), ``close()`` frees the block (as
    ``heap.free(block)``), ``closed`` says whether it is freed, ``offset``
    is its place in the heap. Freed bytes are zeroed; a new block reads as
    zero.
    """

    __slots__ = ()

    _noun = "block"
    _closed_word = "freed"

    def writer(self) -> BlockWriter:
        """``with block.writer() as view:`` a writable memoryview of the block's
        bytes in the read/write view; leaving the block makes what was written
        visible to instruction fetch, and releases the view.

        While the view (or a buffer made from it) lives, the block cannot be
        freed nor its heap closed (BufferError). A buffer made from the view
        (numpy, ctypes.from_buffer) keeps the block exported until it dies.
        """
        return BlockWriter(self)

    def function(self, prototype: type[F], offset: int = 0) -> F:
        """A ctypes function for the code at ``offset`` of the block.

        ``prototype`` is a ctypes function type, e.g.
        ``ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)``. The
        function pins the block (released exactly once, when the function is
        deallocated): until then the block cannot be freed and its heap cannot
        be closed (BufferError). The block's code may be rewritten meanwhile:
        the function runs whatever was last written. Its ``block`` and
        ``offset`` attributes say where it lives.
        """
        at = code_offset(prototype, offset)
        fn = pinned_function(self._pin(at), prototype, __name__)
        fn.block = self  # type: ignore[attr-defined]
        fn.offset = at  # type: ignore[attr-defined]
        return fn

    def __repr__(self) -> str:
        if self.closed:
            return f"<CodeBlock freed size={self.size}>"
        return f"<CodeBlock address=0x{self.address:x} size={self.size}>"


class BlockWriter(RestoresOnExit[memoryview]):
    """The context manager of :meth:`CodeBlock.writer`."""

    __slots__ = ("_block", "_view")

    _what = "writer"

    def __init__(self, block: CodeBlock) -> None:
        super().__init__()
        self._block = block
        self._view: memoryview | None = None

    def _open(self) -> memoryview:
        self._view = self._block._view()  # exports the block: no free, no heap close
        return self._view

    def _restore(self) -> None:
        # made coherent while the view still holds the block, then released
        view, self._view = self._view, None
        self._block._sync(0, self._block.size)
        if view is not None:
            exporter = view.obj
            view.release()
            if isinstance(exporter, View) and _view_exported(exporter):
                raise BufferError("a buffer made from it is still alive")

    def _refused(self, error: BufferError) -> BufferError:
        return BufferError(
            f"the writer's view cannot be released: {error}; a buffer made from it (a slice, "
            "a numpy array) outlives the block, and what is written through it after the "
            "block is not made visible to instruction fetch: release it inside the block"
        )


class CodeHeap(KernelCodeHeap, ClosesOnExit):
    """Memory for generated code: ``capacity`` bytes of one memfd mapped twice,
    read/write (to write code through) and read/exec (to run it).

    No page is writable and executable at once, in either view, and writing
    code needs no mprotect: functions made from a block stay alive while it
    is rewritten. Blocks come from :meth:`alloc`; :meth:`free`, or a block's
    ``close()``, gives them back; :meth:`close` unmaps the heap.

    With ``near``: every byte of the read/exec view lies less than ``within``
    bytes from ``near`` (default 2 GiB: the reach of x86-64 ``call rel32``),
    or AllocError; no existing mapping is ever replaced.

    Needs executable memfds: ``vm.memfd_noexec = 2`` (Linux 6.3+) or a
    security policy (SELinux) that refuses executable shared memory makes
    this a PermissionError naming the cause. There is no fallback to memory
    that is writable and executable at once.

    After ``fork()`` the child shares the heap's pages with the parent: it may
    run the code, but allocating or writing there is a RuntimeError.
    """

    __slots__ = ()

    _noun = "code heap"

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        *,
        near: int | None = None,
        within: int = DEFAULT_WITHIN,
    ) -> None:
        n = size_argument(capacity, PAGE_SIZE, "capacity")
        size = -(-n // PAGE_SIZE) * PAGE_SIZE
        flags = MFD_CLOEXEC | (MFD_EXEC if memfd_noexec() is not None else 0)

        def open_at(address: int) -> None:
            try:
                self._open(size, flags, MEMFD_NAME, address, CodeBlock)
            except OSError as exc:
                if exc.filename == "mmap rx" and address and exc.errno in PLACEMENT_ERRORS:
                    raise OSError(exc.errno, exc.strerror) from None  # another place may do
                raise _open_error(exc, size) from None

        if near is not None or within != DEFAULT_WITHIN:
            address, reach = check_near(near, within)
            map_near(address, reach, size, PAGE_SIZE, open_at, "a code heap")
        else:
            open_at(0)

    def alloc(self, size: int, align: int = 16) -> CodeBlock:
        """A new block of ``size`` bytes at a multiple of ``align`` (a power of
        two, at most the page size; blocks are 16-byte aligned at least).

        First fit among the freed runs, else above everything allocated so
        far; AllocError when no run is large enough. The block reads as zero.
        """
        n = size_argument(size, 1)
        alignment = power_of_two(align, "align")
        if alignment > PAGE_SIZE:
            raise ValueError(f"align must be at most the page size {PAGE_SIZE}, got {alignment}")
        return cast(CodeBlock, self._alloc(n, alignment))  # a CodeBlock: given to _open

    def stats(self) -> CodeHeapStats:
        """Capacity, bytes used and free, blocks, the largest free run,
        fragments, pinned and exported blocks, measured now."""
        capacity, used, blocks, spans, largest, pinned, exported = self._stats()
        return CodeHeapStats(
            capacity=capacity,
            used=used,
            free=capacity - used,
            blocks=blocks,
            largest_free=largest,
            fragments=spans,
            pinned=pinned,
            exported=exported,
        )

    def __repr__(self) -> str:
        if self.closed:
            return f"<CodeHeap closed capacity={format_size(self.capacity)}>"
        stats = self.stats()
        return (
            f"<CodeHeap address=0x{self.address:x} capacity={format_size(self.capacity)} "
            f"blocks={stats.blocks} used={stats.used}>"
        )


def _open_error(exc: OSError, size: int) -> Exception:
    """What a refusal to make a code heap becomes, naming its cause."""
    step = exc.filename
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    what = f"{step} failed ({name}: {os.strerror(code)})"
    never = "mmap_alloc never falls back to memory that is writable and executable at once"
    if code in (errno.ENOMEM, errno.EAGAIN, errno.ENOSPC):
        return AllocError(f"cannot make a code heap of {size} bytes: {what}", errno=code, size=size)
    if step == "memfd_create" and code in (errno.EACCES, errno.EPERM):
        noexec = memfd_noexec()
        if noexec == 2:
            return PermissionError(
                code,
                f"cannot make a code heap: {what}: vm.memfd_noexec = 2 in this pid namespace "
                "refuses executable memfds (Linux 6.3+). Set it to 0 or 1 (as root: `sysctl "
                f"vm.memfd_noexec=1`, in this pid namespace); {never}",
            )
        return PermissionError(
            code,
            f"cannot make a code heap: {what}: the system refuses to create an executable "
            f"memfd{_security_hint()}; {never}",
        )
    if step == "mmap rx" and code in (errno.EACCES, errno.EPERM):
        return PermissionError(
            code,
            f"cannot make a code heap: {what}: the system refuses to map a memfd "
            f"read/exec{_security_hint()}; {never}",
        )
    return OSError(code, f"cannot make a code heap: {what}")


def _security_hint() -> str:
    """What may refuse executable shared memory here, for messages."""
    mode = selinux_mode()
    if mode == "enforcing":
        return (
            " (SELinux is enforcing: its execmem / execute permissions on tmpfs files may "
            "deny it; see the audit log, `ausearch -m avc`)"
        )
    noexec = memfd_noexec()
    if noexec is not None and noexec > 0:
        return f" (vm.memfd_noexec = {noexec}; a security module or seccomp filter may refuse it)"
    return " (a security module such as SELinux, or a seccomp filter, may refuse it)"
