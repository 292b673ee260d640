"""Finding and compiling the C kernel library: every csrc/*.c compiled and linked into one shared library.

Where a usable library comes from, in order: the optional extension setup.py builds (``offload.kernels._k2kern``),
a stale in-place build next to this file, or the user cache (``$XDG_CACHE_HOME/k2local`` or ``~/.cache/k2local``),
compiled there on first use with ``$CC`` (else gcc / cc), keyed by the source tag.  No -march=native: one binary
carries the generic, AVX2 and AVX-512 paths and picks one at run time.

Standard library only: setup.py loads this file by its path (before the package can be imported) so that the
extension and the on-demand build use the same source list, flags and source tag.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().with_name("csrc")
# compile flags of both builds (setup.py adds them to the extension's; the on-demand build adds -fPIC -shared)
CFLAGS = ["-O3", "-std=gnu11", "-pthread"]
LDFLAGS = ["-pthread", "-lm"]


def sources(root: Path = CSRC) -> list[Path]:
    """The translation units, in a fixed order."""
    return sorted(root.glob("*.c"))


def source_files(root: Path = CSRC) -> list[Path]:
    """Everything the library is built from (sources and headers)."""
    return sorted([*root.glob("*.c"), *root.glob("*.h")])


def source_tag(root: Path = CSRC) -> str | None:
    """Short hash of every csrc file, names included (None when the sources are not shipped); builds embed it
    (K2K_SRC_TAG) and a library whose tag differs is not used."""
    files = source_files(root)
    if not files:
        return None
    h = hashlib.sha256()
    try:
        for f in files:
            data = f.read_bytes()
            h.update(f"{f.name}\0{len(data)}\0".encode())
            h.update(data)
    except OSError:
        return None
    return h.hexdigest()[:16]


def tag_define(tag: str | None) -> str:
    return f'-DK2K_SRC_TAG="{tag}"'


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "k2local"


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def compile_command(cc: str, out: str, flags: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The one compile-and-link line of on-demand builds (setup.py uses the same flags); `flags` go before the
    sources (the tests' special builds: -O1, -D...)."""
    return [cc, *CFLAGS, "-fPIC", "-shared", tag_define(source_tag()), *flags, "-o", out,
            *(str(s) for s in sources()), *LDFLAGS]


def build_into_cache() -> tuple[Path | None, str | None]:
    """Compile the library into the user cache (keyed by source tag) unless it is there: (path, None), or
    (None, why not) when there are no sources, no compiler or the compile fails."""
    tag = source_tag()
    if tag is None:
        return None, None
    out = cache_dir() / f"k2kern-{tag}.so"
    if out.exists():
        return out, None
    cc = find_compiler()
    if not cc:
        return None, None
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = compile_command(cc, tmp)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        return None, f"compile failed: {' '.join(cmd)}\n{r.stderr[-2000:]}"
    os.replace(tmp, out)  # atomic: concurrent builders race harmlessly
    return out, None


def candidates() -> list[Path]:
    """Already built libraries to try before building: the installed extension, then in-place builds."""
    import importlib.util  # noqa: PLC0415 (setup.py loads this module without the package)

    paths = []
    try:
        spec = importlib.util.find_spec("offload.kernels._k2kern")
        if spec is not None and spec.origin:
            paths.append(Path(spec.origin))
    except (ImportError, ValueError):
        pass
    paths += sorted(Path(__file__).parent.glob("_k2kern*.so"))
    return paths
