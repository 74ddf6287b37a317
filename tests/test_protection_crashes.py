"""Protection of page ranges, W^X code, functions that pin their region, reservations.

Crashes: what touching a page without the access does to a process."""

from __future__ import annotations

import signal
import textwrap

import pytest

from mmap_alloc import Region
from protection_support import machine_code, run_child

# ---------------------------------------------------------------- crashes


CRASH_SETUP = """
    import ctypes
    from mmap_alloc import MapAlloc, Perm
    alloc = MapAlloc()
    page = alloc.page_size
"""


@pytest.mark.parametrize(
    "crash",
    [
        pytest.param(
            """
            region = alloc.alloc(page)
            region.make_exec()
            ctypes.memset(region.address, 0xC3, 1)   # write to r-x
            """,
            id="write-to-rx",
        ),
        pytest.param(
            """
            region = alloc.alloc(page)
            region[:CODE_LEN] = CODE
            ctypes.CFUNCTYPE(None)(region.address)()   # run code in rw-
            """,
            id="execute-rw",
        ),
        pytest.param(
            """
            region = alloc.reserve(1 << 30)
            region.protect(Perm.READ | Perm.WRITE, 0, page)
            ctypes.memset(region.address, 1, page)       # fine: committed
            ctypes.string_at(region.address + page, 1)   # the next page is PROT_NONE
            """,
            id="touch-reservation",
        ),
    ],
)
def test_fault_kills_only_the_child_with_sigsegv(region: Region, crash: str) -> None:
    code = machine_code("ret")
    setup = textwrap.dedent(CRASH_SETUP) + f"CODE = {code!r}\nCODE_LEN = {len(code)}\n"
    result = run_child(setup + textwrap.dedent(crash) + "print('survived')\n")
    assert result.returncode == -signal.SIGSEGV, result.stderr
    assert "survived" not in result.stdout
    region[0] = 1  # the parent goes on
    assert region[0] == 1
