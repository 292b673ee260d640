"""llama.cpp (llama-cpp-python) as a peer: the one way the tests and the bench/ scripts load it.

Two problems this module solves for every caller:

- On some CPUs llama.cpp aborts the whole process (``GGML_ASSERT(*cur_backend_id != -1)`` in
  ``ggml_backend_sched_split_graph``): 0.3.36 built natively on an AMX CPU (Sapphire Rapids and later) dies
  creating a context for a deepseek2 GGUF with Q8_0 tensors while its *extra buffer types* (repacked weights,
  the CLI's ``--no-repack`` turns them off) are on. :func:`config` finds out once per machine, by loading such a
  GGUF in a child process with them on, and every loader here applies the answer. ``describe()`` says which
  configuration a benchmark compared against.
- A peer that crashes anyway must not take the caller down: :func:`isolated` runs one call in a child process
  and turns a death by signal into :class:`PeerCrashed` (signal name and the tail of llama.cpp's stderr), so a
  test fails with its reason instead of killing pytest.

In-process loading (:func:`load`, :func:`model_params`) is for benchmarks, which time llama.cpp in turns with
k2local; tests go through :func:`isolated` (``logits``, ``tokenize``, ``quantize``).

Environment: ``K2LOCAL_LLAMA_EXTRA_BUFTS=0|1`` skips the probe and forces the extra buffer types off / on.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
_ENV = "K2LOCAL_LLAMA_EXTRA_BUFTS"
_PROBE_VERSION = 1


class PeerUnavailable(RuntimeError):
    """llama-cpp-python is not installed or its library does not load."""


class PeerError(RuntimeError):
    """The peer raised an exception (it is still a clean failure: the process exited)."""


class PeerCrashed(RuntimeError):
    """The peer's process died (abort, segfault, ...) instead of returning."""


@dataclass(frozen=True)
class LlamaConfig:
    """How llama.cpp is run on this machine."""

    version: str
    extra_bufts: bool
    reason: str  # why extra_bufts has its value

    def describe(self) -> str:
        state = "on" if self.extra_bufts else "OFF"
        return f"llama.cpp {self.version} (llama-cpp-python, CPU), extra buffer types (weight repacking) {state}: " \
               f"{self.reason}"


# ------------------------------------------------------------------------------------------- child processes
def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def isolated(fn: str, *args: Any, timeout: float = 600, env: dict[str, str | None] | None = None,
             **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a fresh Python process and return its result.

    ``env`` changes the child's environment (a None value removes the variable).

    ``fn`` is a function of this module or ``"package.module:function"``; arguments and result are pickled.
    Raises PeerCrashed if the child dies by a signal (or exits without answering), PeerError if it raised.
    """
    with tempfile.TemporaryDirectory(prefix="k2peer-") as td:
        req, resp = Path(td) / "req.pkl", Path(td) / "resp.pkl"
        req.write_bytes(pickle.dumps((fn, args, kwargs)))
        child_env = _child_env()
        for k, v in (env or {}).items():
            if v is None:
                child_env.pop(k, None)
            else:
                child_env[k] = v
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(req), str(resp)],
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=child_env)
        except subprocess.TimeoutExpired as e:
            raise PeerCrashed(f"llama.cpp peer call {fn} did not finish in {timeout:.0f} s") from e
        tail = _tail(p.stderr)
        if p.returncode < 0:
            name = signal.Signals(-p.returncode).name
            raise PeerCrashed(f"llama.cpp peer call {fn} died with {name}" + (f": {tail}" if tail else ""))
        if not resp.exists():
            raise PeerCrashed(f"llama.cpp peer call {fn} exited with code {p.returncode} and no answer"
                              + (f": {tail}" if tail else ""))
        ok, value = pickle.loads(resp.read_bytes())
        if not ok:
            raise PeerError(f"llama.cpp peer call {fn} failed: {value}")
        return value


def _tail(stderr: bytes, lines: int = 3) -> str:
    """The last few meaningful stderr lines (an assert message, typically)."""
    text = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    asserts = [ln for ln in text if "GGML_ASSERT" in ln or "error" in ln.lower()]
    return " | ".join((asserts or text)[-lines:])


def _resolve(fn: str) -> Callable[..., Any]:
    if ":" in fn:
        mod, name = fn.split(":", 1)
        return getattr(importlib.import_module(mod), name)
    return globals()[fn]


def _child_main(req: str, resp: str) -> None:
    fn, args, kwargs = pickle.loads(Path(req).read_bytes())
    try:
        out = (True, _resolve(fn)(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises PeerError
        out = (False, f"{type(e).__name__}: {e}")
    Path(resp).write_bytes(pickle.dumps(out))


# ------------------------------------------------------------------------------------------------- the probe
def _module():
    try:
        import llama_cpp  # noqa: PLC0415 - optional peer, imported only when used
    except Exception as e:  # not installed, or its shared library does not load
        raise PeerUnavailable(f"llama-cpp-python unavailable ({type(e).__name__}: {e})") from e
    return llama_cpp


def available() -> bool:
    try:
        _module()
        return True
    except PeerUnavailable:
        return False


def _machine_key() -> str:
    """Changes when the CPU, the llama.cpp build or this probe changes."""
    import importlib.metadata as md  # noqa: PLC0415

    h = hashlib.sha256(f"v{_PROBE_VERSION}".encode())
    try:
        h.update(md.version("llama_cpp_python").encode())
        spec = importlib.util.find_spec("llama_cpp")
        lib_dir = Path(spec.origin).parent / "lib" if spec and spec.origin else None
        for f in sorted(lib_dir.glob("*")) if lib_dir and lib_dir.is_dir() else []:
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    except Exception:  # noqa: BLE001 - not installed: the key only needs to be stable
        h.update(b"no-llama")
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        h.update(" ".join(sorted(flags.split(":", 1)[1].split())).encode())
    except (OSError, StopIteration):
        import platform  # noqa: PLC0415

        h.update(platform.processor().encode())
    return h.hexdigest()[:16]


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "k2local" / "llama_peer.json"


def _version() -> str:
    import importlib.metadata as md  # noqa: PLC0415

    try:
        return md.version("llama_cpp_python")
    except md.PackageNotFoundError:
        return "?"


def probe_gguf(work: Path) -> Path:
    """A tiny deepseek2 GGUF with Q8_0 tensors (the kind that makes llama.cpp abort on AMX CPUs)."""
    from k2local.convert.to_gguf import convert  # noqa: PLC0415 - k2local is heavy: only the probe needs it
    from k2local.tiny import make_tiny  # noqa: PLC0415

    return convert(make_tiny(work / "tiny", "kimi_k2"), work / "probe-q8.gguf", "q8").paths[0]


def _probe_load(path: str, extra_bufts: bool) -> int:
    """Child side of the probe: create a context and decode two tokens."""
    llm = load(path, extra_bufts=extra_bufts, n_ctx=32, n_threads=2, verbose=False)
    try:
        llm.eval([3, 5])
        return llm.n_vocab()
    finally:
        llm.close()


def probe(path: Path, child: str = "_probe_load") -> tuple[bool, str]:
    """(extra buffer types usable, reason), by loading ``path`` in a child with them on (then off)."""
    try:
        isolated(child, str(path), True, timeout=300)
        return True, "a deepseek2 Q8_0 probe model ran with them in a child process"
    except PeerCrashed as e:
        crash = str(e).split(": ", 1)[-1]
    try:
        isolated(child, str(path), False, timeout=300)
    except PeerCrashed as e:
        return False, f"llama.cpp crashes on this CPU with and without them ({crash}; without: {e})"
    return False, f"with them llama.cpp aborts on this CPU ({crash}); without them it runs"


def config(refresh: bool = False) -> LlamaConfig:
    """This machine's llama.cpp configuration: from $K2LOCAL_LLAMA_EXTRA_BUFTS, the cache, or a new probe."""
    version = _version()
    forced = os.environ.get(_ENV)
    if forced in ("0", "1"):
        return LlamaConfig(version, forced == "1", f"set by {_ENV}={forced}")
    _module()
    key, cache = _machine_key(), _cache_file()
    if not refresh:
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return LlamaConfig(**saved["config"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    with tempfile.TemporaryDirectory(prefix="k2peer-probe-") as td:
        ok, reason = probe(probe_gguf(Path(td)))
    cfg = LlamaConfig(version, ok, reason + f" (probe cached in {cache})")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "config": asdict(cfg)}))
        os.replace(tmp, cache)
    except OSError:
        pass  # an unwritable cache only costs a probe next time
    return cfg


def describe() -> str:
    """One line for a benchmark's output: which llama.cpp configuration it compares against."""
    try:
        return config().describe()
    except PeerUnavailable as e:
        return str(e)


# -------------------------------------------------------------------------------------- loading (in-process)
def model_params(extra_bufts: bool | None = None):
    """llama_model_default_params() with this machine's extra-buffer-types setting (for the raw C API)."""
    L = _module()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = config().extra_bufts if extra_bufts is None else extra_bufts
    return mp


def load(path: str | Path, extra_bufts: bool | None = None, **kwargs: Any):
    """llama_cpp.Llama(path, **kwargs) with this machine's extra-buffer-types setting."""
    L = _module()
    from llama_cpp import llama as llama_mod  # noqa: PLC0415

    want = config().extra_bufts if extra_bufts is None else extra_bufts
    orig = llama_mod.llama_cpp.llama_model_default_params

    def params():
        mp = orig()
        mp.use_extra_bufts = want
        return mp

    llama_mod.llama_cpp.llama_model_default_params = params  # Llama() builds its params from this call
    try:
        return L.Llama(str(path), **kwargs)
    finally:
        llama_mod.llama_cpp.llama_model_default_params = orig


# ------------------------------------------------------------------- calls the tests run through isolated()
def logits(path: str, ids: list[int], **kwargs: Any) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (float32 [len(ids), n_vocab])."""
    kw = dict(logits_all=True, n_ctx=64, n_threads=2, verbose=False, type_k=0, type_v=0) | kwargs
    llm = load(path, **kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@dataclass(frozen=True)
class Tokenized:
    """What llama.cpp's vocabulary does with one string."""

    special: list[int]
    plain: list[int]
    with_bos: list[int]
    detokenized: bytes | None  # of `special`'s ids, only where asked


def tokenize(path: str, texts: list[str], detokenize_ids: list[list[int] | None]) -> tuple[list[Tokenized], int, int]:
    """(per text: its tokenizations, eos id, bos id) from a vocab-only load."""
    llm = load(path, vocab_only=True, verbose=False)
    try:
        out = [Tokenized(llm.tokenize(s.encode(), add_bos=False, special=True),
                         llm.tokenize(s.encode(), add_bos=False, special=False),
                         llm.tokenize(s.encode(), add_bos=True, special=True),
                         None if d is None else llm.detokenize(d))
               for s, d in zip(texts, detokenize_ids)]
        return out, llm.token_eos(), llm.token_bos()
    finally:
        llm.close()


def quantize(src: str, dst: str, ftype: int, pure: bool = False, imatrix: dict[str, np.ndarray] | None = None,
             nthread: int = 2) -> None:
    """llama_model_quantize(src -> dst) with an optional importance matrix {tensor name: per-column weights}."""
    L = _module()
    params = L.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, pure, nthread
    keep: list[Any] = []
    if imatrix:  # llama_model_imatrix_data[], NULL-name terminated; buffers kept alive in `keep`
        entries = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
        for e, (name, data) in zip(entries, imatrix.items()):
            arr = np.ascontiguousarray(np.asarray(data).reshape(-1), dtype=np.float32)
            nb = ctypes.create_string_buffer(name.encode())
            keep += [arr, nb]
            e.name = ctypes.cast(nb, ctypes.c_char_p)
            e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            e.size = arr.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(L.llama_model_imatrix_data))
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")


def ggml_quantize_chunk():
    """ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix) -> bytes written, from llama-cpp-python's
    libggml-base (quantization only, no backend: safe in-process on every CPU)."""
    L = _module()
    lib = ctypes.CDLL(str(next((Path(L.__file__).parent / "lib").glob("libggml-base.*"))))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


def silence_logs() -> None:
    """Route llama.cpp's log output to nowhere (for benchmarks that print their own tables)."""
    global _LOG_CB
    if _LOG_CB is None:
        L = _module()
        _LOG_CB = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


_LOG_CB = None


# ------------------------------------------------------------------------------- test support (child side)
def _abort_for_test() -> None:
    """Die the way llama.cpp's GGML_ASSERT does (tests check that isolated() contains it)."""
    sys.stderr.write("ggml.c:1: GGML_ASSERT(this is a test) failed\n")
    sys.stderr.flush()
    os.abort()


if __name__ == "__main__":
    # run as a script: import this module under its package name, so results pickle as tests.peers.llama_cpp.*;
    # the script's own folder leaves sys.path, or `import llama_cpp` would find this file
    sys.path[0] = str(ROOT)
    importlib.import_module("tests.peers.llama_cpp")._child_main(sys.argv[1], sys.argv[2])
