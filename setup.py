"""Builds the C extensions (the safety kernel and the benchmark's C loops);
everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import Extension, setup

KERNEL = sorted(str(path) for path in Path("src/mmap_alloc/_mman").glob("*.c"))

setup(
    ext_modules=[
        Extension(
            "mmap_alloc._mman",
            sources=KERNEL,
            depends=["src/mmap_alloc/_mman/mman.h"],
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
