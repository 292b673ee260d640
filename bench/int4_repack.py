"""INT4 (compressed-tensors) -> Q4_0 repack speed: what `k2local run`/`serve` pay per INT4 expert read from a
Kimi K2 Thinking / K2.5 checkpoint (RAM and disk tiers), and `k2local quantize --recipe int4` per expert.

    python bench/int4_repack.py [--experts 4] [--repeat 5]

Times, on Kimi K2's routed-expert matrices (gate/up [2048, 7168], down [7168, 2048], bf16 scales):
  - the C repack (offload.kernels.repack_int4_q4_0, one thread, as one disk-tier reader thread runs it);
  - the torch repack (sanitize.repack_int4's fallback, torch's threads);
  - the hardware limit: one thread copying the same bytes (a repack reads and writes as much as a copy);
and prints GB/s of checkpoint bytes, the ratios, and the hours K2 Thinking's routed experts (~594 GB) would take.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from k2local.weights import sanitize  # noqa: E402
from offload import kernels  # noqa: E402

K2_THINKING_EXPERT_BYTES = 60 * 384 * 3 * 2048 * 7168 // 32 * 18  # 60 MoE layers x 384 experts, Q4_0-sized


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        return f"{m.group(1).strip() if m else 'unknown CPU'}, {os.cpu_count()} logical CPUs"
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"


def best(fn, repeat: int) -> float:
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=4, help="K2 experts (3 matrices each) per timed pass")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not kernels.available():
        sys.exit("int4_repack: the compiled kernel library is not available (see `python -m offload.kernels`)")
    g = torch.Generator().manual_seed(0)
    mats = []
    for _ in range(args.experts):
        for rows, cols in ((2048, 7168), (2048, 7168), (7168, 2048)):
            u = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
            s = (torch.rand(rows, cols // 32, generator=g) * 0.004 + 1e-4).to(torch.bfloat16)
            mats.append((sanitize.pack_int4(u), s, torch.empty(rows * cols // 32 * 18, dtype=torch.uint8)))
    nbytes = sum(p.numel() * 4 + s.numel() * 2 for p, s, _ in mats)
    src = torch.empty(nbytes, dtype=torch.uint8).random_(generator=g)
    dst = torch.empty_like(src)

    def c_pass() -> None:
        for p, s, o in mats:
            kernels.repack_int4_q4_0(p, s, o)

    def torch_pass() -> None:
        for p, s, o in mats:
            sanitize.repack_int4(p, s, out=o, use_kernel=False)

    def copy_pass() -> None:
        with_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            dst.copy_(src)
        finally:
            torch.set_num_threads(with_threads)

    c_pass(), torch_pass(), copy_pass()  # warm: library load, page faults
    tc, tt, tm = best(c_pass, args.repeat), best(torch_pass, args.repeat), best(copy_pass, args.repeat)
    gb = nbytes / 1e9
    print(f"machine: {machine()}; {args.experts} K2 experts = {gb:.2f} GB of INT4 codes + bf16 scales; "
          f"best of {args.repeat}")
    print(f"{'path':<28}{'GB/s':>8}{'vs copy':>9}{'K2 Thinking experts':>22}")
    for name, t in (("C repack, 1 thread", tc), (f"torch repack, {torch.get_num_threads()} threads", tt),
                    ("memcpy, 1 thread (limit)", tm)):
        print(f"{name:<28}{gb / t:>8.2f}{tm / t:>8.2f}x{K2_THINKING_EXPERT_BYTES / (gb / t * 1e9) / 60:>18.1f} min")
    print(f"C / torch: {tt / tc:.1f}x")


if __name__ == "__main__":
    main()
