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
- INT4 repack: compressed-tensors INT4 routed experts (Kimi K2 Thinking, K2.5) are the Q4_0 code with a bf16
  scale: repacked to Q4_0 bytes (nibble order, scale to fp16), dequantized for reference and conversion.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch

from k2local import arch
from offload import kernels
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


def stored_as_checkpoint(name: str, w: torch.Tensor, fp8: bool, int4: bool = False) -> dict[str, torch.Tensor]:
    """Tensors as the real checkpoints store weight `name`: FP8 + scale for linear layers, BF16 for embeddings,
    head, router and norms, F32 for the router bias (or BF16 everything but the bias when not fp8). With `int4`
    (Kimi K2 Thinking), routed experts as compressed-tensors INT4 (weight_packed, weight_scale, weight_shape) and
    everything else BF16 (the bias F32)."""
    p = arch.parse_hf_name(name)
    key = p.key if p is not None else None
    if key == arch.MODEL_TENSOR.FFN_EXP_PROBS_B:
        return {name: w.float()}
    if int4 and p is not None and p.tensor.role is arch.Role.ROUTED_EXPERT:
        packed, scale = quantize_int4(w)
        return {name + "_packed": packed, name + "_scale": scale,
                name + "_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
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
# compressed-tensors "pack-quantized" (Kimi K2 Thinking, K2.5): per routed-expert linear `<base>.weight_packed`
# int32 [out, in/8] (element j of a word in bits 4j..4j+3, stored as u = q + 8), `<base>.weight_scale` bf16
# [out, in/group], `<base>.weight_shape` [2]; w = (u - 8) * scale[group]. Only the routed experts are INT4.
INT4_SUFFIXES = ("_packed", "_scale", "_shape")  # compressed-tensors pack-quantized: weight_packed, ...
INT4_GROUP = 32  # the group size k2local repacks to Q4_0 (Q4_0's block)
Q4_0_BLOCK_BYTES = 18  # ggml Q4_0: fp16 d, then 16 bytes (byte k: value k low nibble, value k + 16 high)
FP16_MAX = 65504.0
FP16_EXACT_MIN = 2.0 ** -17  # every bf16 value in [2^-17, 65504] is an fp16 value (normal or subnormal)


def is_int4(quantization_config: Mapping[str, Any] | None) -> bool:
    """Whether config.json's quantization_config is compressed-tensors INT4 (Kimi K2 Thinking's format)."""
    q = quantization_config or {}
    return q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized"


def int4_scheme_problem(quantization_config: Mapping[str, Any] | None) -> str | None:
    """Why a compressed-tensors quantization_config is not one k2local runs (None when it is: pack-quantized,
    4-bit symmetric int, group strategy, group size 32, weights only)."""
    q = quantization_config or {}
    if q.get("format") != "pack-quantized":
        return f"compressed-tensors format {q.get('format')!r} (k2local reads pack-quantized)"
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        return "compressed-tensors without config_groups"
    for gname, g in groups.items():
        w = (g or {}).get("weights") or {}
        got = (w.get("num_bits"), w.get("type"), w.get("strategy"), w.get("group_size"), w.get("symmetric"))
        if got != (4, "int", "group", INT4_GROUP, True):
            return (f"config group {gname}: weights num_bits/type/strategy/group_size/symmetric = {list(got)} "
                    f"(k2local reads 4/int/group/{INT4_GROUP}/true)")
        if (g or {}).get("input_activations") or (g or {}).get("output_activations"):
            return f"config group {gname}: quantized activations are not supported"
    return None


def int4_base(name: str) -> str | None:
    """`<base>.weight` for a stored `<base>.weight_packed` / `_scale` / `_shape` name, else None."""
    for suf in INT4_SUFFIXES:
        if name.endswith(".weight" + suf):
            return name[: -len(suf)]
    return None


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [out, in/8] -> the stored codes u (uint8, 0..15) [out, in], element j of a word from bits 4j..4j+3."""
    b = packed.contiguous().view(torch.uint8).reshape(packed.shape[0], -1)  # little-endian: byte k = elements 2k, 2k+1
    out = torch.empty(b.shape[0], b.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = b & 15
    out[:, 1::2] = b >> 4
    return out


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """The inverse of unpack_int4: codes u (0..15) [out, in] -> int32 [out, in/8]."""
    u = u.to(torch.uint8)
    b = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    return b.view(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int] | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = (u - 8) * scale[group], [out, in] in `dtype` (computed in float32: exact for bf16 scales). ValueError on
    shapes that do not fit together."""
    rows, cols = packed.shape[0], packed.shape[1] * 8
    if shape is not None and (int(shape[0]), int(shape[1])) != (rows, cols):
        raise ValueError(f"weight_shape {list(shape)} does not match weight_packed {list(packed.shape)}")
    if scale.dim() != 2 or scale.shape[0] != rows or scale.shape[1] == 0 or cols % scale.shape[1]:
        raise ValueError(f"weight_scale {list(scale.shape)} does not fit weight [{rows}, {cols}]")
    g = cols // scale.shape[1]
    q = unpack_int4(packed).to(torch.float32).sub_(8).view(rows, -1, g)
    return (q * scale.to(torch.float32)[:, :, None]).view(rows, cols).to(dtype)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] as compressed-tensors stores it (symmetric, scale = absmax / 7 in bf16, q in
    [-7, 7] as QAT checkpoints use): (weight_packed int32 [out, in/8], weight_scale bf16 [out, in/group])."""
    rows, cols = w.shape
    g = w.float().view(rows, cols // group, group)
    scale = (g.abs().amax(-1) / 7).to(torch.bfloat16)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[:, :, None]
    q = torch.round(g / s).clamp(-8, 7).to(torch.int16) + 8
    return pack_int4(q.view(rows, cols).to(torch.uint8)), scale


def fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """Which bf16 scales are fp16 values (bool, same shape). bf16 has 8 exponent bits and 8 significant bits, fp16
    5 and 11: every bf16 in [2^-17, 65504] (and 0) converts exactly; above 65504 fp16 overflows, below 2^-17 only
    values that are multiples of 2^-24 (fp16's subnormal step) survive."""
    s = scale.to(torch.float32)
    return s.to(torch.float16).to(torch.float32) == s


def repack_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int] | None = None,
                group_size: int = INT4_GROUP, out: torch.Tensor | None = None,
                use_kernel: bool = True) -> tuple[torch.Tensor, int]:
    """compressed-tensors INT4 (group 32) -> ggml Q4_0 bytes, uint8 [out, in/32 * 18]; and how many blocks' scales
    were not fp16-exact.

    The 4-bit codes are copied as they are (Q4_0 is the same code: w = (u - 8) * d); only the nibble order changes
    (INT4: byte k of a group = elements 2k, 2k+1; Q4_0: elements k, k + 16) and the scale goes bf16 -> fp16. Where a
    scale is not an fp16 value (below 2^-17) the block is requantized: d = the nearest fp16 to the scale, codes
    kept (they are also round(w / d), since |scale / d - 1| < 1/16 there), so each weight is off by at most
    8 * |scale - d| (< 2^-21). A scale above fp16's range (|w| > 458k) cannot be Q4_0: ValueError. `out` (uint8,
    the Q4_0 size) receives the bytes when given (the disk tier's slot). The compiled kernel does it when
    available (``use_kernel``); torch otherwise, with the same bytes."""
    if group_size != INT4_GROUP:
        raise ValueError(f"INT4 group size {group_size} cannot be repacked to Q4_0 (needs {INT4_GROUP})")
    rows, cols = packed.shape[0], packed.shape[1] * 8
    if shape is not None and (int(shape[0]), int(shape[1])) != (rows, cols):
        raise ValueError(f"weight_shape {list(shape)} does not match weight_packed {list(packed.shape)}")
    nb = cols // INT4_GROUP
    if tuple(scale.shape) != (rows, nb):
        raise ValueError(f"weight_scale {list(scale.shape)} does not fit weight [{rows}, {cols}] in groups of 32")
    out = torch.empty(rows, nb, Q4_0_BLOCK_BYTES, dtype=torch.uint8) if out is None else \
        out.view(torch.uint8).view(rows, nb, Q4_0_BLOCK_BYTES)
    inexact_c = kernels.repack_int4_q4_0(packed, scale, out) if use_kernel else None  # None without the library
    if inexact_c is not None:
        return out.view(rows, nb * Q4_0_BLOCK_BYTES), inexact_c
    s32 = scale.to(torch.float32)
    d = s32.to(torch.float16)
    if not torch.isfinite(d).all():
        bad = s32[~torch.isfinite(d)].abs().max().item()
        raise ValueError(f"INT4 scale {bad:g} is outside fp16's range: cannot be Q4_0")
    inexact = int((d.to(torch.float32) != s32).sum())
    b = packed.contiguous().view(torch.uint8).reshape(rows, nb, 16)
    # INT4 byte k holds elements 2k (low) and 2k+1 (high); Q4_0 byte m holds m (low) and m + 16 (high). So Q4_0
    # bytes 2k, 2k+1 are the low / high nibbles of INT4 bytes k and k + 8 (a = b[:8], c = b[8:]).
    a, c = b[..., :8], b[..., 8:]
    out[..., :2] = d.contiguous().view(torch.uint8).view(rows, nb, 2)
    q = out[..., 2:].unflatten(-1, (8, 2))
    q[..., 0] = (a & 15) | (c << 4)
    q[..., 1] = (a >> 4) | (c & 0xF0)
    return out.view(rows, nb * Q4_0_BLOCK_BYTES), inexact


def q4_0_nbytes(rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] Q4_0 matrix (the same as its INT4 packed + bf16 scale bytes)."""
    return rows * cols // INT4_GROUP * Q4_0_BLOCK_BYTES
