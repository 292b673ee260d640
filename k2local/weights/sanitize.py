"""Checkpoint quirks in one place: what stored tensors need before the model (or a GGUF) can use them.

As mlx-lm's `Model.sanitize(weights)` does for a whole state dict, but per tensor, since k2local's sources are
lazy:
- FP8 block scales: Kimi K2 / DeepSeek-V3 store linear weights as float8_e4m3fn with a float32
  `<name>_scale_inv` per 128x128 block (partial edge blocks); embeddings, head and router stay BF16.
- kv_b split: MLA's `kv_b_proj` [heads * (nope + v), kv_lora] is, per head, the key up-projection (nope rows)
  then the value up-projection (v rows). The absorbed form uses them apart: the model as w_uk [heads, nope,
  kv_lora] / w_uv [heads, v, kv_lora], GGUF (llama.cpp) as attn_k_b [heads, kv_lora, nope] / attn_v_b.
- Expert stacking: HF stores each routed expert's matrices apart, GGUF stacks a layer's experts per projection
  into ffn_{gate,up,down}_exps [n_expert, rows, cols] (some files fuse gate and up: ffn_gate_up_exps).
- INT4 repack: the slot for compressed-tensors INT4 checkpoints (Kimi K2 Thinking), not implemented yet.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from k2local import arch
from quant.fp8 import dequantize_fp8_block, quantize_fp8_block

# ------------------------------------------------------------------------------------------------ FP8 scales
SCALE_SUFFIX = "_scale_inv"
DEFAULT_FP8_BLOCK = (128, 128)
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")  # safetensors dtype names


def scale_name(name: str) -> str:
    """Name of the block scale that goes with FP8 weight `name`."""
    return name + SCALE_SUFFIX


def is_scale_name(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def fp8_block(quantization_config: Mapping[str, Any] | None) -> tuple[int, ...]:
    """The (rows, cols) of one FP8 scale block from config.json's quantization_config."""
    return tuple((quantization_config or {}).get("weight_block_size", DEFAULT_FP8_BLOCK))


def needs_scale(t: torch.Tensor) -> bool:
    """Whether a stored tensor is FP8 (and so comes with a block scale)."""
    return t.element_size() == 1 and t.is_floating_point()


def dequantize(t: torch.Tensor, scale: torch.Tensor | None, block: tuple[int, ...], dtype: torch.dtype
               ) -> torch.Tensor:
    """A stored tensor as `dtype`: FP8 block scales applied when there is a scale (ValueError on a scale that does
    not fit the weight), a plain cast otherwise."""
    if scale is None:
        return t.to(dtype)
    return dequantize_fp8_block(t, scale, block, dtype)  # type: ignore[arg-type]


def fp8_row_window(r0: int, r1: int, block_rows: int, scale_rows: int) -> tuple[int, int, int]:
    """Reading rows r0:r1 of an FP8 weight: (first weight row to read, aligned down to the block; first and end
    scale row). The rows wanted start at r0 - first row of what is dequantized."""
    a0 = r0 // block_rows * block_rows
    return a0, min(a0 // block_rows, scale_rows), min(-(-r1 // block_rows), scale_rows)


def stored_as_checkpoint(name: str, w: torch.Tensor, fp8: bool) -> dict[str, torch.Tensor]:
    """Tensors as the real checkpoints store weight `name`: FP8 + scale for linear layers, BF16 for embeddings,
    head, router and norms, F32 for the router bias (or BF16 everything but the bias when not fp8)."""
    p = arch.parse_hf_name(name)
    key = p.key if p is not None else None
    if key == arch.MODEL_TENSOR.FFN_EXP_PROBS_B:
        return {name: w.float()}
    keep_bf16 = key in (arch.MODEL_TENSOR.TOKEN_EMBD, arch.MODEL_TENSOR.OUTPUT, arch.MODEL_TENSOR.FFN_GATE_INP)
    if fp8 and w.dim() == 2 and not keep_bf16:
        q, s = quantize_fp8_block(w)
        return {name: q, scale_name(name): s}
    return {name: w.to(torch.bfloat16)}


# --------------------------------------------------------------------------------------------------- kv_b
def absorbed_kv_b(kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj [heads * (nope + v), kv_lora] -> (w_uk [heads, nope, kv_lora], w_uv [heads, v, kv_lora])."""
    kv = kv_b.view(heads, -1, kv_b.shape[-1])
    return kv[:, :nope].contiguous(), kv[:, nope:].contiguous()


def split_kv_b(kv_b: torch.Tensor, heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj -> GGUF's (attn_k_b [heads, kv_lora, nope], attn_v_b [heads, v, kv_lora]), as llama.cpp's
    converter writes them (the key half transposed per head)."""
    kv = kv_b.view(heads, -1, kv_b.shape[-1])
    return kv[:, :nope].transpose(1, 2).contiguous(), kv[:, nope:].contiguous()


def merge_kv_b(k_b: torch.Tensor, v_b: torch.Tensor) -> torch.Tensor:
    """GGUF's attn_k_b [heads, kv_lora, nope] and attn_v_b [heads, v, kv_lora] -> kv_b_proj
    [heads * (nope + v), kv_lora] (the inverse of split_kv_b)."""
    heads, kvr, nope = k_b.shape
    return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(heads * (nope + v_b.shape[1]), kvr)


# ---------------------------------------------------------------------------------------------- expert stacking
def stacked_experts(n_experts: int, rows_per_expert: int, start_row: int = 0) -> Iterator[tuple[int, int]]:
    """Writing a stacked ffn_*_exps [n_experts, rows, cols] from row `start_row` on (of the flattened
    [n_experts * rows, cols]): (expert, first row within that expert) for each expert still to write."""
    for e in range(start_row // rows_per_expert, n_experts):
        yield e, max(start_row - e * rows_per_expert, 0)


def find_stacked_experts(tensors: Mapping[str, Any], layer: int, proj: str) -> tuple[Any, int, int] | None:
    """Where `proj` ('gate', 'up', 'down') of `layer`'s routed experts is in a GGUF's tensors (name -> an object
    with a torch-order `.shape`): (tensor, first row, rows) in each expert's slice [n_expert, rows, cols], or None.
    A fused ffn_gate_up_exps holds gate in its first half of rows, up in the second."""
    t = tensors.get(arch.gguf_name(arch.EXPERT_PROJS[proj], layer))
    if t is not None:
        return t, 0, t.shape[1]
    if arch.FUSED_GATE_UP_EXP is not None and proj in ("gate", "up"):
        fused = tensors.get(arch.gguf_name(arch.FUSED_GATE_UP_EXP, layer))
        if fused is not None:
            half = fused.shape[1] // 2
            return fused, (0 if proj == "gate" else half), half
    return None


# ------------------------------------------------------------------------------------------------- INT4 repack
INT4_SUFFIXES = ("_packed", "_scale", "_shape")  # compressed-tensors pack-quantized: weight_packed, ...


def is_int4(quantization_config: Mapping[str, Any] | None) -> bool:
    """Whether config.json's quantization_config is compressed-tensors INT4 (Kimi K2 Thinking's format)."""
    q = quantization_config or {}
    return q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized"


def repack_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """The slot for INT4 checkpoints: unpack compressed-tensors' int32-packed 4-bit weights and their group scales
    into a float weight (or repack them for a GGUF type). Not implemented yet."""
    raise NotImplementedError("INT4 (compressed-tensors) checkpoints are not supported yet")
