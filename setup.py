"""Builds the C extensions (the safety kernel and the benchmark's C loops);
everything else is in pyproject.toml.

One source tree, two ABIs: on an interpreter with the GIL the extensions use
the limited API of 3.11 and the wheel is tagged cp311-abi3 (one wheel for
every later CPython); on a free-threaded one (``Py_GIL_DISABLED``, 3.13t and
later), where ``Python.h`` refuses the limited API of those versions, they are
built for that interpreter alone. The C files do not define Py_LIMITED_API
themselves: this file decides.
"""

import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

_MMAN = Path("src/mmap_alloc/_mman")
# The platform layer: os_<platform>*.c implement platform.h; one platform's
# files are built, with every file of the kernel above them.
PLATFORM = {"linux": "os_linux"}.get(sys.platform)
if PLATFORM is None:
    raise SystemExit(f"mmap_alloc has no platform layer for {sys.platform!r} yet")
KERNEL = sorted(
    str(path)
    for path in _MMAN.glob("*.c")
    if not path.name.startswith("os_") or path.name.startswith(PLATFORM)
)
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
LIMITED_API = [] if FREE_THREADED else [("Py_LIMITED_API", "0x030B0000")]

setup(
    ext_modules=[
        Extension(
            "mmap_alloc._mman",
            sources=KERNEL,
            depends=sorted(str(path) for path in _MMAN.glob("*.h")),
            define_macros=[*LIMITED_API, ("_GNU_SOURCE", "1")],
            py_limited_api=not FREE_THREADED,
            extra_compile_args=[
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        ),
        Extension(
            "mmap_alloc.bench._limits",
            sources=["src/mmap_alloc/bench/_limits.c", "src/mmap_alloc/_mman/os_linux.c"],
            define_macros=LIMITED_API,
            py_limited_api=not FREE_THREADED,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ],
    options={} if FREE_THREADED else {"bdist_wheel": {"py_limited_api": "cp311"}},
)
