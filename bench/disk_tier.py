"""The disk tier's columns for bench/decode.py (--modes disk): the raw O_DIRECT probe beside the measured miss
GB/s, the planner's prediction beside the measured decode, hit rates with and without saved routing statistics,
and llama.cpp under the same memory cap (a cgroup memory limit where the machine allows one)."""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DISK_SHAPES = {
    # disk: experts dominate and are big enough to be read as a consumer's disk tier reads them (7 MB an expert at
    # q4, 2.4 MB a matrix), 3 MoE layers x 24 experts as k2layer, small enough (~5 GB while built) to build here
    "disk": dict(hidden_size=4096, intermediate_size=1024, moe_intermediate_size=1024, num_hidden_layers=4,
                 n_routed_experts=24, num_experts_per_tok=8, num_attention_heads=32, q_lora_rank=768,
                 kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    # diskwide: the disk shape with 96 experts a layer (2.0 GB of experts, a 2.3 GB GGUF), so a
    # --mem-cap of under 1 GiB is the consumer's case: the experts several times the memory they may use
    "diskwide": dict(hidden_size=4096, intermediate_size=1024, moe_intermediate_size=1024, num_hidden_layers=4,
                     n_routed_experts=96, num_experts_per_tok=8, num_attention_heads=32, q_lora_rank=768,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}


def add_disk_args(ap: argparse.ArgumentParser) -> None:
    """The disk tier's flags of bench/decode.py."""
    g = ap.add_argument_group("disk tier")
    g.add_argument("--skew", type=float, default=None, metavar="ZIPF_S",
                   help="synthetic model: Zipf-shaped routing with this exponent (fixed seed); default near-uniform")
    g.add_argument("--io-threads", type=int, default=8, help="disk mode: reads in flight (and the probe's)")
    g.add_argument("--routing-stats", type=Path, default=None,
                   help="disk mode: saved routing statistics to pre-warm the cache from (default: none, a cold start)")
    g.add_argument("--stats-compare", action="store_true",
                   help="disk mode: also run with routing statistics saved from a run on another prompt")
    g.add_argument("--mem-cap", type=float, default=None, metavar="GIB",
                   help="run k2local (disk mode) and llama.cpp each in a child under this memory limit (cgroup)")
    g.add_argument("--capped-child", action="store_true", help=argparse.SUPPRESS)  # set by --mem-cap's children


# ---------------------------------------------------------------------------------------------- sizing
def disk_ram_gib(source: Any, fraction: float, top_k: int) -> float:
    """RAM for the disk tier whose cache holds `fraction` of the routed experts, plus its staging slots."""
    from k2local.placement import layout_for  # noqa: PLC0415
    from offload.planner import staging_slots  # noqa: PLC0415
    from offload.store import plan_slot  # noqa: PLC0415

    layout = layout_for(source)
    keys = layout.keys()
    slot = max(plan_slot(layout.entry(*k)).size for k in keys)
    cache = max(1, math.ceil(fraction * len(keys)))
    return (cache + staging_slots(top_k)) * slot / (1 << 30)


def disk_options(args: argparse.Namespace, stats_path: str | None, save: bool = False) -> dict[str, Any]:
    """Offload options for a disk-mode run: the bench's reads in flight and routing statistics file."""
    return {"io_threads": args.io_threads, "routing_stats": stats_path, "save_routing_stats": save}


def gather_stats(make_runner: Any, path: Path, args: argparse.Namespace, vocab: int, runs: int = 3) -> str:
    """Routing statistics saved by disk-mode runs on another prompt (what earlier sessions would leave); the file."""
    import torch  # noqa: PLC0415

    stats = args.workdir / f"routing-{path.stem}-{os.getpid()}.json"
    stats.unlink(missing_ok=True)
    g = torch.Generator().manual_seed(4321)
    other = torch.randint(3, min(vocab, 1000), (args.prompt,), generator=g).tolist()
    run, close = make_runner(path, "disk", args, other, stats=str(stats), save_stats=True)
    for _ in range(runs):
        run()
    close()
    return str(stats)


def cold_stats_path(workdir: Path) -> str:
    """A routing statistics path with nothing in it: a cold start that no earlier run can warm (runs using it
    do not save)."""
    p = workdir / f"no-routing-stats-{os.getpid()}.json"
    p.unlink(missing_ok=True)
    return str(p)


def first_run_hit_rates(make_runner: Any, path: Path, args: argparse.Namespace, ids: list[int], saved: str
                        ) -> list[tuple[str, dict[str, Any]]]:
    """One prefill + decode from a fresh process state, cold and pre-warmed from `saved` statistics: the hit
    rates a new session sees (the timed rounds reuse one backend, whose cache earlier rounds have warmed)."""
    out = []
    for label, stats in (("cold start", None), ("pre-warmed from saved stats", saved)):
        run, close = make_runner(path, "disk", args, ids, stats=stats)
        try:
            out.append((label, run()))
        finally:
            close()
    return out


def print_first_runs(rows: list[tuple[str, dict[str, Any]]]) -> None:
    for label, r in rows:
        print(f"first run, {label}: hit rate {r['hit_rate']:.1%} (cache alone {r['cache_hit_rate']:.1%}, "
              f"{r['cache_slots']} of {r['n_experts']} experts cached), decode {r['decode_tps']:.2f} tok/s; "
              f"planner assumed {r.get('assumed_hit_rate', 0):.1%}")


# ---------------------------------------------------------------------------------------------- measuring
def disk_fields(stats: dict[str, Any], decode_s: float) -> dict[str, Any]:
    """What a decode run's disk tier did: miss and read GB/s over the decode time, the share of it the disk was
    busy, cache-only hit rate, and how good the prefetch was."""
    d = stats["tiers"].get("disk")
    if d is None:
        return {}
    return {"miss_gbs": d["miss_bytes"] / decode_s / 1e9, "read_gbs": d["bytes_read"] / decode_s / 1e9,
            "disk_busy": stats.get("disk_busy_s", 0.0) / decode_s, "cache_hit_rate": d["cache_hit_rate"],
            "hit_rate": d["hit_rate"], "prefetch_precision": d["prefetch_precision"],
            "prediction_accuracy": stats.get("prediction_accuracy", 0.0), "cache_slots": d["cache_slots"],
            "slots": d["slots"], "n_experts": d["experts"]}


def planner_prediction(backend: Any, device: Any, dtype: Any, io_threads: int
                       ) -> tuple[dict[str, Any], Callable[[float], float]]:
    """The planner's decode prediction for this backend's plan, from bandwidths probed now; and the same cost model
    at a given hit rate (to be called with the one a run measured)."""
    from offload.planner import at_hit_rate, predict_decode_tps  # noqa: PLC0415
    from offload.probe import measure_bandwidths  # noqa: PLC0415

    bw = measure_bandwidths(backend.layout, device, dtype, io_threads=io_threads)
    return ({"predicted_tps": predict_decode_tps(backend.plan, bw), "assumed_hit_rate": backend.plan.hit_rate,
             "probe_disk_parallel": bw.disk_parallel, "probe_cpu_expert": bw.cpu_expert},
            lambda hit: predict_decode_tps(at_hit_rate(backend.plan, hit), bw))


def replay_miss_gbs(path: Path, io_threads: int, top_k: int, seconds: float = 2.0) -> float:
    """The disk tier with the model's compute taken away: layer steps of top_k random experts leased through a
    store with a one-expert cache (nearly every use a miss), `io_threads` reads in flight, each expert released
    as it arrives (as the executor's kernel path does); GB/s of misses served."""
    import random  # noqa: PLC0415
    import time  # noqa: PLC0415
    from concurrent.futures import FIRST_COMPLETED, wait  # noqa: PLC0415

    from k2local.placement import layout_for  # noqa: PLC0415
    from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: PLC0415
    from offload.planner import staging_slots  # noqa: PLC0415
    from offload.probe import drop_page_cache  # noqa: PLC0415
    from offload.store import ExpertStore  # noqa: PLC0415

    layout = layout_for(open_checkpoint(path))
    store = ExpertStore(layout, n_slots=1, staging=staging_slots(top_k), io_threads=io_threads)
    rng = random.Random(5)
    drop_page_cache()
    try:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            layer = rng.choice(layout.moe_layers)
            pending = {store.lease((layer, e)) for e in rng.sample(range(layout.n_experts), top_k)}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result().release()
        return store.counters.miss_bytes / (time.perf_counter() - t0) / 1e9
    finally:
        store.close()


def raw_probe(path: Path, io_threads: int) -> Any:
    """offload.probe.measure_raw_disk on the model's expert files."""
    from k2local.placement import layout_for  # noqa: PLC0415
    from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: PLC0415
    from offload.probe import measure_raw_disk  # noqa: PLC0415

    return measure_raw_disk(layout_for(open_checkpoint(path)), in_flight=io_threads)


def print_disk_report(results: list[dict[str, Any]], raw: Any, replay: float | None = None) -> None:
    """Lines under the table: miss GB/s against the raw probe, hit rates, prefetch, planner vs measured."""
    if raw is not None and replay is not None:
        print(f"disk tier alone (misses through the store, no model compute): {replay:.2f} GB/s = "
              f"{replay / raw.best:.0%} of the raw probe's best")
    if raw is not None:
        print(f"raw disk probe (O_DIRECT, {raw.read_bytes / 1e6:.1f} MB reads at random offsets, page cache "
              f"{'dropped' if raw.dropped_caches else 'not dropped (not root)'}"
              f"{'' if raw.direct else ', O_DIRECT refused: page cache may serve'}): "
              + ", ".join(f"{g:.2f} GB/s with {d} in flight" for d, g in raw.by_depth)
              + f"; best {raw.best:.2f}")
    for r in results:
        if "miss_gbs" not in r:
            continue
        ratio = f" = {r['miss_gbs'] / raw.best:.0%} of the raw probe's best" if raw and raw.best else ""
        busy_rate = r["read_gbs"] / r["disk_busy"] if r["disk_busy"] else 0.0
        print(f"{r['mode']}: misses served at {r['miss_gbs']:.2f} GB/s{ratio} (all reads {r['read_gbs']:.2f} "
              f"GB/s, disk busy {r['disk_busy']:.0%} of decode, {busy_rate:.2f} GB/s while busy); "
              f"hit rate {r['hit_rate']:.1%} (cache alone {r['cache_hit_rate']:.1%} with "
              f"{r['cache_slots']} of {r['n_experts']} experts cached = {r['cache_slots'] / r['n_experts']:.1%}); "
              f"next-layer router guessed {r['prediction_accuracy']:.0%} of a step's experts, "
              f"{r['prefetch_precision']:.0%} of prefetches used")
        if "predicted_tps" in r:
            err = r["predicted_tps"] / r["decode_tps"] - 1
            print(f"  planner: predicted {r['predicted_tps']:.2f} tok/s assuming a {r['assumed_hit_rate']:.1%} hit "
                  f"rate; measured {r['decode_tps']:.2f} tok/s ({err:+.0%})")
        if "predicted_at_measured_tps" in r:
            err = r["predicted_at_measured_tps"] / r["decode_tps"] - 1
            print(f"  planner's cost model at the measured {r['hit_rate']:.1%} hit rate: "
                  f"{r['predicted_at_measured_tps']:.2f} tok/s ({err:+.0%})")


# ---------------------------------------------------------------------------------------------- memory cap
@dataclass
class MemoryCap:
    """A cgroup memory limit for child processes (v2 memory.max, or v1 memory.limit_in_bytes)."""

    path: Path
    version: int
    limit: int

    @classmethod
    def create(cls, limit_bytes: int, name: str = "k2local-bench") -> "MemoryCap":
        """A new cgroup under this process's own; OSError with the reason when the machine does not allow it."""
        root = Path("/sys/fs/cgroup")
        own = Path("/proc/self/cgroup").read_text().splitlines()
        if (root / "cgroup.controllers").exists():
            base = root / next(line.split("::", 1)[1].lstrip("/") for line in own if line.startswith("0::"))
            d, version = base / f"{name}-{os.getpid()}", 2
            d.mkdir()
            (d / "memory.max").write_text(str(limit_bytes))
            (d / "memory.swap.max").write_text("0") if (d / "memory.swap.max").exists() else None
        else:
            rel = next(line.split(":", 2)[2] for line in own if ":memory:" in line).lstrip("/")
            d, version = root / "memory" / rel / f"{name}-{os.getpid()}", 1
            d.mkdir()
            (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return cls(d, version, limit_bytes)

    def peak(self) -> int:
        f = self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        try:
            return int(f.read_text())
        except (OSError, ValueError):
            return 0

    def reset_peak(self) -> None:
        if self.version == 1:
            try:
                (self.path / "memory.max_usage_in_bytes").write_text("0")
            except OSError:
                pass

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        procs = self.path / "cgroup.procs"
        return subprocess.run(argv, preexec_fn=lambda: procs.write_text(str(os.getpid())), capture_output=True,
                              text=True, timeout=timeout)

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def capped_runs(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    """Rerun this bench as children under --mem-cap: k2local's disk mode in one, llama.cpp (mmap on) in another;
    their JSON results, each with the cgroup's peak memory."""
    from offload.probe import drop_page_cache  # noqa: PLC0415

    cap_bytes = int(args.mem_cap * (1 << 30))
    try:
        cap = MemoryCap.create(cap_bytes)
    except (OSError, StopIteration) as e:
        print(f"--mem-cap: cannot create a cgroup memory limit here ({e}); no capped runs", file=sys.stderr)
        return []
    base = [sys.executable, str(Path(__file__).resolve().parent / "decode.py")] + _strip(argv, ("--mem-cap",
                                                                                             "--modes"))
    out = []
    try:
        child = ["--json", "--capped-child", "--no-breakdown"]
        for label, extra in (("k2local", ["--modes", "disk", "--no-llama"] + child),
                             ("llama.cpp", ["--modes", ""] + child)):
            cap.reset_peak()
            drop_page_cache()  # cached GGUF pages charged to another cgroup would serve this child for free
            p = cap.run(base + extra, timeout=1800)
            peak = cap.peak()
            if p.returncode != 0:
                tail = (p.stderr or "").strip().splitlines()[-3:]
                out.append({"engine": label, "mode": f"under {args.mem_cap:g} GiB cap: failed (rc {p.returncode}"
                            f"{', killed by the memory limit' if p.returncode in (-9, 137) else ''}) "
                            + " | ".join(tail)})
                continue
            d = json.loads(p.stdout.strip().splitlines()[-1])
            for r in d["results"]:
                if r.get("engine") != label or "decode_tps" not in r:  # (other peers are not run capped)
                    continue
                r["mode"] = (f"{r['mode']}, under {args.mem_cap:g} GiB cgroup v{cap.version} cap, peak "
                             f"{peak / (1 << 20):.0f} MiB")
                r["cap_peak_bytes"] = peak
                out.append(r)
    finally:
        cap.remove()
    return out


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without `flags` and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out
