"""Shared fixtures: tiny checkpoints generated once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _k2local_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the built-in tiny checkpoint cache at a per-session temp dir (hermetic tests)."""
    d = tmp_path_factory.mktemp("k2cache")
    os.environ.setdefault("K2LOCAL_CACHE", str(d))
    return Path(os.environ["K2LOCAL_CACHE"])


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory: pytest.TempPathFactory):
    """tiny_factory(variant) -> path of a tiny random checkpoint of that variant (built once)."""
    from k2local.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(variant: str = "kimi_k2") -> Path:
        if variant not in made:
            made[variant] = make_tiny(tmp_path_factory.mktemp(f"tiny-{variant}"), variant)
        return made[variant]

    return get


@pytest.fixture(scope="session")
def tiny_k2(tiny_factory) -> Path:
    return tiny_factory("kimi_k2")


def shared_kimi_dir() -> Path | None:
    """../shared/kimi_k2 beside the checkout (real Kimi K2 tokenizer files), or $K2_SHARED."""
    env = os.environ.get("K2_SHARED")
    cands = [Path(env) / "kimi_k2" if env else None, Path(__file__).resolve().parents[2] / "shared" / "kimi_k2"]
    for c in cands:
        if c is not None and (c / "tiktoken.model").exists():
            return c
    return None


@pytest.fixture(scope="session")
def tiny_ds(tiny_factory) -> Path:
    """The tiny DeepSeek-V3 checkpoint (HF tokenizer.json layout, no tiktoken.model)."""
    return tiny_factory("deepseek_v3")
