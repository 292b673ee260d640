"""Build hook for k2local's optional compiled CPU kernels (everything else lives in pyproject.toml).

offload/kernels/csrc/*.c is a plain C library (one shared library, loaded with ctypes).  It is declared as an
optional extension: if it fails to compile, `pip install` still succeeds and the kernels are compiled on first use
into ~/.cache/k2local (or fall back to torch).  No -march=native: the binary carries generic, AVX2 and AVX-512 code
paths chosen at run time.  Sources, flags and the source tag come from offload/kernels/_build.py, which the
on-demand build uses too (loaded here by path: the package itself cannot be imported at build time).
"""
import importlib.util
from pathlib import Path

from setuptools import Extension, setup

_ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_k2kern_build", _ROOT / "offload" / "kernels" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)

setup(
    ext_modules=[
        Extension(
            "offload.kernels._k2kern",
            sources=[str(p.relative_to(_ROOT)) for p in _build.sources()],
            depends=[str(p.relative_to(_ROOT)) for p in _build.source_files()],
            define_macros=[("K2K_SRC_TAG", f'"{_build.source_tag()}"')],
            extra_compile_args=_build.CFLAGS,
            extra_link_args=_build.LDFLAGS,
            optional=True,
        )
    ]
)
