"""GPU fused dequant-matmul kernels (offload.kernels.triton_q): weight bytes read per second, against the device's
own copy bandwidth and against the paths they replace.

For each GGUF type, matrix shape (default: a Kimi K2 expert's gate/up 2048x7168 and down 7168x2048) and batch
(default 1, 8, 64 rows of bf16 activations) it times, with CUDA events:
  fused     qmatmul_gpu(x, raw bytes)                   -> GB/s of quantized weight bytes read
  deq+mm    quant.codecs.dequantize(bytes) then x @ W^T  (per-use decoding: the fallback path)
  dense     x @ W^T on a matrix dequantized beforehand to bf16 (the old device cache: ~3.5x the VRAM at Q4_K)
and reports the fused kernel's GB/s as a share of the measured copy bandwidth (a large device-to-device
torch copy; read + write bytes per second, i.e. what DRAM sustains). Every timed call uses a different copy of the
matrix, cycling through enough copies to exceed the L2 cache several times over, so weights come from DRAM.

    python bench/gpu_kernels.py [--types Q4_K,Q8_0] [--batches 1,8,64] [--shapes 2048x7168] [--iters 50] [--json]

Without CUDA (or without triton) it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ["Q4_K", "Q8_0", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"]
L2_MULTIPLE = 4  # the copies of each matrix together are at least this many times the L2 cache
DEVICE = "cuda"


def cuda_time(fn: Callable[[int], object], iters: int, warmup: int = 3) -> float:
    """Mean seconds per call of fn(i), i = 0, 1, ..., measured with CUDA events after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device memory bandwidth in GB/s from dst.copy_(src) of `nbytes`: (bytes read + bytes written) / time."""
    bufs = [torch.empty(nbytes, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    t = cuda_time(lambda i: bufs[1].copy_(bufs[0]), iters)
    bufs.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9


def l2_bytes() -> int:
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 << 20)


def n_copies(nbytes: int) -> int:
    return max(2, -(-L2_MULTIPLE * l2_bytes() // max(nbytes, 1)))


def bench_type(name: str, rows: int, cols: int, batches: list[int], iters: int, dtype: torch.dtype) -> list[dict]:
    from gguf import GGMLQuantizationType

    from offload.kernels import triton_q as tq
    from quant import codecs

    qt = int(GGMLQuantizationType[name])
    torch.manual_seed(0)
    on_device = codecs.can_quantize(qt, cols)  # else (codebook types): random valid blocks, dequantized on the host
    if on_device:
        w = torch.randn(rows, cols, device=DEVICE)
        data = torch.from_numpy(codecs.quantize(w, qt, device=DEVICE)).to(DEVICE)  # uint8 [rows, row_bytes]
        del w
        dense0 = codecs.dequantize(data, qt, cols).to(dtype)
    else:
        import numpy as np
        from gguf.quants import dequantize

        from quant.random_blocks import random_blocks

        host = random_blocks(qt, rows, cols, np.random.default_rng(0))
        data = torch.from_numpy(host).to(DEVICE)
        dense0 = torch.from_numpy(dequantize(host, GGMLQuantizationType(qt))).reshape(rows, cols).to(DEVICE, dtype)
    qcopies = [data.clone() for _ in range(n_copies(data.numel()))]
    dcopies = [dense0.clone() for _ in range(n_copies(dense0.numel() * dense0.element_size()))]
    out = []
    for m in batches:
        x = torch.randn(m, cols, device=DEVICE, dtype=dtype)
        y = tq.qmatmul_gpu(x, data, qt, cols)
        ref = (x.float() @ dense0.float().T)
        err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        t_fused = cuda_time(lambda i, x=x: tq.qmatmul_gpu(x, qcopies[i % len(qcopies)], qt, cols), iters)
        t_deq = cuda_time(lambda i, x=x: x @ codecs.dequantize(qcopies[i % len(qcopies)], qt, cols).to(dtype).T,
                          max(3, iters // 5)) if on_device else float("nan")  # (no torch decoder for these)
        t_dense = cuda_time(lambda i, x=x: x @ dcopies[i % len(dcopies)].T, iters)
        out.append({
            "type": name, "shape": [rows, cols], "batch": m, "max_rel_err": err,
            "fused_us": t_fused * 1e6, "fused_gbs": data.numel() / t_fused / 1e9,
            "deq_mm_us": t_deq * 1e6, "dense_us": t_dense * 1e6,
            "dense_gbs": dense0.numel() * dense0.element_size() / t_dense / 1e9,
            "weight_bytes": data.numel(), "dense_bytes": dense0.numel() * dense0.element_size(),
        })
    qcopies.clear()
    dcopies.clear()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--shapes", default="2048x7168,7168x2048", help="ROWSxCOLS of W (y = x @ W^T)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 0
    from offload.kernels import triton_q as tq

    if not tq.available("cuda"):
        print("bench/gpu_kernels.py needs triton (pip install triton; CUDA builds of torch include it); "
              "nothing measured.")
        return 0
    dtype = getattr(torch, a.dtype)
    batches = [int(b) for b in a.batches.split(",")]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
    copy_gbs = copy_bandwidth()
    rows: list[dict] = []
    for name in [t.strip().upper() for t in a.types.split(",") if t.strip()]:
        for r, c in shapes:
            rows.extend(bench_type(name, r, c, batches, a.iters, dtype))
    dev = torch.cuda.get_device_name(0)
    for row in rows:
        row["fused_pct_of_copy"] = 100 * row["fused_gbs"] / copy_gbs
    if a.json:
        print(json.dumps({"device": dev, "copy_gbs": copy_gbs, "dtype": a.dtype, "rows": rows}, indent=1))
        return 0
    print(f"{dev}: device copy bandwidth {copy_gbs:.0f} GB/s (read + write); activations {a.dtype}")
    hdr = (f"{'type':7} {'W shape':>10} {'batch':>5} | {'fused us':>9} {'GB/s':>6} {'%copy':>6} | "
           f"{'deq+mm us':>10} {'dense us':>9} {'dense GB/s':>10} | {'err':>8}")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        shape = f"{row['shape'][0]}x{row['shape'][1]}"
        print(f"{row['type']:7} {shape:>10} {row['batch']:>5} | {row['fused_us']:9.1f} {row['fused_gbs']:6.0f} "
              f"{row['fused_pct_of_copy']:5.0f}% | {row['deq_mm_us']:10.1f} {row['dense_us']:9.1f} "
              f"{row['dense_gbs']:10.0f} | {row['max_rel_err']:8.1e}")
    print("fused: GB/s of quantized weight bytes; dense: bf16 matrix dequantized beforehand (GB/s of bf16 bytes);"
          " deq+mm: dequantize with torch per call, then matmul (nan: no torch decoder for the type; without the fused"
          " kernels such experts are cached dequantized, and shipped to the GPU dequantized on the host).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
