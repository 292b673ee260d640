"""Expert-kernel bandwidth benchmark: k2local's CPU kernels vs RAM read bandwidth vs llama.cpp.

What is measured (all in one run, same machine state):
  ram_read   RAM read bandwidth, best of torch `sum()` over a large tensor (as shared/tools/hw_probe.py
             does) and the kernels' own streaming-load probe, per thread count.
  k2 gemv    offload.kernels.qmatmul, T=1, one call per expert matrix (Kimi K2 shapes: gate/up
             [2048 x 7168], down [7168 x 2048]), over a working set far larger than the caches.
  k2 moe     offload.kernels.moe_experts, T=1, one call per "layer" of 8 experts (gate+up, SiLU*,
             down, weighted sum): the decode path.
  llama.cpp  the same expert bytes written into a tiny llama-architecture MoE GGUF (8 experts, all 8
             used, n_embd=7168, n_ff=2048, one 64-dim attention head, no vocab), loaded with
             llama-cpp-python (use_mmap=False, so weights sit in anonymous RAM like ours; llama.cpp
             repacks the types it can, e.g. Q4_K -> q4_K_8x8), timed as wall time of llama_decode of
             one token with n_threads = t.  One decode reads every expert of every layer once, i.e.
             exactly one pass of `k2 moe`; the attention/router/norm/output weights it also reads are
             counted in its bytes (about 1% of the total), time for their math is not subtracted.
  torch      torch's weight-only int8 GEMV (torch._weight_int8pack_mm, bf16 activations) on int8
             matrices of the same shape, as a second reference (GB/s of int8 bytes).
IQ types (Unsloth's UD-IQ1_S .. UD-IQ4_XS experts) get the same rows; their blocks are random bytes with sane fp16
scales (every grid index / sign pattern is valid), so both engines do the real lookups.  The grid types are
compute-bound on small core counts: compare 'k2 l3' (--cache-resident) with the RAM rows to see how far.
GB/s = weight bytes read / wall time, best of several passes after a warm-up pass.
Ratios: kernel GB/s / best RAM read GB/s of the run (%RAM), and / the median of the run's RAM probes at the
kernel's best thread count (%med: on a shared host the best probe can be a burst the kernels never saw);
k2 moe / llama.cpp at each one's best thread count.

Runs with numpy, torch, gguf and a C compiler; llama-cpp-python is optional.
  python bench/kernels.py            # default: ~2 GiB working set (capped at RAM/8), K-quants, Q8_0 and the IQ
                                     # types of Unsloth's Kimi K2 / DeepSeek GGUFs (IQ4_XS .. IQ1_S)
  python bench/kernels.py --quick    # CI-sized: 256 MiB, fewer passes
  python bench/kernels.py --prefetch 0,2048,8192,4096L2 --types Q4_K   # tune the prefetch distance
  python bench/kernels.py --cache-resident --threads 1   # compute ceiling: weights in L3, no RAM traffic
  python bench/kernels.py --cpu-time   # one thread, GB per CPU-second: robust when other jobs share the cores
'k2 l3' (--cache-resident) times T=1 qmatmul on one gate-shaped [2048 x 7168] and one down-shaped
[7168 x 2048] matrix (2.3-7.6 MiB each) that stay in the last-level cache, so it measures instructions per
block rather than memory: on a noisy shared box it is the cleanest signal for kernel changes (pin with
taskset, take the best of a few runs).
'k2 gemv' pays one Python call + pool wake-up per 8 MB matrix; 'k2 moe' is the path decode uses.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402

from offload import kernels as K  # noqa: E402
from quant import random_blocks  # noqa: E402
from tests.peers import ik_llama  # noqa: E402
from tests.peers import llama_cpp as llama  # noqa: E402

HIDDEN, INTER, TOPK = 7168, 2048, 8
K2_WEIGHTS_PER_TOKEN = 8 * 60 * 3 * HIDDEN * INTER  # routed-expert weights read per decoded token


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def big_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """Anonymous, 2 MiB-aligned, transparent-huge-page-advised buffer (page-faulted in)."""
    m = mmap.mmap(-1, nbytes + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    a = np.frombuffer(m, dtype=np.uint8)
    off = (-a.ctypes.data) % (2 << 20)
    return m, a[off:off + nbytes]


def fill_random(a: np.ndarray, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    step = 64 << 20
    for i in range(0, a.size, step):
        n = min(step, a.size - i)
        a[i:i + n] = np.frombuffer(rng.bytes(n), dtype=np.uint8)


def set_scales(a: np.ndarray, qt: Q) -> None:
    """Give every block of the flat buffer the fp16 super-block scale(s) 0.01 (quants stay random: valid for every
    type)."""
    nbytes = GGML_QUANT_SIZES[qt][1]
    random_blocks.set_scales(a[: a.size // nbytes * nbytes].reshape(-1, nbytes), qt, 0.01)


class Experts:
    """n_layers x 3 x 8 expert matrices in one buffer, laid out like GGUF *_exps tensors."""

    def __init__(self, buf: np.ndarray, qt: Q, n_layers: int):
        self.qt, self.n_layers = qt, n_layers
        self.rb_h = K.row_bytes(int(qt), HIDDEN)
        self.rb_i = K.row_bytes(int(qt), INTER)
        self.mat_h = INTER * self.rb_h  # gate/up matrix bytes
        self.mat_i = HIDDEN * self.rb_i  # down matrix bytes
        self.layer_bytes = TOPK * (2 * self.mat_h + self.mat_i)
        self.nbytes = n_layers * self.layer_bytes
        self.buf = buf[: self.nbytes]
        set_scales(self.buf, qt)
        self.layers = []
        for l in range(n_layers):
            base = l * self.layer_bytes
            g = self.buf[base: base + TOPK * self.mat_h].reshape(TOPK, INTER, self.rb_h)
            u = self.buf[base + TOPK * self.mat_h: base + 2 * TOPK * self.mat_h].reshape(TOPK, INTER, self.rb_h)
            d = self.buf[base + 2 * TOPK * self.mat_h: base + self.layer_bytes].reshape(TOPK, HIDDEN, self.rb_i)
            self.layers.append((g, u, d))

    @staticmethod
    def layers_for(qt: Q, budget: int) -> int:
        rb_h, rb_i = K.row_bytes(int(qt), HIDDEN), K.row_bytes(int(qt), INTER)
        return max(1, budget // (TOPK * (2 * INTER * rb_h + HIDDEN * rb_i)))


def bench_cache_resident(types: list[Q], threads: list[int], passes: int) -> dict[str, dict[int, float]]:
    """GB/s of T=1 qmatmul with the weights resident in cache (one gate- and one down-shaped matrix, each
    called `reps` times back to back): the kernels' compute ceiling."""
    out: dict[str, dict[int, float]] = {}
    rng = np.random.default_rng(0)
    for qt in types:
        mats = []
        for rows, cols in ((INTER, HIDDEN), (HIDDEN, INTER)):
            w = rng.integers(0, 256, (rows, K.row_bytes(int(qt), cols)), dtype=np.uint8)
            set_scales(w.reshape(-1), qt)
            mats.append((torch.from_numpy(w), cols, torch.randn(1, cols), torch.empty(1, rows)))
        nbytes = sum(m[0].numel() for m in mats)
        reps = 20

        def run():
            for w, cols, x, y in mats:
                for _ in range(reps):
                    K.qmatmul(x, w, int(qt), cols, out=y)

        out[qt.name] = {}
        for th in threads:
            K.set_threads(th)
            out[qt.name][th] = nbytes * reps / best_time(run, max(passes, 5)) / 1e9
        log(f"  {qt.name} cache-resident: " + ", ".join(f"t={t} {v:.1f} GB/s" for t, v in out[qt.name].items()))
    return out


# what the kernel timings are measured with: wall time, or (--cpu-time) the process's CPU time, which on a box
# shared with other jobs gives what one idle core would do (single-thread runs only: threads spinning while they
# wait would count too).  RAM bandwidth is always wall time.
CLOCK = time.perf_counter


def best_time(fn, passes: int, clock=None) -> float:
    clock = clock or CLOCK
    fn()  # warm-up
    best = float("inf")
    for _ in range(passes):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def keep_best(best: dict, new: dict) -> None:
    """Merge nested {name: {threads: GB/s}} results (or {threads: {name: GB/s}}), keeping the larger values."""
    for k, v in new.items():
        if isinstance(v, dict):
            keep_best(best.setdefault(k, {}), v)
        elif v is not None:
            best[k] = max(best.get(k) or 0.0, v)
        else:
            best.setdefault(k, None)


def bench_ram(buf: np.ndarray, threads: list[int], passes: int) -> dict[int, dict[str, float]]:
    out = {}
    t = torch.frombuffer(buf[: buf.size // 4 * 4], dtype=torch.float32)
    for th in threads:
        torch.set_num_threads(th)
        ts = best_time(lambda: t.sum(), passes, time.perf_counter)
        r = {"torch_sum": buf.size / ts / 1e9}
        if K.available():
            K.set_threads(th)
            r["k2_read"] = K.read_bandwidth(buf, reps=passes + 1)
        out[th] = r
        log(f"  ram read threads={th}: " + ", ".join(f"{k}={v:.1f} GB/s" for k, v in r.items()))
    return out


def bench_k2(ex: Experts, threads: list[int], passes: int, modes: tuple[str, ...] = ("gemv", "moe"),
             tokens: int = 1) -> dict[str, dict[int, float]]:
    """GB/s of expert bytes per pass; `tokens` rows of activations, each routed to all 8 experts of a layer."""
    qt = int(ex.qt)
    x = torch.randn(tokens, HIDDEN)
    xi = torch.randn(tokens, INTER)
    y_h, y_i = torch.empty(tokens, INTER), torch.empty(tokens, HIDDEN)
    idx = np.tile(np.arange(TOPK, dtype=np.int32), (tokens, 1))
    wts = np.full((tokens, TOPK), 1.0 / TOPK, dtype=np.float32)
    moe_layers = [[(g[e], u[e], d[e]) for e in range(TOPK)] for g, u, d in ex.layers]
    out = torch.empty(tokens, HIDDEN)

    def gemv_pass():
        for g, u, d in ex.layers:
            for e in range(TOPK):
                K.qmatmul(x, g[e], qt, HIDDEN, out=y_h)
                K.qmatmul(x, u[e], qt, HIDDEN, out=y_h)
                K.qmatmul(xi, d[e], qt, INTER, out=y_i)

    def moe_pass():
        for experts in moe_layers:
            K.moe_experts(x, experts, qt, idx, wts, out=out)

    fns = {"gemv": gemv_pass, "moe": moe_pass}
    res: dict[str, dict[int, float]] = {f"k2 {m}": {} for m in modes}
    for th in threads:
        K.set_threads(th)
        for m in modes:
            res[f"k2 {m}"][th] = ex.nbytes / best_time(fns[m], passes) / 1e9
        log(f"  {ex.qt.name} threads={th}: " + ", ".join(f"{m} {res['k2 ' + m][th]:.1f} GB/s" for m in modes))
    return res


# ----------------------------------------------------------------------------- llama.cpp

def llama_cpp_module():
    if not llama.available():
        log(f"  {llama.describe()}; skipping llama.cpp")
        return None
    import llama_cpp  # noqa: PLC0415 - optional peer

    return llama_cpp


def write_gguf(path: str, ex: Experts) -> int:
    """Tiny llama-arch MoE GGUF around the benchmark's expert bytes; returns non-expert weight bytes."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(1)
    w = GGUFWriter(path, arch="llama")
    w.add_block_count(ex.n_layers)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_key_length(64)
    w.add_value_length(64)
    w.add_rope_dimension_count(64)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(TOPK)
    w.add_expert_used_count(TOPK)
    w.add_tokenizer_model("none")
    w.add_vocab_size(32)
    other = 0

    def add(name, arr, **kw):
        nonlocal other
        w.add_tensor(name, arr, **kw)
        if "exps" not in name and name != "token_embd.weight":
            other += arr.nbytes

    def small(*shape, dtype=np.float32):
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    add("token_embd.weight", small(32, HIDDEN))
    add("output_norm.weight", np.ones(HIDDEN, np.float32))
    add("output.weight", small(32, HIDDEN))
    for l, (g, u, d) in enumerate(ex.layers):
        p = f"blk.{l}."
        add(p + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        add(p + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
        for n, shape in (("attn_q", (64, HIDDEN)), ("attn_k", (64, HIDDEN)), ("attn_v", (64, HIDDEN)),
                         ("attn_output", (HIDDEN, 64))):
            add(p + n + ".weight", small(*shape, dtype=np.float16))
        add(p + "ffn_gate_inp.weight", small(TOPK, HIDDEN))
        add(p + "ffn_gate_exps.weight", g, raw_dtype=ex.qt)
        add(p + "ffn_up_exps.weight", u, raw_dtype=ex.qt)
        add(p + "ffn_down_exps.weight", d, raw_dtype=ex.qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return other


_BACKEND_UP: list[bool] = []


def bench_llama(ex: Experts, threads: list[int], passes: int, tmpdir: str, tokens: int = 1) -> dict[int, float] | None:
    """GB/s of model bytes per llama_decode of a batch of `tokens` tokens (each routed to all 8 experts)."""
    L = llama_cpp_module()
    if L is None:
        return None
    if not _BACKEND_UP:
        llama.silence_logs()
        L.llama_backend_init()
        _BACKEND_UP.append(True)
    fd, path = tempfile.mkstemp(suffix=".gguf", dir=tmpdir)
    os.close(fd)
    res: dict[int, float] = {}
    model = ctx = batch = None
    try:
        other = write_gguf(path, ex)
        mp = llama.model_params()  # extra buffer types off on CPUs where they abort (tests/peers/llama_cpp.py)
        mp.use_mmap = False
        model = L.llama_model_load_from_file(path.encode(), mp)
        os.unlink(path)
        if not model:
            log("  llama.cpp could not load the benchmark model")
            return None
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, max(8, tokens), max(8, tokens)
        cp.n_threads = cp.n_threads_batch = threads[0]
        ctx = L.llama_init_from_model(model, cp)
        mem = L.llama_get_memory(ctx)
        tok = (L.llama_token * 1)(3)
        nbytes = ex.nbytes + other
        step = [0]
        # a batch asking for every token's output: llama.cpp skips the last layer's FFN for tokens whose output is
        # not wanted, and this model's one layer per expert set is a last layer
        if tokens > 1:
            batch = L.llama_batch_init(tokens, 0, 1)
            batch.n_tokens = tokens
            for i in range(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = 3, i, 1, 1
                batch.seq_id[i][0] = 0

        def decode():
            if tokens > 1 or step[0] % 400 == 0:
                L.llama_memory_clear(mem, True)
            step[0] += 1
            if L.llama_decode(ctx, L.llama_batch_get_one(tok, 1) if batch is None else batch) != 0:
                raise RuntimeError("llama_decode failed")

        for th in threads:
            L.llama_set_n_threads(ctx, th, th)
            decode()
            res[th] = nbytes / best_time(decode, passes) / 1e9
            log(f"  llama.cpp {ex.qt.name} threads={th}: {res[th]:.1f} GB/s")
    finally:
        if batch is not None:
            L.llama_batch_free(batch)
        if ctx:
            L.llama_free(ctx)
        if model:
            L.llama_model_free(model)
        if os.path.exists(path):
            os.unlink(path)
    return res


# ----------------------------------------------------------------------------- ik_llama.cpp
IK_ROWS = tuple(f"ik_llama.cpp {c.label}" for c in ik_llama.CONFIGS)


def bench_ik(ex: Experts, threads: list[int], tmpdir: str, binary: Path | None, tokens: int = 1
             ) -> dict[str, dict[int, float]]:
    """ik_llama.cpp's llama-bench on bench_llama's GGUF, per configuration (IK_ROWS): GB/s of model bytes per
    decoded token (tokens 1: `-gp 0,8`, 8 tokens decoded from an empty cache) or per `tokens`-token prefill (`-p`).
    It runs as a subprocess with its own warm-up and repetitions (best of its 3 kept by llama-bench's mean)."""
    if binary is None:
        return {}
    fd, path = tempfile.mkstemp(suffix=".gguf", dir=tmpdir)
    os.close(fd)
    out: dict[str, dict[int, float]] = {}
    try:
        nbytes = ex.nbytes + write_gguf(path, ex)
        for cfg, name in zip(ik_llama.CONFIGS, IK_ROWS):
            for th in threads:
                try:
                    rows = ik_llama.bench(binary, path, th, [0 if tokens == 1 else tokens], 8 if tokens == 1 else 0,
                                          cfg, extra=("-mmp", "0"))
                except ik_llama.IkError as e:
                    log(f"  {name}: {e}")
                    break
                tok_s = rows[0].tok_s
                out.setdefault(name, {})[th] = nbytes * tok_s / tokens / 1e9
                log(f"  {name} {ex.qt.name} threads={th}: {out[name][th]:.1f} GB/s")
    finally:
        os.unlink(path)
    return out


# ----------------------------------------------------------------------------- torch reference

def bench_torch_int8(budget: int, threads: list[int], passes: int) -> dict[int, float] | None:
    if not hasattr(torch, "_weight_int8pack_mm"):
        return None
    n = max(2, budget // (INTER * HIDDEN))
    mats = [torch.randint(-127, 127, (INTER, HIDDEN), dtype=torch.int8) for _ in range(n)]
    s = torch.rand(INTER, dtype=torch.bfloat16)
    x = torch.randn(1, HIDDEN, dtype=torch.bfloat16)
    res = {}
    try:
        for th in threads:
            torch.set_num_threads(th)
            res[th] = n * INTER * HIDDEN / best_time(lambda: [torch._weight_int8pack_mm(x, m, s) for m in mats], passes) / 1e9
            log(f"  torch int8 threads={th}: {res[th]:.1f} GB/s")
    except RuntimeError as e:
        log(f"  torch int8 weight-only unavailable: {e}")
        return None
    return res


# ----------------------------------------------------------------------------- main

def thread_list(spec: str | None, n: int) -> list[int]:
    if spec == "all":
        return list(range(1, n + 1))
    if spec:
        return sorted({int(v) for v in spec.split(",") if int(v) > 0})
    ts = {1, 2, 4, n} | set(range(8, n + 1, 4))
    return sorted(t for t in ts if t <= n)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run: 256 MiB working set, 2 passes")
    ap.add_argument("--size-mb", type=int, help="expert working set per type (default: min(2048, RAM/8))")
    ap.add_argument("--types", default="Q4_K,Q3_K,Q2_K,Q8_0,IQ4_XS,IQ3_XXS,IQ2_XXS,IQ1_M,IQ1_S",
                    help="comma-separated ggml types")
    ap.add_argument("--threads", help="'all', or comma-separated counts (default 1,2,4,8,12,..,nproc)")
    ap.add_argument("--passes", type=int, help="timed passes per point (best is kept)")
    ap.add_argument("--no-llama", action="store_true", help="skip the peers (llama.cpp and ik_llama.cpp)")
    ap.add_argument("--ik-llama", help=f"ik_llama.cpp CPU build (dir, bin/ or llama-bench; default ${ik_llama.ENV})")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch int8 reference")
    ap.add_argument("--tmpdir", default=tempfile.gettempdir(), help="where the llama.cpp GGUF is written")
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--cache-resident", action="store_true",
                    help="also time the kernels on cache-resident weights ('k2 l3': compute ceiling, no RAM traffic)")
    ap.add_argument("--prefetch", help="tuning sweep instead of the comparison: comma-separated prefetch "
                                       "distances in bytes (suffix 'L2' for L2 prefetch), k2 moe only")
    ap.add_argument("--rounds", type=int, default=2,
                    help="per type, time k2 and llama.cpp this many times in turns (RAM re-probed between rounds) "
                         "and keep the best of each: a shared box's bursts then hit both sides alike")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time kernels by process CPU time, not wall time (shared boxes; forces --threads 1)")
    a = ap.parse_args(argv)
    global CLOCK
    if a.cpu_time:
        CLOCK, a.threads = time.process_time, "1"

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = thread_list(a.threads, ncpu)
    budget = (a.size_mb or (256 if a.quick else min(2048, total_ram() // 8 >> 20))) << 20
    passes = a.passes or (2 if a.quick else 3)
    types = [Q[t.strip()] for t in a.types.split(",") if t.strip()]
    log(f"k2local kernels: backend={K.backend()} isa={K.isa()} lib={K.library_path() if K.available() else None}")
    log(f"cpus={ncpu} physical={K.default_threads()} numa_nodes={K.numa_nodes()} threads={threads} "
        f"working set={budget >> 20} MiB/type passes={passes}")
    if not K.available():
        log(f"compiled kernels unavailable ({K.load_error()}); timing the torch fallback")

    result: dict = {"ik_llama": ik_llama.find(a.ik_llama), "isa": K.isa(), "cpus": ncpu, "clock": "cpu" if a.cpu_time else "wall", "threads": threads, "working_set_bytes": budget, "types": {}}
    sizes = {qt: Experts.layers_for(qt, budget) for qt in types}
    max_bytes = max(n * TOPK * (2 * INTER * K.row_bytes(int(qt), HIDDEN) + HIDDEN * K.row_bytes(int(qt), INTER))
                    for qt, n in sizes.items())
    _m, buf = big_buffer(max_bytes)
    t0 = time.perf_counter()
    fill_random(buf)
    log(f"filled {max_bytes >> 20} MiB in {time.perf_counter() - t0:.1f}s")

    log("RAM read bandwidth:")
    ram = bench_ram(buf, threads, passes)
    probes: dict[int, list[float]] = {th: [max(r.values())] for th, r in ram.items()}  # every probe, per thread count
    ram_best = max(max(r.values()) for r in ram.values())
    result["ram_read"] = ram
    result["ram_read_best"] = ram_best

    if a.prefetch:
        result["prefetch_sweep"] = sweep_prefetch(buf, types, sizes, threads, passes, a.prefetch.split(","), ram_best)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1, default=str))
        return result
    if not a.no_torch:
        result["torch_int8"] = bench_torch_int8(min(budget, 1 << 30), threads, passes)
    l3 = {}
    if a.cache_resident:
        log("cache-resident weights (compute ceiling):")
        l3 = bench_cache_resident(types, threads, passes)
    for qt in types:
        ex = Experts(buf, qt, sizes[qt])
        log(f"{qt.name}: {ex.n_layers} layers x 8 experts x 3 = {ex.nbytes / 1e9:.2f} GB")
        r: dict = {}
        for rnd in range(a.rounds):  # k2 and llama.cpp in turns, the RAM probe between: best of each kept
            if rnd:
                log(f"  round {rnd + 1} of {a.rounds}")
                again = bench_ram(buf, threads, passes)
                for th, rr in again.items():
                    probes[th].append(max(rr.values()))
                keep_best(ram, again)
            keep_best(r, bench_k2(ex, threads, passes))
            if not a.no_llama:
                keep_best(r, {"llama.cpp": bench_llama(ex, threads, passes, a.tmpdir)})
                keep_best(r, bench_ik(ex, threads, a.tmpdir, ik_llama.find(a.ik_llama)))
        if qt.name in l3:
            r["k2 l3"] = l3[qt.name]
        result["types"][qt.name] = {"bytes": ex.nbytes, **r}
    result["ram_read_best"] = max(max(r.values()) for r in ram.values())
    # on a shared host the best probe can be a burst the kernels never saw: the median probe is given beside it
    result["ram_read_median"] = {th: float(np.median(v)) for th, v in probes.items()}
    result["ram_read_probes"] = probes
    torch.set_num_threads(K.default_threads())
    report(result)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1, default=str))
    return result


def sweep_prefetch(buf, types, sizes, threads, passes, specs: list[str], ram_best: float) -> dict:
    """k2 moe GB/s for each prefetch setting (tuning aid)."""
    rows = []
    for qt in types:
        ex = Experts(buf, qt, sizes[qt])
        for spec in specs:
            l2 = spec.upper().endswith("L2")
            K.set_prefetch(int(spec.upper().removesuffix("L2")), l2)
            r = bench_k2(ex, threads, passes, ("moe",))["k2 moe"]
            rows.append((f"{qt.name} pf={spec}", r))
    K.set_prefetch(None)
    print(f"\n{'k2 moe GB/s':<18}" + "".join(f"{'t=' + str(t):>8}" for t in threads) + f"{'%RAM':>7}")
    for name, r in rows:
        print(f"{name:<18}" + "".join(f"{r[t]:8.1f}" for t in threads) + f"{100 * max(r.values()) / ram_best:6.0f}%")
    return {name: r for name, r in rows}


def report(res: dict) -> None:
    threads = res["threads"]
    ram_best = res["ram_read_best"]
    med = {int(k): v for k, v in res.get("ram_read_median", {}).items()}
    w = max(12, max(len(f"{t} {k}") for t, d in res["types"].items() for k in d) + 1)
    unit = "GB/cpu-s" if res.get("clock") == "cpu" else "GB/s"
    head = f"{unit:<{w}}" + "".join(f"{'t=' + str(t):>8}" for t in threads) + f"{'best':>8}{'%RAM':>7}{'%med':>7}"
    if med:
        print("\n%RAM: against the best RAM read probe of the run; %med: against the median probe at the same thread count ("
              + ", ".join(f"t={t} {v:.1f} GB/s of {len(res['ram_read_probes'][t])}" for t, v in sorted(med.items())) + ")")
    if res.get("clock") == "cpu":
        print("\n(kernel rows: bytes per CPU-second of one thread; ram rows: wall-time GB/s)")
    print("\n" + head)
    print("-" * len(head))

    def row(name: str, vals: dict | None) -> tuple[float, int] | None:
        if not vals:
            return None
        vals = {int(k): v for k, v in vals.items()}
        bt = max(vals, key=vals.get)
        pct = f"{'-':>7}" if name.endswith(" l3") else f"{100 * vals[bt] / ram_best:6.0f}%"  # no RAM traffic
        pmed = f"{100 * vals[bt] / med[bt]:6.0f}%" if bt in med and not name.endswith(" l3") else f"{'-':>7}"
        print(f"{name:<{w}}" + "".join(f"{vals[t]:8.1f}" if t in vals else f"{'-':>8}" for t in threads)
              + f"{vals[bt]:8.1f}" + pct + pmed)
        return vals[bt], bt

    for src in ("torch_sum", "k2_read"):
        row(f"ram {src}", {t: r[src] for t, r in res["ram_read"].items() if src in r})
    if res.get("torch_int8"):
        row("torch int8", res["torch_int8"])
    summary = []
    for tname, d in res["types"].items():
        best = {}
        for k in ("k2 gemv", "k2 moe", "k2 l3", "llama.cpp", *IK_ROWS):
            best[k] = row(f"{tname} {k}", d.get(k))
        moe, peer = best.get("k2 moe"), best.get("llama.cpp")
        line = (f"{tname}: k2 moe {moe[0]:.1f} GB/s @ {moe[1]} threads = {100 * moe[0] / ram_best:.0f}% of RAM read "
                f"({ram_best:.1f} GB/s)")
        if moe[1] in med:
            line += f", {100 * moe[0] / med[moe[1]]:.0f}% of the median probe at {moe[1]} threads ({med[moe[1]]:.1f})"
        if peer:
            line += f"; llama.cpp {peer[0]:.1f} GB/s @ {peer[1]} threads -> k2/llama.cpp = {moe[0] / peer[0]:.2f}x"
        for k in IK_ROWS:
            if best.get(k):
                line += f"; {k} {best[k][0]:.1f} GB/s -> {moe[0] / best[k][0]:.2f}x"
        gb_tok = K2_WEIGHTS_PER_TOKEN * K.row_bytes(int(Q[tname]), 256) / 256 / 1e9
        line += f"; Kimi K2 routed experts {gb_tok:.1f} GB/token -> {moe[0] / gb_tok:.2f} tok/s at this speed"
        summary.append(line)
    print()
    for line in summary:
        print(line)
    if any(d.get("llama.cpp") for d in res["types"].values()):
        print("peer:", llama.describe())
    print("peer:", ik_llama.describe(res.get("ik_llama"), max(threads)) if res.get("ik_llama") else ik_llama.NOT_FOUND)


if __name__ == "__main__":
    main()
