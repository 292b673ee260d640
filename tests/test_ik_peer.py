"""tests/peers/ik_llama.py: finding a build, the llama-bench command line and its JSON output (a fake binary)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.peers import ik_llama

ROWS = [{"n_prompt": 64, "n_gen": 0, "avg_ts": 183.5, "stddev_ts": 2.0, "test": "pp64"},
        {"n_prompt": 64, "n_gen": 8, "avg_ts": 25.4, "stddev_ts": 0.1, "test": "tg8@pp64"}]


def _fake(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "build" / "bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "llama-bench"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe


def test_find_accepts_build_dir_bin_dir_binary_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = _fake(tmp_path, "exit 0\n")
    for p in (tmp_path / "build", exe.parent, exe):
        assert ik_llama.find(p) == exe
    monkeypatch.setenv(ik_llama.ENV, str(tmp_path / "build"))
    assert ik_llama.find() == exe
    monkeypatch.delenv(ik_llama.ENV)
    assert ik_llama.find() is None and ik_llama.find(tmp_path / "nothing") is None
    assert ik_llama.describe(None, 2) == ik_llama.NOT_FOUND and "FACTS.md 9.6" in ik_llama.NOT_FOUND


def test_bench_passes_flags_and_parses_json(tmp_path: Path) -> None:
    args = tmp_path / "args"
    exe = _fake(tmp_path, f'echo "$@" > {args}\necho "warming up"\ncat <<EOF\n{json.dumps(ROWS)}\nEOF\n')
    rows = ik_llama.bench(exe, "m.gguf", 2, [64], 8, ik_llama.CONFIGS[0], reps=1)
    assert [(r.prompt, r.gen, r.tok_s) for r in rows] == [(64, 0, 183.5), (64, 8, 25.4)]
    assert rows[0].config == "-rtr 1"
    cmd = args.read_text().split()
    assert cmd[cmd.index("-t") + 1] == "2" and cmd[cmd.index("-gp") + 1] == "64,8" and "-rtr" in cmd


def test_bench_failure_is_one_clear_error(tmp_path: Path) -> None:
    exe = _fake(tmp_path, 'echo "llama_model_load: error loading model: missing tensor" >&2\nexit 1\n')
    with pytest.raises(ik_llama.IkError, match="missing tensor"):
        ik_llama.bench(exe, "m.gguf", 2, [64], 0, ik_llama.CONFIGS[1])
