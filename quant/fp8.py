"""Block FP8 (e4m3) codec as used by DeepSeek-V3 / Kimi K2 checkpoints.

A weight [out, in] is stored as float8_e4m3fn with a float32 `weight_scale_inv` of shape
[ceil(out/B0), ceil(in/B1)]; W[i, j] = fp8[i, j] * scale_inv[i // B0, j // B1]. Edge blocks are partial.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0


def expected_scale_shape(shape: tuple[int, int], block: tuple[int, int] = (128, 128)) -> tuple[int, int]:
    """Shape of the scale grid for a weight of `shape`."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8_block(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize a 2-D block-FP8 weight; shapes not a multiple of the block are handled (partial edge blocks)."""
    if w.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"block FP8 needs 2-D weight and scale, got {tuple(w.shape)} and {tuple(scale_inv.shape)}")
    if tuple(scale_inv.shape) != expected_scale_shape(tuple(w.shape), block):
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
            f"with block {block} (expected {expected_scale_shape(tuple(w.shape), block)})"
        )
    rows, cols = w.shape
    # one full-size float32 buffer, scaled in place block column by block column (no full-size scale grid)
    out = w.to(torch.float32)
    s = scale_inv.to(torch.float32).repeat_interleave(block[0], 0)[:rows]  # [rows, column blocks]
    full = cols // block[1]
    if full:
        out[:, : full * block[1]].view(rows, full, block[1]).mul_(s[:, :full, None])
    if cols % block[1]:
        out[:, full * block[1]:].mul_(s[:, full:full + 1])
    return out if dtype == torch.float32 else out.to(dtype)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight to (float8_e4m3fn, float32 scale_inv), zero-padding partial blocks."""
    rows, cols = w.shape
    br, bc = expected_scale_shape((rows, cols), block)
    pad = torch.zeros(br * block[0], bc * block[1], dtype=torch.float32, device=w.device)
    pad[:rows, :cols] = w.to(torch.float32)
    blocks = pad.view(br, block[0], bc, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(br * block[0], bc * block[1])[:rows, :cols].contiguous(), scale_inv.contiguous()
