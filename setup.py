"""Builds the C extensions (the safety kernel and the benchmark's C loops);
everything else is in pyproject.toml."""

import sys
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

setup(
    ext_modules=[
        Extension(
            "mmap_alloc._mman",
            sources=KERNEL,
            depends=sorted(str(path) for path in _MMAN.glob("*.h")),
            define_macros=[("Py_LIMITED_API", "0x030B0000"), ("_GNU_SOURCE", "1")],
            py_limited_api=True,
            extra_compile_args=[
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
            ],
        ),
        Extension(
            "mmap_alloc.bench._limits",
            sources=["src/mmap_alloc/bench/_limits.c"],
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            py_limited_api=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        ),
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
