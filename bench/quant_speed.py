"""Quantization speed of quant.codecs per GGUF type, against llama.cpp on the same tensors.

Builds an F32 llama-architecture GGUF of known size (one layer, default ~15M weights, about one Kimi K2
routed expert), then for each type:
  - times llama.cpp's llama_model_quantize on it (pure ftype, --threads threads), when llama_cpp is installed;
  - times our quantize() of the same tensors on the CPU the way `k2local quantize` runs it (--threads chunks at
    once, one torch thread each) and, if available, on CUDA;
  - single-threaded, on the same arrays: ggml_quantize_chunk (what llama-quantize runs per chunk of rows) against
    our quantize() with one worker and one torch thread. On a machine shared with other work this is the fair
    comparison: both get one core, measured back to back, best of --repeat runs;
  - on CUDA, also times a stack of Kimi K2 routed experts ([experts*2048, 7168], how a converter would call
    it; small tensors leave the GPU waiting on kernel launches);
and prints weights/second, our/llama.cpp ratios, and projected hours for Kimi K2 (routed experts at the
expert type, everything else at Q8_0).

    python bench/quant_speed.py [--types Q4_K,Q2_K] [--embd 1024] [--ff 2816] [--threads N] [--imatrix]
                                [--experts 8]
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant import codecs  # noqa: E402
from tests.peers import llama_cpp as llama  # noqa: E402

K2_EXPERT_WEIGHTS = 1.0e12  # routed experts
K2_OTHER_WEIGHTS = 0.03e12  # attention, shared experts, dense layers, embeddings, head
PURE_FTYPE = {T.Q8_0: 7, T.Q6_K: 18, T.Q5_K: 17, T.Q4_K: 15, T.Q3_K: 12, T.Q2_K: 10}


def build_gguf(path: Path, n_embd: int, n_ff: int, n_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One-layer llama F32 GGUF; returns its tensors by name."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output.weight": (n_vocab, n_embd)}
    for t in ["attn_q", "attn_k", "attn_v", "attn_output"]:
        shapes[f"blk.0.{t}.weight"] = (n_embd, n_embd)
    shapes["blk.0.ffn_gate.weight"] = (n_ff, n_embd)
    shapes["blk.0.ffn_up.weight"] = (n_ff, n_embd)
    shapes["blk.0.ffn_down.weight"] = (n_embd, n_ff)
    tensors = {name: (rng.standard_normal(s, dtype=np.float32) * 0.02) for name, s in shapes.items()}
    norms = {n: np.ones(n_embd, np.float32) for n in ["blk.0.attn_norm.weight", "blk.0.ffn_norm.weight",
                                                      "output_norm.weight"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_embd // 128)
    w.add_head_count_kv(n_embd // 128)
    w.add_rope_dimension_count(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)
    for name, data in {**tensors, **norms}.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def llama_cpp_speed(src: Path, qtype: T, n_weights: int, threads: int) -> float | None:
    """Weights/s of llama_model_quantize (pure ftype) on src, or None without llama_cpp."""
    if not llama.available():
        return None
    llama.silence_logs()
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "out.gguf"
        t0 = time.perf_counter()
        try:
            llama.quantize(str(src), str(dst), PURE_FTYPE[qtype], pure=True, nthread=threads)
        except RuntimeError:
            return None
        dt = time.perf_counter() - t0
        types = {T(t.tensor_type) for t in gguf.GGUFReader(str(dst)).tensors if len(t.shape) > 1}
    if types != {qtype}:
        print(f"  note: llama.cpp wrote {sorted(t.name for t in types)} for {qtype.name}")
    return n_weights / dt


def our_speed(tensors: dict[str, torch.Tensor], qtype: T, imatrix: bool, workers: int = 1,
              threads: int | None = None) -> float:
    """Weights/s of quant.codecs.quantize over all tensors (on their device; results land in host memory)."""
    n = sum(t.numel() for t in tensors.values())
    ims = {k: torch.rand(t.shape[1], device=t.device) + 0.1 for k, t in tensors.items()} if imatrix else {}
    if tensors and next(iter(tensors.values())).is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    kw = {"workers": workers} if "workers" in inspect.signature(codecs.quantize).parameters else {}  # older revs
    for name, t in tensors.items():
        codecs.quantize(t, qtype, imatrix=ims.get(name), threads=threads, **kw)
    return n / (time.perf_counter() - t0)


def ggml_chunk_fn():
    """llama.cpp's ggml_quantize_chunk (tests/peers/llama_cpp.py), or None without llama_cpp."""
    return llama.ggml_quantize_chunk() if llama.available() else None


def ggml_chunk_speed(fn, arrays: dict[str, np.ndarray], qtype: T) -> float:
    """Weights/s of ggml_quantize_chunk (one thread) over all arrays."""
    n = sum(a.size for a in arrays.values())
    outs = {k: np.empty((a.shape[0], codecs.bytes_per_row(qtype, a.shape[1])), np.uint8) for k, a in arrays.items()}
    t0 = time.perf_counter()
    for k, a in arrays.items():
        fn(int(qtype), a.ctypes.data, outs[k].ctypes.data, 0, a.shape[0], a.shape[1], None)
    return n / (time.perf_counter() - t0)


def expert_stack(n_experts: int) -> dict[str, torch.Tensor]:
    """Kimi K2 routed experts' gate/up projections stacked into one [n*2048, 7168] CUDA tensor."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return {"experts": torch.randn(n_experts * 2048, 7168, device="cuda", generator=g) * 0.02}


def hours(expert_speed: float, q8_speed: float) -> float:
    return (K2_EXPERT_WEIGHTS / expert_speed + K2_OTHER_WEIGHTS / q8_speed) / 3600


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q8_0,Q6_K,Q5_K,Q4_K,Q3_K,Q2_K")
    ap.add_argument("--embd", type=int, default=1024)
    ap.add_argument("--ff", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp threads")
    ap.add_argument("--imatrix", action="store_true", help="time the importance-weighted path (ours only)")
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--experts", type=int, default=8, help="K2 experts in the CUDA stack (0: skip)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs for the single-thread columns")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    types = [T[name] for name in args.types.split(",")]

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "bench-f32.gguf"
        arrays = build_gguf(src, args.embd, args.ff, args.vocab)
        n = sum(a.size for a in arrays.values())
        cpu = {k: torch.from_numpy(a) for k, a in arrays.items()}
        gpu = {} if args.no_cuda or not torch.cuda.is_available() else {k: t.cuda() for k, t in cpu.items()}
        dev = torch.cuda.get_device_name() if gpu else "none"
        print(f"{n / 1e6:.1f}M weights in {len(arrays)} tensors; CPU threads {args.threads}; CUDA: {dev}; "
              f"imatrix: {args.imatrix}")
        if gpu:  # warm up kernels
            codecs.quantize(next(iter(gpu.values()))[:8], T.Q4_K)
        stack = expert_stack(args.experts) if gpu and args.experts else {}
        if stack:
            print(f"CUDA expert stack: {args.experts} K2 experts, {stack['experts'].numel() / 1e6:.0f}M weights")
        rows, single = [], []
        chunk_fn = ggml_chunk_fn()
        for qtype in types:
            ref = None if args.imatrix else llama_cpp_speed(src, qtype, n, args.threads)
            ours_cpu = our_speed(cpu, qtype, args.imatrix, workers=args.threads, threads=1)
            ours_gpu = our_speed(gpu, qtype, args.imatrix) if gpu else None
            ours_stack = our_speed(stack, qtype, args.imatrix) if stack else None
            rows.append((qtype, ours_cpu, ours_gpu, ours_stack, ref))
            if chunk_fn is not None and not args.imatrix:
                g1 = o1 = 0.0
                for _ in range(args.repeat):  # interleaved, so both see the same machine load
                    g1 = max(g1, ggml_chunk_speed(chunk_fn, arrays, qtype))
                    o1 = max(o1, our_speed(cpu, qtype, False, workers=1, threads=1))
                single.append((qtype, g1, o1))

        def fmt(v: float | None) -> str:
            return f"{v / 1e6:10.2f}" if v else "         -"

        def ratio(a: float | None, b: float | None) -> str:
            return f"{a / b:10.2f}" if a and b else "         -"

        print("M weights/s; ratios are ours / llama.cpp on the same tensors")
        print(f"{'type':6} {'llama.cpp':>10} {'ours CPU':>10} {'ours GPU':>10} {'GPU stack':>10}"
              f" {'CPU ratio':>10} {'GPU ratio':>10} {'stack ratio':>11}")
        for qtype, c, g, st, r in rows:
            print(f"{qtype.name:6} {fmt(r)} {fmt(c)} {fmt(g)} {fmt(st)} {ratio(c, r)} {ratio(g, r)} {ratio(st, r):>11}")
        if single:
            print("\none thread each (best of %d, interleaved): M weights/s" % args.repeat)
            print(f"{'type':6} {'ggml_quantize_chunk':>20} {'ours':>10} {'ratio':>8}")
            for qtype, g1, o1 in single:
                print(f"{qtype.name:6} {g1 / 1e6:20.2f} {o1 / 1e6:10.2f} {o1 / g1:8.2f}")
        speeds = {q: (c, st or g, r) for q, c, g, st, r in rows}
        if T.Q8_0 in speeds:
            print(f"\nKimi K2 projection ({K2_EXPERT_WEIGHTS:.2g} expert weights at the type, "
                  f"{K2_OTHER_WEIGHTS:.2g} others at Q8_0), hours:")
            q8 = speeds[T.Q8_0]
            for qtype, (c, g, r) in speeds.items():
                parts = [f"ours CPU {hours(c, q8[0]):8.1f}"]
                if g and q8[1]:
                    parts.append(f"ours CUDA {hours(g, q8[1]):8.2f}")
                if r and q8[2]:
                    parts.append(f"llama.cpp {hours(r, q8[2]):8.1f}")
                print(f"  experts {qtype.name:5}: " + "   ".join(parts))


if __name__ == "__main__":
    main()
