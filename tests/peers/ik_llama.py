"""ik_llama.cpp (github ikawrakow/ik_llama.cpp) as a speed peer: its `llama-bench`, run as a subprocess.

This project does not build it (no script here builds a fetched repository): point the benches at a CPU build with
``--ik-llama DIR`` or ``K2LOCAL_IK_LLAMA=DIR`` (the build directory, its ``bin/``, or the ``llama-bench`` binary).
FACTS.md 9.6 gives the cmake line. Every bench prints :data:`NOT_FOUND` when there is none.

Each configuration in :data:`CONFIGS` is one ``llama-bench`` run with ``-o json``; the tests it asks for are
``ppN`` (prefill of N tokens from an empty cache) and ``tgM@ppN`` (``-gp N,M``: M tokens decoded after an N-token
prompt, the prompt's time not counted), so the decode speed is at the same depth as k2local's.
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV = "K2LOCAL_IK_LLAMA"
NOT_FOUND = f"ik_llama.cpp: not found (set {ENV} to a CPU build; FACTS.md 9.6 says how)"


@dataclass(frozen=True)
class IkConfig:
    """One way of running ik_llama.cpp: a label and the llama-bench flags it adds."""

    label: str
    flags: tuple[str, ...]


# run-time repack into its row-interleaved layouts, and everything at its defaults (fused MoE and -mla 3 are on in
# both; flash attention is llama-bench's default there)
CONFIGS = (IkConfig("-rtr 1", ("-rtr", "1")), IkConfig("defaults", ()))


@dataclass(frozen=True)
class IkResult:
    """One llama-bench test: `prompt` tokens of prefill, then `gen` decoded tokens (gen 0: a prefill test)."""

    config: str
    prompt: int
    gen: int
    tok_s: float
    stddev: float


class IkError(RuntimeError):
    """llama-bench ran but failed (the message holds the tail of its stderr)."""


def find(path: str | Path | None = None) -> Path | None:
    """The llama-bench binary of `path` (or $K2LOCAL_IK_LLAMA): a build dir, its bin/, or the binary; None if absent."""
    where = path if path is not None else os.environ.get(ENV)
    if not where:
        return None
    p = Path(where).expanduser()
    for cand in (p, p / "llama-bench", p / "bin" / "llama-bench"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(s.strip() for s in text.strip().splitlines()[-lines:])


def bench(binary: Path, gguf: str | Path, threads: int, prompts: list[int], gen: int, config: IkConfig,
          reps: int = 3, timeout: float = 3600, extra: tuple[str, ...] = (),
          env: dict[str, str] | None = None) -> list[IkResult]:
    """Run llama-bench once: prefill of each prompt length, and `gen` tokens decoded after each (`-gp`);
    env: its environment (default: this process's)."""
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json", "-n", "0",
           "-p", ",".join(str(p) for p in prompts), *config.flags, *extra]
    for p in prompts:  # llama-bench sizes each test's context to its prompt + gen
        if gen:
            cmd += ["-gp", f"{p},{gen}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise IkError(f"{binary}: llama-bench took over {timeout:.0f} s") from None
    if out.returncode != 0:
        raise IkError(f"{binary}: llama-bench exited {out.returncode}: {_tail(out.stderr)}")
    return parse(out.stdout, config.label)


def parse(text: str, label: str) -> list[IkResult]:
    """IkResults from llama-bench's `-o json` output."""
    start = text.find("[")
    if start < 0:
        raise IkError(f"llama-bench printed no JSON: {_tail(text)}")
    rows = json.loads(text[start:])
    if rows and rows[0].get("build_commit"):
        _BUILDS[label] = f"build {rows[0]['build_commit']} ({rows[0].get('build_number', '?')})"
    return [IkResult(label, int(r["n_prompt"]), int(r["n_gen"]), float(r["avg_ts"]), float(r.get("stddev_ts", 0.0)))
            for r in rows]


_BUILDS: dict[str, str] = {}  # config label -> 'build <commit> (<number>)' from the last llama-bench JSON


def version() -> str:
    """'build <commit> (<number>)' as the last llama-bench run reported it (it has no --version), or ''."""
    return next(iter(_BUILDS.values()), "")


def describe(binary: Path | None, threads: int) -> str:
    """A line naming the build and flags compared against."""
    if binary is None:
        return NOT_FOUND
    flags = "; ".join(f"'{c.label}' ({' '.join(c.flags) or 'no flags'})" for c in CONFIGS)
    return f"ik_llama.cpp {version() or '(build not reported yet)'} at {binary}, -t {threads}, CPU only: {flags}"
