"""Decode / prefill benchmark: k2local's hybrid expert executor beside llama.cpp and ik_llama.cpp on the same GGUF.

    python bench/decode.py                       # synthetic Kimi-K2-shaped model (random weights), built once
    python bench/decode.py --shape k2deep --modes ram --prompt 64,512   # K2's 61 layers (10.6 GB at q4)
    python bench/decode.py --model DIR_OR_GGUF   # your checkpoint (a GGUF is needed for the peer columns)

For each k2local placement (--modes: experts in RAM, experts streamed from disk with a small RAM cache) it prints
prefill and decode tokens/s, the routed-expert bytes read per decoded token, the effective GB/s those bytes
imply, and that figure's ratio to the RAM read bandwidth measured in the same run; then the same model in
llama.cpp (llama-cpp-python, everything including experts on the CPU) and in ik_llama.cpp (its llama-bench, with
`-rtr 1` and with its defaults; --ik-llama DIR or $K2LOCAL_IK_LLAMA, see tests/peers/ik_llama.py) side by side, and
k2local's time per decoded token split into routed experts, dense/attention matrices, attention math and the rest.
Decode is timed after the prompt, at its depth (ik_llama.cpp: `-gp N,M`); several --prompt lengths give a summary.
Greedy tokens of k2local and llama.cpp are compared as a sanity check (random-weight models can diverge on near-ties
after a few tokens).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Torch's OpenMP workers otherwise spin after each op and steal the cores the expert kernels' own pool needs
# (measured on 16 cores: expert time per token 17 ms -> 3 ms). Must be set before torch is imported.
USER_OMP_WAIT = os.environ.get("OMP_WAIT_POLICY")  # the peers' children get the caller's setting, not ours
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: E402
from k2local.engine import LoadOptions  # noqa: E402
from k2local.model import KimiK2Model  # noqa: E402
from k2local.placement import build_backend, layout_for  # noqa: E402
from offload.probe import measure_ram_bandwidth  # noqa: E402
from offload import kernels  # noqa: E402
from tests.peers import ik_llama  # noqa: E402
from tests.peers import llama_cpp as llama  # noqa: E402
from bench.disk_tier import (DISK_SHAPES, add_disk_args, capped_runs, cold_stats_path, disk_fields,  # noqa: E402
                             disk_options, disk_ram_gib, first_run_hit_rates, gather_stats, planner_prediction,
                             print_disk_report, print_first_runs, raw_probe, replay_miss_gbs)

SHAPES = {
    # small: per-token fixed costs (Python, attention, small matmuls) weigh as much as expert bytes
    "small": dict(hidden_size=1024, intermediate_size=1408, moe_intermediate_size=512, num_hidden_layers=5,
                  n_routed_experts=32, num_experts_per_tok=8, num_attention_heads=8),
    # k2layer: Kimi K2's real per-layer shapes (hidden 7168, 64 heads, q/kv LoRA 1536/512, experts 2048 wide,
    # top-8 + 1 shared), 1 dense + 2 MoE layers, 24 experts per layer: expert bytes dominate as in the real model.
    # The dense layer is made as narrow as an expert so it does not outweigh 2 of K2's 61 layers.
    "k2layer": dict(hidden_size=7168, intermediate_size=2048, moe_intermediate_size=2048, num_hidden_layers=3,
                    n_routed_experts=24, num_experts_per_tok=8, num_attention_heads=64, q_lora_rank=1536,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
    # k2deep: Kimi K2's depth (61 layers, the first dense at its real width 18432) and per-layer attention (hidden
    # 7168, 64 heads, q/kv LoRA 1536/512) as in K2, so per-token costs that grow with depth show; the routed and shared
    # experts are 4x narrower (512) so that 8 routed (top-8) + 1 shared fit beside the attention in 10.6 GB at q4.
    # Written as random blocks straight into the GGUF (k2local.convert.random_gguf): quantizing a checkpoint this
    # size would take hours.
    "k2deep": dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=512, num_hidden_layers=61,
                   n_routed_experts=8, num_experts_per_tok=8, n_shared_experts=1, num_attention_heads=64,
                   q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
}
SHAPES.update(DISK_SHAPES)
# shapes written as random blocks (k2local.convert.random_gguf): whether their routers are then balanced
# (k2local.tiny.balance_gguf_routers; a disk-tier shape needs a trained model's spread of expert uses)
RANDOM_GGUF_SHAPES = {"k2deep": False, "diskwide": True}


def synthetic_model(workdir: Path, recipe: str, shape: str = "small", skew: float | None = None
                    ) -> tuple[Path, Path]:
    """A Kimi K2 layout checkpoint with SHAPES[shape] (FP8, random weights) and its GGUF; cached in workdir.
    skew: a copy of the GGUF whose routers' selection bias is Zipf-shaped with this exponent
    (k2local.tiny.skew_gguf_routers; the checkpoint returned is then the plain one)."""
    from k2local import tiny  # noqa: PLC0415
    from k2local.convert.to_gguf import convert  # noqa: PLC0415

    synth = SHAPES[shape]
    tag = "-".join(f"{v}" for v in synth.values())
    if shape in RANDOM_GGUF_SHAPES:
        return random_synthetic_model(workdir, recipe, shape, tag)
    hf = workdir / f"synth-{tag}"
    if not (hf / "model.safetensors.index.json").exists():
        print(f"building synthetic checkpoint {hf} ...", file=sys.stderr)
        tiny.make_tiny(hf, "kimi_k2", shards=4, overrides=synth)
    gguf = workdir / f"synth-{tag}-{recipe}.gguf"
    if not gguf.exists():
        print(f"converting to {gguf} ({recipe}) ...", file=sys.stderr)
        convert(hf, gguf, recipe)
    if skew is not None:
        skewed = workdir / f"synth-{tag}-{recipe}-zipf{skew:g}.gguf"
        if not skewed.exists():
            tiny.skew_gguf_routers(gguf, skewed, skew)
        gguf = skewed
    return hf, gguf


def random_synthetic_model(workdir: Path, recipe: str, shape: str, tag: str) -> tuple[Path, Path]:
    """SHAPES[shape] as a GGUF of random blocks (no checkpoint); cached in workdir. Returns (tokenizer dir, GGUF)."""
    from k2local import tiny  # noqa: PLC0415
    from k2local.convert.random_gguf import write_random_gguf  # noqa: PLC0415

    tok = workdir / f"synth-{shape}-tokenizer"
    cfg = tiny.write_config(tok, "kimi_k2", SHAPES[shape])
    balance = RANDOM_GGUF_SHAPES[shape]
    gguf = workdir / f"synth-{tag}-{recipe}-random{'-balanced' if balance else ''}.gguf"
    if not gguf.exists():
        print(f"writing {gguf} (random {recipe} blocks) ...", file=sys.stderr)
        part = gguf.with_name(gguf.name + ".part")
        write_random_gguf(part, cfg, tok, recipe)
        if balance:  # calibrated on other tokens than the bench's prompts
            calib = torch.randint(0, cfg.vocab_size, (256,), generator=torch.Generator().manual_seed(99)).tolist()
            shares = tiny.balance_gguf_routers(part, calib)
            print("routers balanced: the 8 most used experts take " + ", ".join(f"{s:.0%}" for s in shares)
                  + " of each MoE layer's uses", file=sys.stderr)
        part.replace(gguf)
    return tok, gguf


def prompt_ids(n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, min(vocab, 1000), (n,), generator=g).tolist()


Runner = Callable[[], dict]


def prefill(model: KimiK2Model, ids: list[int], cache, chunk: int) -> torch.Tensor:
    """The prompt in chunks of `chunk` tokens (0: one call), as k2local.generate.Generator runs it; last logits."""
    step = chunk or len(ids)
    for a in range(0, len(ids), step):
        lg = model.forward(ids[a:a + step], cache, pos=a, last_only=True)
    return lg[-1]


class Sections:
    """Exclusive wall time per named section of nested calls (a section's time excludes the sections it calls)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, time spent in children]

    def wrap(self, fn: Callable, name: str) -> Callable:
        def timed(*a, **kw):
            self._stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*a, **kw)
            finally:
                nm, t0, child = self._stack.pop()
                dt = time.perf_counter() - t0
                self.seconds[nm] = self.seconds.get(nm, 0.0) + dt - child
                if self._stack:
                    self._stack[-1][2] += dt

        return timed


BREAKDOWN = (("routed experts", "experts"), ("dense/attention matrices", "matrices"),
             ("attention (MLA k_b, scores, softmax, v_b; norms, rope)", "attention"), ("norms, rope, router, Python, torch "
                                                                        "(the rest)", "rest"))


def decode_breakdown(model: KimiK2Model, ids: list[int], tokens: int, chunk: int) -> dict[str, float]:
    """Seconds per decoded token by BREAKDOWN category, after prefilling `ids`, with timers around every matrix
    (k2local.model.linear and MLA's per-head k_b / v_b), the routed-expert call and the attention method; also the
    token's time with and without the timers ('total', 'untimed'). Attention math = _attention less its matrices."""
    import k2local.model as km  # noqa: PLC0415

    cache = model.new_cache()
    tok = int(prefill(model, ids, cache, chunk).argmax())
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(model.forward([tok], cache)[-1].argmax())
    untimed = (time.perf_counter() - t0) / tokens
    cache.truncate(len(ids))
    sec = Sections()
    saved = (km.linear, model.experts, type(model)._attention, [(lw.uk_q, lw.uv_q) for lw in model.layers])
    experts = model.experts
    read = [0]

    def counted(x, w):
        read[0] += w.nbytes if hasattr(w, "nbytes") else w.numel() * w.element_size()
        return saved[0](x, w)

    km.linear = sec.wrap(counted, "matrices")
    model.experts = type("TimedExperts", (), {"forward": staticmethod(sec.wrap(experts.forward, "experts"))})()
    model._attention = sec.wrap(functools.partial(type(model)._attention, model), "attention")
    for lw in model.layers:  # k_b / v_b are matrices of their own unless one kernel call does all of MLA
        if lw.uk_q is not None and not (lw.mla is not None and lw.mla.fused()):
            read[0] += tokens * (lw.uk_q.w.nbytes + lw.uv_q.w.nbytes)
            lw.uk_q, lw.uv_q = sec.wrap(lw.uk_q, "matrices"), sec.wrap(lw.uv_q, "matrices")
    try:
        t0 = time.perf_counter()
        k0, _ = kernels.pool_time()
        for _ in range(tokens):
            tok = int(sec.wrap(lambda t: model.forward([t], cache)[-1].argmax(), "rest")(tok))
        total = (time.perf_counter() - t0) / tokens
        in_kernels = (kernels.pool_time()[0] - k0) / tokens
    finally:
        km.linear, model.experts = saved[0], saved[1]
        del model._attention
        for lw, (uk, uv) in zip(model.layers, saved[3]):
            lw.uk_q, lw.uv_q = uk, uv
    out = {k: v / tokens for k, v in sec.seconds.items()}
    out["total"], out["untimed"], out["in_kernels"] = total, untimed, in_kernels
    out["matrix_bytes"] = read[0] / tokens
    return out


def print_breakdown(b: dict[str, float], label: str, tokens: int) -> None:
    total = b["total"]
    print(f"k2local ({label}): time per decoded token over {tokens} tokens, timers on: {1e3 * total:.1f} ms "
          f"({1 / total:.2f} tok/s; without timers {1e3 * b['untimed']:.1f} ms = {1 / b['untimed']:.2f} tok/s)")
    gbs = {"matrices": b["matrix_bytes"], "experts": b.get("expert_bytes", 0.0)}
    for what, key in BREAKDOWN:
        v = b.get(key, 0.0)
        rate = f"  {gbs[key] / 1e6:7.0f} MB at {gbs[key] / v / 1e9:5.1f} GB/s" if gbs.get(key) and v else ""
        print(f"  {what:<45} {1e3 * v:8.2f} ms  {100 * v / total:5.1f}%{rate}")
    if b.get("in_kernels"):  # every category above holds some Python / torch time around its kernel calls
        k = b["in_kernels"]
        print(f"  {'inside the kernels (all categories)':<45} {1e3 * k:8.2f} ms  {100 * k / total:5.1f}%; outside them "
              f"{1e3 * (total - k):.1f} ms")


def k2local_runner(path: Path, mode: str, args: argparse.Namespace, ids: list[int], stats: str | None = None,
                   note: str = "", save_stats: bool = False) -> tuple[Runner, Callable]:
    """Load k2local with experts in `mode`; returns (one timed prefill + decode, close).
    stats: disk mode's routing statistics file (None: a cold start), saved to on close if save_stats;
    note: added to the placement label."""
    source = open_checkpoint(path)
    device = torch.device("cpu" if args.cpu_only or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    extra: dict = {"save_routing_stats": False}
    if mode == "disk":
        extra = disk_options(args, stats or cold_stats_path(args.workdir), save_stats)
        # under --mem-cap without --disk-ram the planner sizes the cache to the cgroup's limit, as for a user
        ram = args.disk_ram if args.disk_ram is not None else None if args.capped_child else disk_ram_gib(
            source, args.disk_fraction, source.config.num_experts_per_tok)
    else:
        ram = None
    opts = LoadOptions(cpu_only=args.cpu_only, experts_on=mode, ram=ram, gpu_mem=args.gpu_mem, extra=extra,
                       max_context=max(1024, len(ids) + args.decode + 8))  # the KV cache the run needs
    backend = build_backend(source, opts, device, dtype)
    model = KimiK2Model(source, experts=backend, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.forward(ids[:4], model.new_cache(), last_only=True)  # warm-up
    plan = backend.plan
    label = f"experts in {mode}" + (f" ({plan.store_bytes / (1 << 20):.0f} MiB: {plan.store_slots} cached + "
                                    f"{plan.staging_slots} staging{note})" if mode == "disk" else "")
    probe = mode == "disk" and not args.capped_child  # a child under --mem-cap measures nothing extra
    predicted, predict_at = planner_prediction(backend, device, dtype, args.io_threads) if probe else ({}, None)

    def run() -> dict:
        cache = model.new_cache()
        backend.reset_stats()
        sync()
        t0 = time.perf_counter()
        lg = prefill(model, ids, cache, args.prefill_chunk)
        sync()
        prefill_s = time.perf_counter() - t0
        backend.reset_stats()
        toks = []
        t0 = time.perf_counter()
        for _ in range(args.decode):
            toks.append(int(lg.argmax()))
            lg = model.forward([toks[-1]], cache)[-1]
        sync()
        decode_s = time.perf_counter() - t0
        st = backend.stats()
        tiers = {k: f"{v['hit_rate']:.0%}" for k, v in st["tiers"].items()}
        return {"engine": "k2local", "mode": label, "device": str(device), "prefill_tps": len(ids) / prefill_s,
                "decode_tps": args.decode / decode_s, "expert_bytes_per_token": st["expert_bytes_per_token"],
                "tokens": toks, "hit_rates": tiers,
                "expert_s_per_token": st["timers"].get("forward_s", 0.0) / args.decode,
                "kernels": st["kernels"], "disk_read_bytes": st["tiers"].get("disk", {}).get("bytes_read", 0),
                **disk_fields(st, decode_s), **predicted,
                **({"predicted_at_measured_tps": predict_at(st["tiers"]["disk"]["hit_rate"])}
                   if predict_at and "disk" in st["tiers"] else {})}

    run.breakdown = lambda: (label, decode_breakdown(model, ids, args.decode, args.prefill_chunk))  # type: ignore[attr-defined]
    return run, backend.close


def peer_env() -> dict[str, str]:
    """The environment a peer's process gets: ours without the OMP_WAIT_POLICY this script set for k2local."""
    env = dict(os.environ)
    if USER_OMP_WAIT is None:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def llama_runner(gguf: Path, args: argparse.Namespace, ids: list[int]) -> tuple[Runner, Callable] | dict:
    """llama.cpp on the GGUF (everything on the CPU), each timed run in its own process: loaded in this one, its
    ggml threads and OpenMP runtime slowed k2local's timed runs beside it (k2layer, 512-token prompt, 2 cores:
    k2local prefill 139.8 tok/s alone, 79.6 with llama.cpp loaded; decode 20.2 vs 15.6)."""
    if not llama.available():
        return {"engine": "llama.cpp", "mode": "not installed (pip install llama-cpp-python)"}

    def run() -> dict:
        return llama.isolated("bench.decode:llama_timed", str(gguf), ids, args.decode, args.threads,
                              bool(args.capped_child), timeout=7200, env={"OMP_WAIT_POLICY": USER_OMP_WAIT})

    return run, lambda: None


def llama_timed(gguf: str, ids: list[int], decode: int, threads: int, capped: bool) -> dict:
    """One timed prefill of `ids` and `decode` greedy tokens in llama.cpp, loaded in this (child) process."""
    import numpy as np  # noqa: PLC0415
    import llama_cpp  # noqa: PLC0415 - optional peer

    # the YaRN betas llama.cpp does not read from the GGUF: without them its rope differs from the checkpoint's;
    # llama.load applies this CPU's extra-buffer-types setting (off where they abort, e.g. AMX CPUs)
    # under --mem-cap the consumer's llama.cpp: weights mmapped from the file (repacking would copy them into
    # anonymous memory, which a cap below the model's size kills)
    bufts = False if capped else None
    llm = llama.load(Path(gguf), extra_bufts=bufts, n_ctx=len(ids) + decode + 8, n_threads=threads,
                     n_threads_batch=threads, n_gpu_layers=0, n_batch=max(32, len(ids)), verbose=False,
                     **open_checkpoint(Path(gguf)).config.llama_cpp_overrides)
    repack = "repack on" if llama.config().extra_bufts and bufts is None else "repack OFF, mmap"
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))

    llm.eval(ids[:4])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    toks: list[int] = []
    t0 = time.perf_counter()
    for _ in range(decode):
        toks.append(int(last_logits().argmax()))
        llm.eval([toks[-1]])
    decode_s = time.perf_counter() - t0
    llm.close()
    return {"engine": "llama.cpp", "mode": f"all on CPU, {threads} threads, {repack}", "device": "cpu",
            "prefill_tps": len(ids) / prefill_s, "decode_tps": decode / decode_s, "tokens": toks,
            "hit_rates": {}, "kernels": "ggml"}


def ik_llama_runner(binary: Path, gguf: Path, config: ik_llama.IkConfig, args: argparse.Namespace
                    ) -> tuple[Runner, Callable]:
    """ik_llama.cpp's llama-bench on the same GGUF: one run per call (prefill of --prompt tokens, then --decode
    tokens at that depth, `-gp`); it loads the model itself each time, so nothing stays resident between calls."""

    def run() -> dict:
        rows = ik_llama.bench(binary, gguf, args.threads, [args.prompt], args.decode, config, reps=1,
                              env=peer_env())
        pp = next(r.tok_s for r in rows if r.gen == 0)
        tg = next((r.tok_s for r in rows if r.gen > 0), 0.0)
        return {"engine": "ik_llama.cpp", "mode": f"{config.label}, all on CPU, {args.threads} threads",
                "device": "cpu", "prefill_tps": pp, "decode_tps": tg, "hit_rates": {}, "kernels": "ggml+iqk"}

    return run, lambda: None


def ik_llama_engines(gguf: Path, args: argparse.Namespace) -> tuple[list[Callable[[], tuple[Runner, Callable]]],
                                                                     list[dict]]:
    """Loaders of the ik_llama.cpp configurations (ik_llama.CONFIGS), or a 'not found' row."""
    binary = ik_llama.find(args.ik_llama)
    if binary is None:
        return [], [{"engine": "ik_llama.cpp", "mode": "not found (see the peer line below)"}]
    return [lambda c=c: ik_llama_runner(binary, gguf, c, args) for c in ik_llama.CONFIGS], []


def best_of_rounds(runners: list[Runner], rounds: int) -> list[dict]:
    """Run every engine once per round, taking turns (a shared or throttling box then slows all of them alike),
    and keep each engine's best prefill and best decode speed over the rounds."""
    best: list[dict | None] = [None] * len(runners)
    for _ in range(rounds):
        for i, run in enumerate(runners):
            r = run()
            b = best[i]
            if b is None:
                best[i] = r
                continue
            b["prefill_tps"] = max(b["prefill_tps"], r["prefill_tps"])
            if r["decode_tps"] > b["decode_tps"]:
                best[i] = {**r, "prefill_tps": b["prefill_tps"]}
    return [b for b in best if b is not None]


def one_at_a_time(gguf: Path) -> bool:
    """Whether two engines holding this GGUF would not fit in RAM together (then each runs alone, memory freed)."""
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 2.2 * gguf.stat().st_size > avail


def run_engines(loaders: list[Callable[[], tuple[Runner, Callable] | dict]], rounds: int, sequential: bool,
                missing: list[dict], breakdown: bool = True) -> list[dict]:
    """Best of `rounds` per engine: all loaded and timed in turns, or (sequential) one loaded at a time. Engines
    with a `breakdown` (k2local) add one per decoded token (decode_breakdown) under the key 'breakdown'."""
    import gc  # noqa: PLC0415

    def add_breakdown(run: Runner, r: dict) -> None:
        if breakdown and hasattr(run, "breakdown"):
            r["breakdown"] = run.breakdown()[1]  # type: ignore[attr-defined]
            r["breakdown"]["expert_bytes"] = r.get("expert_bytes_per_token", 0.0)

    if not sequential:
        loaded = []
        for load in loaders:
            got = load()
            (missing.append if isinstance(got, dict) else loaded.append)(got)
        results = best_of_rounds([run for run, _ in loaded], rounds)
        for (run, close), r in zip(loaded, results):
            add_breakdown(run, r)
            close()
        return results + missing
    results = []
    for load in loaders:
        got = load()
        if isinstance(got, dict):
            missing.append(got)
            continue
        results += best_of_rounds([got[0]], rounds)
        add_breakdown(got[0], results[-1])
        got[1]()
        del got
        gc.collect()
    return results + missing


def print_ratios(ours: dict, peers: list[dict]) -> None:
    """k2local's prefill and decode over each peer row's, and over the best peer's."""
    for key, what in (("decode_tps", "decode"), ("prefill_tps", "prefill")):
        for p in peers:
            print(f"k2local ({ours['mode']}) / {p['engine']} ({p['mode']}) {what}: {ours[key] / p[key]:.2f}x "
                  f"({ours[key]:.1f} vs {p[key]:.1f} tok/s)")
        if len(peers) > 1:
            best = max(peers, key=lambda p: p[key])
            print(f"  best peer {what}: {best['engine']} ({best['mode']}): {ours[key] / best[key]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint dir or GGUF (default: a synthetic model)")
    ap.add_argument("--gguf", type=Path, help="GGUF for llama.cpp and k2local (default: --model if it is one)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("K2LOCAL_BENCH_DIR", "/tmp/k2local-bench")))
    ap.add_argument("--recipe", default="q4", help="quant recipe for the synthetic model's GGUF")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small", help="synthetic model shapes (see SHAPES)")
    ap.add_argument("--prompt", default="64", help="prompt tokens (prefill); comma-separated for several lengths, "
                                                  "e.g. 64,512,2048,8192 (decode is then timed at each depth)")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="k2local prefill chunk (the generator's default; llama-bench's -ub is 512 too); 0: one call")
    ap.add_argument("--decode", type=int, default=32, help="decoded tokens")
    ap.add_argument("--modes", default="ram,disk", help="k2local placements: ram, disk")
    ap.add_argument("--disk-fraction", type=float, default=0.25, help="disk mode: RAM cache as a share of experts")
    ap.add_argument("--disk-ram", type=float, default=None, help="disk mode: RAM cache in GiB (overrides fraction)")
    ap.add_argument("--gpu-mem", type=float, default=None)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-llama", action="store_true", help="skip mainline llama.cpp (llama-cpp-python)")
    ap.add_argument("--no-peers", action="store_true", help="skip every peer (llama.cpp and ik_llama.cpp)")
    ap.add_argument("--ik-llama", help=f"an ik_llama.cpp CPU build (dir, its bin/, or llama-bench; default ${ik_llama.ENV})")
    ap.add_argument("--no-breakdown", action="store_true", help="skip k2local's per-token time breakdown")
    ap.add_argument("--sequential", action="store_true",
                    help="load and time one engine at a time (default when two copies of the GGUF would not fit in RAM)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed runs per engine, taken in turns; the best prefill and decode of each are kept")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    add_disk_args(ap)
    args = ap.parse_args()
    try:
        args.prompts = [int(p) for p in args.prompt.split(",")]
    except ValueError:
        ap.error(f"--prompt: expected comma-separated token counts, got {args.prompt!r}")

    torch.set_num_threads(args.threads)
    try:
        from offload import kernels  # noqa: PLC0415

        kernels.set_threads(args.threads)
    except ImportError:
        pass
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        _, gguf = synthetic_model(args.workdir, args.recipe, args.shape, args.skew)
        path = gguf
    else:
        path = args.model
        gguf = args.gguf or (args.model if args.model.suffix == ".gguf" else None)
    ram_bw = measure_ram_bandwidth()
    summary = []
    for n in args.prompts:
        summary.append((n, bench_prompt(argparse.Namespace(**{**vars(args), "prompt": n}), path, gguf, ram_bw)))
    if len(summary) > 1 and not args.json:
        print_summary(summary)


def print_summary(summary: list[tuple[int, list[dict]]]) -> None:
    """One line per prompt length and engine: prefill and decode tok/s, and k2local's ratio to each."""
    print("\nsummary (decode after the prompt, at its depth):")
    print(f"{'prompt':>7}  {'engine':<50}{'prefill tok/s':>14}{'decode tok/s':>13}{'k2 pre x':>9}{'k2 dec x':>9}")
    for n, results in summary:
        rows = [r for r in results if "decode_tps" in r]
        ours = next((r for r in rows if r["engine"] == "k2local"), None)
        for r in rows:
            rp = f"{ours['prefill_tps'] / r['prefill_tps']:.2f}" if ours and r["prefill_tps"] else ""
            rd = f"{ours['decode_tps'] / r['decode_tps']:.2f}" if ours and r["decode_tps"] else ""
            print(f"{n:>7}  {(r['engine'] + ' ' + r['mode'])[:49]:<50}{r['prefill_tps']:>14.1f}"
                  f"{r['decode_tps']:>13.2f}{rp:>9}{rd:>9}")


def bench_prompt(args: argparse.Namespace, path: Path, gguf: Path | None, ram_bw: float) -> list[dict]:
    """Every engine at one prompt length (args.prompt); prints its table, breakdown and ratios; returns the rows."""
    vocab = open_checkpoint(path).config.vocab_size
    ids = prompt_ids(args.prompt, vocab)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    stats = str(args.routing_stats) if args.routing_stats else None
    loaders: list[Callable[[], tuple[Runner, Callable] | dict]] = [
        lambda m=m: k2local_runner(path, m, args, ids, stats=stats) for m in modes]
    first_runs = []
    if "disk" in modes and args.stats_compare:
        saved = gather_stats(k2local_runner, path, args, vocab)
        first_runs = first_run_hit_rates(k2local_runner, path, args, ids, saved)
        loaders.append(lambda: k2local_runner(path, "disk", args, ids, stats=saved,
                                              note=", pre-warmed from saved stats"))
    probe = "disk" in modes and not args.capped_child
    raw = raw_probe(path, args.io_threads) if probe else None
    replay = replay_miss_gbs(path, args.io_threads, open_checkpoint(path).config.num_experts_per_tok) \
        if probe else None
    missing: list[dict] = []
    if gguf is not None and not args.no_peers:
        if not args.capped_child:  # under --mem-cap only k2local and llama.cpp run (ik's llama-bench inherits the cap)
            ik, absent = ik_llama_engines(gguf, args)
            loaders += ik
            missing += absent
        if not args.no_llama:
            loaders.append(lambda: llama_runner(gguf, args, ids))
    sequential = args.sequential or (gguf is not None and one_at_a_time(gguf))
    results = run_engines(loaders, args.rounds, sequential, missing, not args.no_breakdown)
    if args.mem_cap is not None:
        results += capped_runs(args, sys.argv[1:])
    for r in results:  # llama.cpp reads the same expert bytes per token
        r.setdefault("expert_bytes_per_token", results[0].get("expert_bytes_per_token", 0))
    for r in results:
        if "decode_tps" in r:
            r["effective_gbs"] = r["expert_bytes_per_token"] * r["decode_tps"] / 1e9
            r["ram_bw_ratio"] = r["effective_gbs"] / ram_bw if ram_bw else 0.0
    if args.json:
        peer = llama.describe() if gguf is not None and not (args.no_llama or args.no_peers) else None
        ik = ik_llama.describe(ik_llama.find(args.ik_llama), args.threads) if gguf is not None else None
        print(json.dumps({"ram_read_gbs": ram_bw, "model": str(path), "threads": args.threads, "results": results,
                          "llama_cpp": peer, "ik_llama_cpp": ik, "sequential": sequential,
                          "raw_disk": raw.__dict__ if raw is not None else None, "disk_tier_alone_gbs": replay}))
        return results
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    t = Table(caption="effective GB/s = expert bytes per token x decode tok/s (whole model); GB/s in expert code"
                      " = the same bytes over the time spent inside the expert executor only",
              title=f"{path.name}: prompt {args.prompt}, decode {args.decode} tokens, {args.threads} threads, best of "
                    f"{args.rounds} rounds "
                    f"{'(one engine loaded at a time)' if sequential else 'taken in turns'}; "
                    f"RAM read bandwidth measured now: {ram_bw:.1f} GB/s", title_justify="left")
    for c in ("engine", "placement", "prefill tok/s", "decode tok/s", "expert MB/token", "effective GB/s",
              "% of RAM BW", "GB/s in expert code", "hit rates"):
        t.add_column(c, justify="right" if "/" in c or "%" in c else "left")
    for r in results:
        if "decode_tps" not in r:
            t.add_row(r["engine"], r["mode"], "", "", "", "", "", "", "")
            continue
        ex = r.get("expert_s_per_token")
        in_experts = f"{r['expert_bytes_per_token'] / ex / 1e9:.2f}" if ex else ""
        t.add_row(r["engine"], f"{r['mode']} [{r['kernels']}]", f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.2f}",
                  f"{r['expert_bytes_per_token'] / 1e6:.1f}", f"{r['effective_gbs']:.2f}",
                  f"{100 * r['ram_bw_ratio']:.1f}%", in_experts, " ".join(f"{k} {v}" for k, v in r["hit_rates"].items()))
    Console(width=max(140, Console().width)).print(t)
    if gguf is not None and not args.no_peers:
        if not args.no_llama:
            print("peer:", llama.describe())
        print("peer:", ik_llama.describe(ik_llama.find(args.ik_llama), args.threads))
    for r in results:
        if "breakdown" in r:
            print_breakdown(r["breakdown"], r["mode"], args.decode)
    print_disk_report(results, raw, replay)
    print_first_runs(first_runs)
    ours = [r for r in results if r["engine"] == "k2local" and "tokens" in r]
    theirs = [r for r in results if r["engine"] == "llama.cpp" and "tokens" in r]
    if ours and theirs:
        a, b = ours[0]["tokens"], theirs[0]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        print(f"greedy tokens: k2local and llama.cpp agree on the first {same} of {len(a)}")
    if ours:
        print_ratios(ours[0], [r for r in results if r["engine"] != "k2local" and "decode_tps" in r])
    capped = {r["engine"]: r for r in results if "cap_peak_bytes" in r and "decode_tps" in r}
    if {"k2local", "llama.cpp"} <= capped.keys():
        k, l = capped["k2local"], capped["llama.cpp"]
        print(f"under the same --mem-cap {args.mem_cap:g} GiB: k2local decode {k['decode_tps']:.2f} tok/s vs "
              f"llama.cpp {l['decode_tps']:.2f} = {k['decode_tps'] / l['decode_tps']:.2f}x; prefill "
              f"{k['prefill_tps']:.1f} vs {l['prefill_tps']:.1f} = {k['prefill_tps'] / l['prefill_tps']:.2f}x")
    if len(ours) > 1:
        print("k2local placements give the same tokens:", all(r["tokens"] == ours[0]["tokens"] for r in ours))

    return results


if __name__ == "__main__":
    main()
