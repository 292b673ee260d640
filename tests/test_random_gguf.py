"""k2local/convert/random_gguf.py: a random-block GGUF in a recipe's types loads and runs with finite logits."""
from __future__ import annotations

from pathlib import Path

import torch

from k2local import tiny
from k2local.convert.random_gguf import write_random_gguf
from k2local.model import KimiK2Model
from k2local.weights.hf_checkpoint import open_checkpoint


def test_random_q4_gguf_runs(tmp_path: Path) -> None:
    cfg = tiny.write_config(tmp_path / "tok", "kimi_k2", {"hidden_size": 256, "num_hidden_layers": 3})
    out = write_random_gguf(tmp_path / "m.gguf", cfg, tmp_path / "tok", "q4")
    src = open_checkpoint(out)
    assert src.config.num_hidden_layers == 3 and src.config.random_weights
    model = KimiK2Model(src)
    logits = model.forward([3, 4, 5, 6], model.new_cache())
    assert logits.shape == (4, cfg.vocab_size) and torch.isfinite(logits).all()


def test_balanced_routers_spread_expert_uses(tmp_path: Path) -> None:
    """balance_gguf_routers rewrites the selection biases so that no few experts take most uses."""
    cfg = tiny.write_config(tmp_path / "tok", "kimi_k2", {"hidden_size": 256, "num_hidden_layers": 3,
                                                           "n_routed_experts": 32, "num_experts_per_tok": 4})
    out = write_random_gguf(tmp_path / "m.gguf", cfg, tmp_path / "tok", "q4")
    ids = torch.randint(0, cfg.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    before = tiny.balance_gguf_routers(out, ids, passes=0)  # measures only
    after = tiny.balance_gguf_routers(out, ids, passes=2)
    assert len(after) == 2 and all(0 < s <= 1 for s in after)
    assert sum(after) < sum(before)  # the 8 most used experts of each layer take a smaller share
