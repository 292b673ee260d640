"""One decoded token's MLA attention for one layer at Kimi K2's shapes, against cache depths up to 32k: the one-call
kernel (offload.kernels.MLADecode) beside the separate k_b / torch / v_b calls the model made before, and beside
the hardware: the time to read the layer's k_b, v_b and latent cache at the read loop's bandwidth, measured in the
same run.

    python bench/decode_attention.py [--depths 64,2048,8192,32768] [--threads N] [--heads 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

from k2local.model import PARALLEL_ATTENTION_MACS, _absorbed_attention, _split_decode_attention
from offload import kernels as K
from quant.random_blocks import random_blocks

NOPE, ROPE, LATENT, V = 128, 64, 512, 128  # Kimi K2 / DeepSeek-V3


def torch_path(mla: K.MLADecode, q_nope, q_pe, lat, kpe, scale: float) -> torch.Tensor:
    """What KimiK2Model._attend ran for a decoded token before MLADecode."""
    q_lat = mla.k_b(q_nope[:, None, :])
    h, s = q_lat.shape[0], lat.shape[0]
    long = h * s * LATENT > PARALLEL_ATTENTION_MACS
    parts = min(torch.get_num_threads(), s // 256) if long else 1
    if parts > 1:
        pl = _split_decode_attention(q_lat, q_pe[:, None, :], lat, kpe, scale, parts)
    else:
        pl = _absorbed_attention(q_lat, q_pe[:, None, :], lat, kpe, s - 1, scale)
    return mla.v_b(pl)[:, 0]


def timed(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="64,2048,8192,32768", help="cached positions, comma-separated")
    ap.add_argument("--heads", type=int, default=64, help="attention heads (Kimi K2: 64, DeepSeek-V3: 128)")
    ap.add_argument("--threads", type=int, default=0, help="kernel and torch threads (default: physical cores)")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if not K.available():
        raise SystemExit("decode_attention: the compiled kernels are not available here")
    n = K.set_threads(args.threads or None)
    torch.set_num_threads(n)
    rng = np.random.default_rng(0)
    h = args.heads
    k_b = K.QHeads(random_blocks(Q.Q8_0, h * LATENT, NOPE, rng), int(Q.Q8_0), h, NOPE)
    v_b = K.QHeads(random_blocks(Q.Q8_0, h * V, LATENT, rng), int(Q.Q8_0), h, LATENT)
    mla = K.MLADecode(k_b, v_b)
    g = torch.Generator().manual_seed(0)
    q_nope, q_pe = torch.randn(h, NOPE, generator=g) * 0.1, torch.randn(h, ROPE, generator=g) * 0.1
    scale = (NOPE + ROPE) ** -0.5
    print(f"MLA decode attention, one layer: {h} heads, latent {LATENT}, rope {ROPE}, k_b / v_b Q8_0, fp32 cache, "
          f"{n} threads, ISA {K.isa()}")
    print(f"{'depth':>6} {'one call ms':>12} {'separate ms':>12} {'speedup':>8} {'bytes MB':>9} {'at read loop ms':>16} "
          f"{'x read loop':>12} {'GFLOP/s':>8} {'read GB/s':>10}")
    for s in (int(d) for d in args.depths.split(",")):
        lat, kpe = torch.randn(s, LATENT, generator=g), torch.randn(s, ROPE, generator=g)
        bw = K.read_bandwidth(reps=3)
        fused = timed(lambda: mla(q_nope, q_pe, lat, kpe, scale), args.reps)
        split = timed(lambda: torch_path(mla, q_nope, q_pe, lat, kpe, scale), args.reps)
        nbytes = k_b.w.nbytes + v_b.w.nbytes + (lat.numel() + kpe.numel()) * 4
        flops = 2 * h * s * (2 * LATENT + ROPE)
        bound = nbytes / (bw * 1e9)
        print(f"{s:>6} {fused * 1e3:>12.2f} {split * 1e3:>12.2f} {split / fused:>7.2f}x {nbytes / 1e6:>9.1f} "
              f"{bound * 1e3:>16.2f} {bound / fused:>11.2f}x {flops / fused / 1e9:>8.1f} {bw:>10.1f}")


if __name__ == "__main__":
    main()
