"""GGUF Q8_0: blocks of 32 values as fp16 scale d and 32 int8 quants (block_q8_0, 34 bytes)."""

from __future__ import annotations

import numpy as np
import torch

from . import types as qtypes
from .ggml_float import bytes_to_fp16, div, fp16_bytes, roundf, to_fp16

QK8_0 = qtypes.block_size("Q8_0")  # 32
BLOCK_BYTES = qtypes.type_size("Q8_0")  # 34


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref: x [NB, 32] float32 -> uint8 [NB, 34]."""
    if x.device.type == "cpu":
        return torch.from_numpy(_quantize_q8_0_np(x.detach().to(torch.float32).contiguous().numpy()))
    amax = x.abs().amax(1)
    d = div(amax, 127.0)
    inv = torch.where(d != 0, div(1.0, d), torch.zeros_like(d))
    q = roundf(x * inv.unsqueeze(1)).to(torch.int8)
    return torch.cat([fp16_bytes(to_fp16(d)), q.view(torch.uint8)], dim=1)


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    """uint8 [NB, 34] -> float32 [NB, 32] (q * d, as dequantize_row_q8_0)."""
    d = bytes_to_fp16(b[:, 0:2])
    q = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return q * d.unsqueeze(1)


_BLOCKS = 2048  # blocks per numpy step: 256 KB of input, so the few temporaries stay in the L2 cache


def _quantize_q8_0_np(x: np.ndarray) -> np.ndarray:
    """quantize_q8_0's float32 operations on numpy, in blocks (numpy's per-op cost is a fraction of torch's)."""
    out = np.empty((x.shape[0], BLOCK_BYTES), np.uint8)
    with np.errstate(all="ignore"):
        for b0 in range(0, x.shape[0], _BLOCKS):
            a = x[b0:b0 + _BLOCKS]
            amax = np.max(np.abs(a), axis=1)
            d = amax / np.float32(127.0)
            inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0))
            v = a * inv[:, None]
            t = np.trunc(v)  # C roundf: round half away from zero, exactly (as ggml_float.roundf)
            f = np.abs(v - t)
            t += np.copysign((f >= np.float32(0.5)).astype(np.float32), v)
            if not (np.isfinite(inv).all() and np.isfinite(amax).all()):
                t[~np.isfinite(t)] = 0  # C's (int8_t) of inf / NaN on x86 (and torch's): 0
            out[b0:b0 + _BLOCKS, 2:] = t.astype(np.int8).view(np.uint8)
            out[b0:b0 + _BLOCKS, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return out
