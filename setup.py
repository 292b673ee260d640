"""Build hook for k2local's optional compiled CPU kernels (everything else lives in pyproject.toml).

offload/kernels/k2kern.c is a plain C library loaded with ctypes.  It is declared as an
optional extension: if it fails to compile, `pip install` still succeeds and the kernels are
compiled on first use into ~/.cache/k2local (or fall back to torch).  No -march=native: the
binary carries generic, AVX2 and AVX-512 code paths chosen at run time.
"""
import hashlib
from pathlib import Path

from setuptools import Extension, setup

_SRC = "offload/kernels/k2kern.c"
_TAG = hashlib.sha256((Path(__file__).parent / _SRC).read_bytes()).hexdigest()[:16]

setup(
    ext_modules=[
        Extension(
            "offload.kernels._k2kern",
            sources=[_SRC],
            define_macros=[("K2K_SRC_TAG", f'"{_TAG}"')],
            extra_compile_args=["-O3", "-std=gnu11", "-pthread"],
            extra_link_args=["-pthread", "-lm"],
            optional=True,
        )
    ]
)
