"""A decode step's non-expert matrices at Kimi K2's shapes, streamed like a real token, beside the RAM read loop.

Each layer's Q8_0 matrices (q_a, kv_a, q_b, o_proj, shared expert gate/up/down: hidden 7168, q_lora 1536,
kv_lora 512 + rope 64, 64 heads of 192 / 128, shared intermediate --shared) are built once per layer, repacked for
the kernels as the model repacks them, and multiplied by one token in model order, layer after layer; the bytes
read over the wall time are set beside `offload.kernels.read_bandwidth` measured just before each round. A ratio
near 1 says the kernels, calls included, run at the memory's limit; the rest of a decoded token (Python, torch
glue, attention math) is what bench/decode.py's breakdown shows.

  python bench/decode_matrices.py                # 60 layers (6.6 GB), 4 rounds, then per shape
  python bench/decode_matrices.py --layers 8     # smaller working set (still far above the caches)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from offload import kernels as K  # noqa: E402
from quant.random_blocks import random_blocks  # noqa: E402


def layer_shapes(shared: int) -> list[tuple[str, int, int]]:
    """(name, rows, cols) of one MoE layer's non-expert matrices in the order a decode step multiplies them."""
    return [("q_a", 1536, 7168), ("kv_a", 576, 7168), ("q_b", 64 * 192, 1536), ("o_proj", 7168, 64 * 128),
            ("shared gate", shared, 7168), ("shared up", shared, 7168), ("shared down", 7168, shared)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--shared", type=int, default=2048, help="shared expert intermediate size (Kimi K2: 2048)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-repack", action="store_true", help="gguf's row layout instead of the interleaved one")
    args = ap.parse_args()
    if args.layers < 1 or args.rounds < 1:
        sys.exit("error: --layers and --rounds must be at least 1")
    if not K.available():
        sys.exit("error: the compiled kernels are not available here (no C compiler?)")
    threads = K.set_threads(args.threads)
    rng = np.random.default_rng(0)
    shapes = layer_shapes(args.shared)
    base = {(r, c): random_blocks(Q.Q8_0, r, c, rng) for _, r, c in shapes}
    layers = [[K.QMatrix(base[(r, c)].copy(), Q.Q8_0, c, repack=not args.no_repack) for _, r, c in shapes]
              for _ in range(args.layers)]
    xs = {c: torch.randn(1, c) for _, _, c in shapes}
    per_layer = sum(base[(r, c)].nbytes for _, r, c in shapes)
    total = per_layer * args.layers
    probe = K.aligned_buffer(1 << 30)
    probe[:] = 1
    layout = "gguf rows" if args.no_repack else "interleaved (R16) as the model repacks them"
    print(f"{args.layers} layers x {len(shapes)} Q8_0 matrices, {total / 1e9:.2f} GB, {layout}, {threads} threads, "
          f"kernels ISA {K.isa()}")
    for m in layers[0]:
        m(xs[m.cols])  # warm-up: first-call binding
    ratios = []
    for r in range(args.rounds):
        ram = K.read_bandwidth(probe, reps=3)
        t0 = time.perf_counter()
        for lay in layers:
            for m in lay:
                m(xs[m.cols])
        gbs = total / (time.perf_counter() - t0) / 1e9
        ratios.append(gbs / ram)
        print(f"round {r}: read loop {ram:5.1f} GB/s, matrices {gbs:5.1f} GB/s = {gbs / ram:.2f}x the read loop "
              f"({len(shapes) * args.layers} calls)")
    print(f"matrices / read loop, median of rounds: {sorted(ratios)[len(ratios) // 2]:.2f}x")
    for i, (name, r, c) in enumerate(shapes):
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            for lay in layers:
                lay[i](xs[c])
            best = max(best, base[(r, c)].nbytes * args.layers / (time.perf_counter() - t0) / 1e9)
        print(f"  {name:<12} {r:>6} x {c:<5} {base[(r, c)].nbytes / 1e6:6.1f} MB  best {best:5.1f} GB/s")


if __name__ == "__main__":
    main()
