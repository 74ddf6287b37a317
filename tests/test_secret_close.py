"""SecretBuffer: closing (the bytes wiped before the pages are unmapped), and
many create/close cycles giving everything back."""

from __future__ import annotations

import gc
import os
import random
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from mmap_alloc import SecretBuffer, _mman, secret
from mmap_alloc._linux import PAGE_SIZE as P
from mmap_alloc._linux import mapping_count
from secret_support import HAS_MEMFD_SECRET, Make
from support import status_kib

# ---------------------------------------------------------------- close


def test_close_is_idempotent_and_the_with_statement_closes(make: Make) -> None:
    mapped = _mman.mapped_bytes()
    with make(32) as buf:
        assert _mman.mapped_bytes() > mapped
    assert buf.closed
    assert _mman.mapped_bytes() == mapped
    buf.close()
    buf.close()
    assert _mman.mapped_bytes() == mapped


def test_a_buffer_closes_at_any_access(make: Make) -> None:
    for change in ("noaccess", "readonly", "readwrite"):
        buf = make(32)
        getattr(buf, change)()
        buf.close()
        assert buf.closed


def test_use_after_close_is_a_value_error(make: Make) -> None:
    buf = make(32)
    buf.close()
    for use in (
        lambda: buf.write(b"x"),
        lambda: buf.compare(b"x"),
        buf.noaccess,
        buf.readonly,
        buf.readwrite,
        lambda: buf.open().__enter__(),
        lambda: memoryview(buf),
        lambda: bytes(buf),
        lambda: buf.address,
        lambda: buf.access,
    ):
        with pytest.raises(ValueError, match="secret buffer is closed"):
            use()
    assert (len(buf), buf.size, buf.locked, buf.closed) == (32, 32, False, True)
    assert "closed" in repr(buf)


def test_a_collected_buffer_is_unmapped(make: Make) -> None:
    mapped = _mman.mapped_bytes()
    buf = make(5000)
    ref = weakref.ref(buf)
    buf.noaccess()
    del buf
    assert ref() is None
    assert _mman.mapped_bytes() == mapped


def test_a_view_keeps_its_buffer_alive(make: Make) -> None:
    buf = make(10)
    ref = weakref.ref(buf)
    opened = buf.open()
    view = opened.__enter__()[2:]  # made from the block's view: outlives the block
    del buf, opened  # the block ends with its manager; the slice keeps its access
    gc.collect()
    assert ref() is not None
    assert bytes(view) == bytes(8)
    view.release()  # the exporter goes with the last memoryview of it
    assert ref() is None


WIPE_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* munmap, after looking for 256 bytes of MARK in what is about to go */
int munmap(void *addr, size_t len)
{
    static int (*real)(void *, size_t);
    static int mem = -1;
    static unsigned char page[4096];
    const char *mark = getenv("WIPE_SHIM_MARK");

    if (real == NULL)
        real = (int (*)(void *, size_t))dlsym(RTLD_NEXT, "munmap");
    if (mark != NULL) {
        unsigned char m = (unsigned char)strtol(mark, NULL, 16);
        if (mem < 0)
            mem = open("/proc/self/mem", O_RDONLY | O_CLOEXEC);
        for (size_t off = 0; off < len; off += sizeof page) {
            size_t run = 0;
            /* /proc/self/mem reads PROT_NONE pages too; guard pages fail */
            if (pread(mem, page, sizeof page, (off_t)((uintptr_t)addr + off)) != sizeof page)
                continue;
            for (size_t i = 0; i < sizeof page; i++) {
                run = page[i] == m ? run + 1 : 0;
                if (run == 256) {
                    dprintf(2, "WIPE_SHIM found %p\n", (void *)((char *)addr + off));
                    break;
                }
            }
        }
    }
    return real(addr, len);
}
"""

WIPE_CHILD = """
import ctypes, gc
from mmap_alloc import MapAlloc, SecretBuffer
from mmap_alloc._linux import PAGE_SIZE

def fill(address, size):
    ctypes.memset(address, 0xA5, size)  # no Python object ever holds the pattern

mode = {mode!r}
if mode == "region":  # the control: nothing wipes a region
    region = MapAlloc().alloc(2 * PAGE_SIZE)
    fill(region.address, region.size)
    region.close()
else:
    for backend, guard in (("anonymous", True), ("anonymous", False)):
        if not guard:
            from mmap_alloc import features
            features.madv_guard_install = lambda: features.Feature("g", False, "")
        for size in (300, 5000):
            buf = SecretBuffer(size, backend=backend)
            fill(buf.address, size)
            if mode == "close":
                buf.noaccess()
                buf.close()
            else:
                del buf
                gc.collect()
print("done")
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the munmap shim")
@pytest.mark.parametrize("mode", ["close", "collect"])
def test_the_secret_bytes_are_wiped_before_the_pages_are_unmapped(
    mode: str, tmp_path: Path
) -> None:
    """A munmap shim (LD_PRELOAD) reads every range before it is unmapped; the
    secret's pattern must be gone, though a region's stays (the control)."""
    shim = tmp_path / "wipe_shim.so"
    source = tmp_path / "wipe_shim.c"
    source.write_text(WIPE_SHIM)
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(source), "-ldl"], check=True
    )
    env = dict(os.environ, LD_PRELOAD=str(shim), WIPE_SHIM_MARK="a5")

    def run(which: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", WIPE_CHILD.format(mode=which)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0 and "done" in done.stdout, done.stderr
        return done.stderr

    assert "WIPE_SHIM found" in run("region")
    assert "WIPE_SHIM found" not in run(mode)


# ---------------------------------------------------------------- many cycles


def cycles(count: int, seed: int) -> None:
    rng = random.Random(seed)
    gc.collect()
    maps_before, locked_before = mapping_count(), status_kib("VmLck")
    mapped = _mman.mapped_bytes()
    backends = ["anonymous", "auto"] if HAS_MEMFD_SECRET else ["anonymous"]
    live: list[SecretBuffer] = []
    for i in range(count):
        size = rng.choice((1, rng.randrange(1, 200), rng.randrange(1, 5 * P), P, P - 16))
        buf = SecretBuffer(size, backend=rng.choice(backends), lock=rng.choice(secret.LOCKS))
        buf.write(b"\x77" * min(size, 64))
        live.append(buf)
        if len(live) > 8 or i == count - 1:
            for old in live:
                if rng.random() < 0.3:
                    old.noaccess()
                old.close()
            live.clear()
    assert _mman.mapped_bytes() == mapped
    assert status_kib("VmLck") == locked_before
    assert mapping_count() <= maps_before + 2  # the interpreter may map an arena meanwhile


def test_500_create_close_cycles_give_back_every_mapping_and_locked_byte() -> None:
    cycles(500, seed=1)


@pytest.mark.stress
def test_10000_create_close_cycles_give_back_every_mapping_and_locked_byte() -> None:
    cycles(10_000, seed=2)
