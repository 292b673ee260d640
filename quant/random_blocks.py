"""Valid GGUF blocks with random contents, for kernel tests and benchmarks.

Every bit pattern of the quants and packed sub-scales of a K-quant or codebook (IQ) block is a valid block; only the
fp16 super-block scales need sane values (a random fp16 can be inf or NaN). The legacy 32-value types are made by
quantizing normal values (gguf-py, bit-exact with llama.cpp).
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from quant import types as qtypes

Q = GGMLQuantizationType
_CODEBOOK = (Q.IQ4_XS, Q.IQ4_NL, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S)
# byte offsets of the fp16 super-block scales (d, dmin) inside one block; IQ1_M has none: its d is spread over the top
# nibbles of the four uint16 at bytes 48..55
SCALE_OFFSETS: dict[int, tuple[int, ...]] = {
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q8_0: (0,), Q.Q4_0: (0,),
    Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), **{q: (0,) for q in _CODEBOOK}, Q.IQ1_M: (),
}
LEGACY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def set_scales(blocks: np.ndarray, qtype: int, d: np.ndarray | float) -> None:
    """Write fp16 scale(s) d (one per block, or one for all) into blocks [n, block bytes] of `qtype`, in place."""
    dv = np.broadcast_to(np.asarray(d, dtype=np.float16), (blocks.shape[0],)).view(np.uint16)
    if qtype == Q.IQ1_M:
        for k in range(4):
            blocks[:, 49 + 2 * k] = (blocks[:, 49 + 2 * k] & 0x0F) | (((dv >> (4 * k)) & 0xF) << 4).astype(np.uint8)
        return
    for off in SCALE_OFFSETS[Q(int(qtype))]:
        _put_f16(blocks, off, dv)


def _put_f16(blocks: np.ndarray, off: int, dv: np.ndarray) -> None:
    """fp16 bits dv (one per block) into bytes off, off + 1 of each block (little-endian, as GGUF stores them)."""
    blocks[:, off] = (dv & 0xFF).astype(np.uint8)
    blocks[:, off + 1] = (dv >> 8).astype(np.uint8)


def random_blocks(qtype: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [rows, row bytes] of `qtype`: legacy types quantized from normal values, the others random blocks with
    random fp16 scales in +-[0.002, 0.03] (every 7th negative: legal too)."""
    qt = Q(int(qtype))
    if qt in LEGACY:
        return quantize(rng.standard_normal((rows, cols)).astype(np.float32), qt)
    t = qtypes.info(qt)
    blk, nbytes = t.block_size, t.type_size
    b = rng.integers(0, 256, (rows * cols // blk, nbytes), dtype=np.uint8)
    for off in SCALE_OFFSETS[qt] or (None,):  # each scale (d, then dmin) its own draw; IQ1_M: its one d
        d = rng.uniform(0.002, 0.03, b.shape[0]).astype(np.float16)
        d[::7] *= -1
        if off is None:
            set_scales(b, qt, d)
        else:
            _put_f16(b, off, d.view(np.uint16))
    return b.reshape(rows, -1)
