"""GGUF Q8_0: blocks of 32 values as fp16 scale d and 32 int8 quants (block_q8_0, 34 bytes)."""

from __future__ import annotations

import torch

from .ggml_float import bytes_to_fp16, div, fp16_bytes, roundf, to_fp16

QK8_0 = 32
BLOCK_BYTES = 34


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_q8_0_ref: x [NB, 32] float32 -> uint8 [NB, 34]."""
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
