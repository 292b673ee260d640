"""A long decode with experts streamed from disk: RSS and hit rate per window of tokens, against the plan.

    python bench/disk_soak.py --shape small --tokens 2000 --window 200

RSS must stay within the plan's RAM (non-expert weights + the disk tier's slots, plus the KV cache growing with
the context and the interpreter) and the hit rate must not fall as the run goes on. The context is reset every
--context tokens so the KV cache stays bounded. Prints one row per window and the verdict.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402

from bench.decode import SHAPES, synthetic_model  # noqa: E402
from bench.disk_tier import cold_stats_path, disk_options, disk_ram_gib  # noqa: E402
from k2local.engine import LoadOptions  # noqa: E402
from k2local.model import KimiK2Model  # noqa: E402
from k2local.placement import build_backend  # noqa: E402
from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint dir or GGUF (default: a synthetic model)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("K2LOCAL_BENCH_DIR", "/tmp/k2local-bench")))
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--recipe", default="q4")
    ap.add_argument("--skew", type=float, default=None, metavar="ZIPF_S")
    ap.add_argument("--tokens", type=int, default=2000, help="decoded tokens in all")
    ap.add_argument("--window", type=int, default=200, help="tokens per printed row")
    ap.add_argument("--context", type=int, default=500, help="start a new context every this many tokens")
    ap.add_argument("--disk-fraction", type=float, default=0.25)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    path = args.model or synthetic_model(args.workdir, args.recipe, args.shape, args.skew)[1]
    source = open_checkpoint(path)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    ram = disk_ram_gib(source, args.disk_fraction, source.config.num_experts_per_tok)
    opts = LoadOptions(cpu_only=True, experts_on="disk", ram=ram,
                       extra=disk_options(args, cold_stats_path(args.workdir)))
    backend = build_backend(source, opts, torch.device("cpu"), torch.float32)
    model = KimiK2Model(source, experts=backend, device="cpu", dtype=torch.float32)
    plan = backend.plan
    rss_loaded = proc.memory_info().rss
    print(f"{path.name}: {plan.store_slots} cached + {plan.staging_slots} staging slots of "
          f"{plan.slot_bytes / 1e6:.1f} MB = {plan.store_bytes / 1e6:.0f} MB for experts (plan); RSS before load "
          f"{rss0 / 1e6:.0f} MB, after load {rss_loaded / 1e6:.0f} MB; {args.threads} threads, shared machine")
    print(f"{'tokens':>7} {'tok/s':>7} {'hit rate':>9} {'cache alone':>12} {'RSS MB':>8} {'RSS - loaded':>13}")
    g = torch.Generator().manual_seed(7)
    done, rows = 0, []
    cache = None
    tok = 0
    while done < args.tokens:
        backend.reset_stats()
        t0 = time.perf_counter()
        for _ in range(args.window):
            if cache is None or done % args.context == 0:
                cache = model.new_cache()
                tok = int(torch.randint(3, 1000, (1,), generator=g))
            lg = model.forward([tok], cache)[-1]
            tok = int(lg.argmax())
            done += 1
        dt = time.perf_counter() - t0
        d = backend.stats()["tiers"]["disk"]
        rss = proc.memory_info().rss
        rows.append((d["hit_rate"], rss))
        print(f"{done:>7} {args.window / dt:>7.2f} {d['hit_rate']:>9.1%} {d['cache_hit_rate']:>12.1%} "
              f"{rss / 1e6:>8.0f} {(rss - rss_loaded) / 1e6:>+13.0f}")
    backend.close()
    first, last = rows[0], rows[-1]
    steady = rows[1:] or rows
    growth = max(r for _, r in steady) - min(r for _, r in steady)
    print(f"RSS after the first window moved by {growth / 1e6:.0f} MB over the rest of the run; hit rate first "
          f"window {first[0]:.1%}, last {last[0]:.1%}, lowest after the first {min(h for h, _ in steady):.1%}")


if __name__ == "__main__":
    main()
