"""A GGUF of random weights in a recipe's types, written directly (no checkpoint, no quantizer): for benchmarks.

A model at Kimi K2's real depth and widths holds tens of GB; quantizing a random FP8 checkpoint of it would take
hours on a small machine. Here every block type's bytes are random with fp16 scales chosen so each weight is about
N(0, 1/cols) in size (activations stay healthy over 61 layers), and norms, router and bias get the tiny
checkpoints' values. The tokenizer (and so the vocabulary) is the tiny checkpoint's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from k2local.config import RANDOM_WEIGHTS_KEY, ModelConfig
from k2local.convert.recipes import get_recipe
from k2local.convert.to_gguf import model_metadata, plan_tensors, tensor_types
from k2local.tokenizer.gguf_vocab import tokenizer_metadata
from quant import types as qtypes
from quant.gguf_file import GGUFStreamWriter, TensorSpec, qtype_of, u32
from quant.random_blocks import Q, random_blocks, set_scales

CHUNK_BYTES = 64 << 20
# rough std of a block's weights per unit of its fp16 scale (d, with dmin = d where the type has one)
_SPREAD = {Q.Q8_0: 73.0, Q.Q4_0: 4.6, Q.Q5_0: 9.2, Q.Q2_K: 20.0, Q.Q3_K: 40.0, Q.Q4_K: 200.0, Q.Q5_K: 400.0,
           Q.Q6_K: 300.0}


def _float_rows(spec: TensorSpec, kind: str, rows: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "norm":
        v = 1.0 + 0.1 * rng.standard_normal((rows, spec.cols))
    elif kind == "exp_probs_b":
        v = 0.1 * rng.standard_normal((rows, spec.cols))
    else:
        v = rng.standard_normal((rows, spec.cols)) / spec.cols ** 0.5
    return v.astype({Q.F32: np.float32, Q.F16: np.float16}.get(Q(spec.qtype), np.float32))


def _block_rows(spec: TensorSpec, rows: int, rng: np.random.Generator) -> np.ndarray:
    qt = Q(spec.qtype)
    if qt == Q.BF16:
        f = (rng.standard_normal((rows, spec.cols), dtype=np.float32) / spec.cols ** 0.5).view(np.uint32)
        return (f >> 16).astype(np.uint16)
    if qt in _SPREAD:  # every byte pattern is a valid block: random bytes, then the scales
        b = np.frombuffer(rng.bytes(rows * spec.row_bytes), np.uint8).reshape(-1, qtypes.info(qt).type_size).copy()
        set_scales(b, qt, 1.0 / (_SPREAD[qt] * spec.cols ** 0.5))
        return b
    return random_blocks(qt, rows, spec.cols, rng)


def write_random_gguf(out: Path, cfg: ModelConfig, tokenizer_dir: Path, recipe: str = "q4", seed: int = 0) -> Path:
    """Write a GGUF of `cfg` (types from `recipe`) with random weights and `tokenizer_dir`'s tokenizer."""
    rec = get_recipe(recipe)
    plan = plan_tensors(cfg)
    types = tensor_types(plan, rec)
    metadata = model_metadata(cfg, f"random {cfg.num_hidden_layers}-layer", rec.file_type)
    metadata.update(tokenizer_metadata(tokenizer_dir, cfg))
    metadata[RANDOM_WEIGHTS_KEY] = u32(int(cfg.extra.get("k2local_tiny", 1)))
    specs = [TensorSpec(p.name, p.shape, int(qtype_of(t))) for p, t in zip(plan, types)]
    kinds = {p.name: p.role.kind for p in plan}
    rng = np.random.default_rng(seed)
    writer = GGUFStreamWriter(out, metadata, specs, fingerprint_extra=f"random {recipe} {seed}")
    with writer:
        for spec, done in writer.remaining():
            row = done // spec.row_bytes
            step = max(1, CHUNK_BYTES // spec.row_bytes)
            floaty = Q(spec.qtype) in (Q.F32, Q.F16)
            while row < spec.rows:
                n = min(step, spec.rows - row)
                writer.write(_float_rows(spec, kinds[spec.name], n, rng) if floaty else _block_rows(spec, n, rng))
                row += n
        writer.finish()
    return out
