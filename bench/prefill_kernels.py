"""Prefill-shaped routed-expert compute: k2local's many-token kernels vs llama.cpp on the same expert bytes.

N tokens (--tokens) each go to all 8 experts of each layer (Kimi K2 shapes: gate/up [2048 x 7168], down
[7168 x 2048]), so every expert multiplies N rows at once, as in a prompt of N x 48 tokens of Kimi K2 (384 experts,
top-8).  Rows, in multiply-adds of expert weights per second (GMAC/s):
  k2 moe            offload.kernels.moe_experts as the engine runs it (decode-once where the CPU and type have it:
                    AVX-512 Q4_K / Q6_K / IQ4_XS and the codebook types IQ1_S .. IQ3_S, AVX2 the codebook types;
                    Q8_0's GEMM)
  k2 moe, per-row   the same call with the decode-once GEMM off (kernels.set_panel_gemm(False)): its A/B
  llama.cpp         llama_decode of an N-token batch of a tiny MoE GGUF holding the same bytes (bench/kernels.py's
                    model: its attention and output weights are ~1% of the bytes; their time is not subtracted)
  ik_llama.cpp      its llama-bench `-p N` on that GGUF, with `-rtr 1` and with its defaults (--ik-llama DIR or
                    $K2LOCAL_IK_LLAMA; its fused MoE is on in both); a subprocess with its own repetitions
Each engine is timed in turns (--rounds), best of each kept; weights stay in RAM (a few layers, re-read each pass).

  python bench/prefill_kernels.py                          # Q4_K, Q6_K, IQ4_XS, Q8_0, IQ2_XXS, IQ1_S at 64 tokens
  python bench/prefill_kernels.py --types Q2_K --tokens 16,64 --threads 1,2
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
BK = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BK)  # type: ignore[union-attr]

from gguf.constants import GGMLQuantizationType as Q  # noqa: E402

from offload import kernels as K  # noqa: E402


def gmacs(gbs: dict[int, float] | None, ex: BK.Experts, tokens: int, extra: int = 0) -> dict[int, float]:
    """GB/s of bytes per pass -> GMAC/s of routed-expert weights (`extra`: non-expert bytes counted in GB/s)."""
    weights = ex.n_layers * BK.TOPK * 3 * BK.HIDDEN * BK.INTER
    return {t: v * tokens * weights / (ex.nbytes + extra) for t, v in (gbs or {}).items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_K,Q6_K,IQ4_XS,Q8_0,IQ2_XXS,IQ1_S", help="comma-separated ggml types")
    ap.add_argument("--tokens", default="64", help="comma-separated token counts (8..512)")
    ap.add_argument("--threads", help="comma-separated counts (default: 1 and all cores)")
    ap.add_argument("--layers", type=int, default=2, help="expert layers (8 experts x 3 matrices each)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="k2 and llama.cpp timed in turns this many times")
    ap.add_argument("--no-llama", action="store_true", help="skip the peers (llama.cpp and ik_llama.cpp)")
    ap.add_argument("--ik-llama", help="ik_llama.cpp CPU build (dir, bin/ or llama-bench; default $K2LOCAL_IK_LLAMA)")
    a = ap.parse_args(argv)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = [int(t) for t in a.threads.split(",")] if a.threads else sorted({1, ncpu})
    tokens = [int(t) for t in a.tokens.split(",")]
    if any(not 8 <= t <= 512 for t in tokens):
        ap.error("--tokens: each count must be in 8..512")
    types = [Q[t.strip()] for t in a.types.split(",") if t.strip()]
    print(f"k2local kernels: isa={K.isa()} cpus={ncpu} threads={threads} layers={a.layers}", file=sys.stderr)
    sizes = {qt: a.layers for qt in types}
    max_bytes = max(n * BK.TOPK * (2 * BK.INTER * K.row_bytes(int(qt), BK.HIDDEN) + BK.HIDDEN * K.row_bytes(int(qt), BK.INTER))
                    for qt, n in sizes.items())
    _m, buf = BK.big_buffer(max_bytes)
    BK.fill_random(buf)
    rows: list[tuple[str, dict[int, float]]] = []
    result: dict = {"isa": K.isa(), "threads": threads, "types": {}}
    for qt in types:
        ex = BK.Experts(buf, qt, sizes[qt])
        for n in tokens:
            best: dict[str, dict[int, float]] = {}
            for _ in range(a.rounds):
                for panel, name in ((True, "k2 moe"), (False, "k2 moe, per-row")):
                    K.set_panel_gemm(panel)
                    BK.keep_best(best, {name: gmacs(BK.bench_k2(ex, threads, a.passes, ("moe",), tokens=n)["k2 moe"], ex, n)})
                K.set_panel_gemm(True)
                if not a.no_llama:
                    with tempfile.TemporaryDirectory() as td:
                        # bench_llama's GB/s counts ~1% of non-expert bytes too: close enough for a ratio
                        BK.keep_best(best, {"llama.cpp": gmacs(BK.bench_llama(ex, threads, a.passes, td, tokens=n), ex, n)})
                        ik = BK.bench_ik(ex, threads, td, BK.ik_llama.find(a.ik_llama), tokens=n)
                        BK.keep_best(best, {k: gmacs(v, ex, n) for k, v in ik.items()})
            result["types"][f"{qt.name} T={n}"] = best
            rows += [(f"{qt.name} T={n} {k}", v) for k, v in best.items() if v]
    w = max(len(r[0]) for r in rows) + 1
    print(f"\n{'GMAC/s':<{w}}" + "".join(f"{'t=' + str(t):>8}" for t in threads) + f"{'best':>8}")
    for name, v in rows:
        print(f"{name:<{w}}" + "".join(f"{v[t]:8.1f}" if t in v else f"{'-':>8}" for t in threads) + f"{max(v.values()):8.1f}")
    print()
    for key, best in result["types"].items():
        k2, per_row, ll = (max(best[k].values()) if best.get(k) else None for k in ("k2 moe", "k2 moe, per-row", "llama.cpp"))
        line = f"{key}: k2 {k2:.1f} GMAC/s; decode-once GEMM on/off {k2 / per_row:.2f}x"
        if ll:
            line += f"; k2/llama.cpp = {k2 / ll:.2f}x"
        for k in BK.IK_ROWS:
            if best.get(k):
                line += f"; k2/{k} = {k2 / max(best[k].values()):.2f}x"
        print(line)
    if not a.no_llama:
        print("peer:", BK.llama.describe())
        binary = BK.ik_llama.find(a.ik_llama)
        print("peer:", BK.ik_llama.describe(binary, max(threads)))
    return result


if __name__ == "__main__":
    main()
