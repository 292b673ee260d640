"""The llama.cpp peer helper: a crashing peer is contained, and the extra-buffer-types probe decides right."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.peers import llama_cpp as llama


def _fake_amx_load(path: str, extra_bufts: bool) -> int:
    """Stands in for llama.cpp on an AMX CPU: aborts while its extra buffer types are on."""
    if extra_bufts:
        llama._abort_for_test()
    return 7


def _fake_good_load(path: str, extra_bufts: bool) -> int:
    return 7


def _fake_always_abort(path: str, extra_bufts: bool) -> int:
    llama._abort_for_test()
    return 0


def _raises(msg: str) -> None:
    raise ValueError(msg)


def test_an_aborting_peer_is_contained() -> None:
    """A child that calls abort() becomes an exception naming the signal and llama.cpp's assert; we live on."""
    with pytest.raises(llama.PeerCrashed, match=r"SIGABRT.*GGML_ASSERT\(this is a test\)"):
        llama.isolated("_abort_for_test")
    assert os.getpid() > 0  # still here


def test_a_peer_exception_is_reported() -> None:
    with pytest.raises(llama.PeerError, match="ValueError: bad gguf"):
        llama.isolated("tests.test_llama_peer:_raises", "bad gguf")


def test_results_come_back_from_the_child() -> None:
    assert llama.isolated("tests.test_llama_peer:_fake_good_load", "x", True) == 7


def test_probe_turns_extra_bufts_off_where_they_abort(tmp_path: Path) -> None:
    ok, why = llama.probe(tmp_path / "m.gguf", child="tests.test_llama_peer:_fake_amx_load")
    assert not ok and "aborts" in why and "GGML_ASSERT" in why
    ok, why = llama.probe(tmp_path / "m.gguf", child="tests.test_llama_peer:_fake_good_load")
    assert ok
    ok, why = llama.probe(tmp_path / "m.gguf", child="tests.test_llama_peer:_fake_always_abort")
    assert not ok and "with and without" in why


def test_env_forces_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("K2LOCAL_LLAMA_EXTRA_BUFTS", "0")
    cfg = llama.config()
    assert not cfg.extra_bufts and "K2LOCAL_LLAMA_EXTRA_BUFTS=0" in cfg.describe()


def test_probe_result_is_cached_per_machine(monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    monkeypatch.delenv("K2LOCAL_LLAMA_EXTRA_BUFTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[Path] = []
    monkeypatch.setattr(llama, "probe_gguf", lambda work: work / "m.gguf")
    monkeypatch.setattr(llama, "probe", lambda path: (calls.append(path), (False, "fake abort"))[1])
    a = llama.config()
    b = llama.config()
    assert len(calls) == 1 and a == b and not a.extra_bufts and "fake abort" in a.reason
    assert (tmp_path / "k2local" / "llama_peer.json").exists()
    monkeypatch.setattr(llama, "_machine_key", lambda: "another machine")
    llama.config()
    assert len(calls) == 2


def test_this_machine_runs_llama_cpp_on_deepseek2_q8(tmp_path: Path) -> None:
    """The real probe on this CPU: whatever it decides, llama.cpp then runs the Q8_0 deepseek2 model."""
    pytest.importorskip("llama_cpp")
    cfg = llama.config()
    path = llama.probe_gguf(tmp_path)
    assert llama.isolated("_probe_load", str(path), cfg.extra_bufts) > 0
    assert cfg.version in cfg.describe()
