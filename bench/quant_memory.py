"""Peak memory of `k2local quantize` at multi-GB scale: it must not grow with the model size.

Builds (or reuses, under --dir) synthetic FP8 checkpoints with Kimi K2's file layout (FP8 e4m3 + 128x128
weight_scale_inv, BF16 embeddings/head/router, F32 router bias, one shard per layer, index.json) of the requested
sizes, then for each runs `k2local quantize` in a child process and reports its memory, from /proc/PID/status:

  - baseline: RSS after the imports (torch, k2local), before any weight is read;
  - peak RSS (VmHWM, the kernel's exact high-water mark of anonymous + file-backed resident pages);
  - peak anonymous RSS and peak file-backed RSS (RssAnon / RssFile, sampled every few ms by a thread in the child,
    and by psutil from here); file-backed pages would be the mmap'd checkpoint, anonymous ones our buffers;
  - peak minus baseline, and peak / checkpoint size.

    python bench/quant_memory.py [--sizes 1,2] [--size-gb 4] [--recipe q4] [--dir /tmp/k2local-quant-memory]

The checkpoints are built from one k2local.tiny.make_tiny template (a dense and a MoE layer at the chosen widths)
whose MoE layer is repeated with row-rotated FP8 data, so building even 8 GB needs only ~2 GB of RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILD_VERSION = 1
# Widths of the synthetic model: hidden 2048, 64 experts of 768 -> 302 MB of FP8 expert weights per MoE layer.
WIDTHS = dict(hidden_size=2048, moe_intermediate_size=768, n_routed_experts=64, intermediate_size=4096,
              num_attention_heads=8, num_experts_per_tok=8)
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


# ------------------------------------------------------------------------------------------------ /proc helpers
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory lines of /proc/PID/status in bytes ({} once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in STATUS_KEYS:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


class Sampler(threading.Thread):
    """Keeps the maximum of each /proc/PID/status memory line, sampled every `interval` seconds."""

    def __init__(self, pid: int | str = "self", interval: float = 0.005):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak: dict[str, int] = {}
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            st = proc_status(self.pid)
            if not st and self.pid != "self":
                break
            for k, v in st.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self._halt.set()
        self.join()
        return self.peak


# ------------------------------------------------------------------------------------------- synthetic checkpoint
def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def moe_layer_bytes() -> int:
    w = WIDTHS
    return 3 * w["n_routed_experts"] * w["hidden_size"] * w["moe_intermediate_size"]


def build_checkpoint(root: Path, size_gb: float) -> Path:
    """A Kimi-K2-layout FP8 checkpoint of about `size_gb` GB under `root` (built once, then reused)."""
    import torch  # noqa: PLC0415
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    from k2local.tiny import make_tiny  # noqa: PLC0415

    n_moe = max(1, round(size_gb * 1e9 / moe_layer_bytes()))
    layers = n_moe + 1
    dest = root / f"k2-fp8-{layers}L-v{BUILD_VERSION}"
    if (dest / "model.safetensors.index.json").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    print(f"building {dest.name}: {layers} layers ({n_moe} MoE, {moe_layer_bytes() / 1e6:.0f} MB each) ...",
          flush=True)
    template = make_tiny(tmp / "template", "kimi_k2", shards=1,
                         overrides=dict(WIDTHS, num_hidden_layers=2, first_k_dense_replace=1))
    out = tmp / "ckpt"
    out.mkdir()
    for f in template.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    cfg = json.loads((template / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = load_file(str(next(template.glob("*.safetensors"))))
    shutil.rmtree(template)
    glob_names = [n for n in tensors if not n.startswith("model.layers.")]
    by_layer = {i: {n: t for n, t in tensors.items() if n.startswith(f"model.layers.{i}.")} for i in range(2)}
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(layers):
        fname = f"model-{i + 1}-of-{layers}.safetensors"
        src = by_layer[min(i, 1)]
        shard: dict[str, torch.Tensor] = {}
        for n, t in src.items():
            name = n.replace("model.layers.1.", f"model.layers.{i}.", 1) if i > 1 else n
            if i > 1 and t.dtype == torch.float8_e4m3fn:  # vary the data from layer to layer
                t = torch.roll(t.view(torch.uint8), shifts=i, dims=1).view(torch.float8_e4m3fn)
            shard[name] = t.contiguous()
        if i == 0:
            shard.update({n: tensors[n] for n in glob_names})
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for n, t in shard.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        shard.clear()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    out.rename(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"  built {_dir_size(dest) / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    return dest


# ----------------------------------------------------------------------------------------------------- the child
def child(args: list[str], report: Path) -> None:
    """Run `k2local quantize ARGS` in this process, writing memory figures to `report` (JSON)."""
    import torch  # noqa: F401, PLC0415

    import k2local.cli.quantize  # noqa: F401, PLC0415
    import k2local.convert.to_gguf  # noqa: F401, PLC0415
    from k2local.cli import main  # noqa: PLC0415

    base = proc_status()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    rc = 0
    try:
        main(["quantize", *args])
    except SystemExit as e:
        rc = int(e.code or 0) if not isinstance(e.code, str) else 1
    peak = sampler.stop()
    end = proc_status()
    report.write_text(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "baseline": base, "peak": peak,
                                  "end": end, "samples": sampler.samples}))


def measure(src: Path, out: Path, recipe: str, log: Path, threads: int | None) -> dict:
    """Convert `src` to `out` in a child process; its memory figures (see `child`) plus psutil's view."""
    import psutil  # noqa: PLC0415

    report = out.with_suffix(".mem.json")
    report.unlink(missing_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(report), "--", str(src), str(out),
           "--recipe", recipe, "--device", "cpu", "--force", "--split-max-size", "0"]
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        ps = psutil.Process(proc.pid)
        outside = Sampler(proc.pid, 0.05)
        outside.start()
        rss_psutil = 0
        while proc.poll() is None:
            try:
                rss_psutil = max(rss_psutil, ps.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
        outside.stop()
    if proc.returncode or not report.exists():
        raise SystemExit(f"k2local quantize failed (exit {proc.returncode}); see {log}")
    r = json.loads(report.read_text())
    if r["rc"]:
        raise SystemExit(f"k2local quantize failed (exit {r['rc']}); see {log}")
    r["psutil_peak_rss"] = rss_psutil
    r["outside_peak"] = outside.peak
    return r


# ---------------------------------------------------------------------------------------------------------- main
def _mb(n: float) -> str:
    return f"{n / 1e6:8.0f}"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[4:], Path(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/k2local-quant-memory", help="cache dir for checkpoints and outputs")
    ap.add_argument("--sizes", default="1,2", help="checkpoint sizes in GB (comma separated)")
    ap.add_argument("--size-gb", type=float, help="measure this size and twice it (overrides --sizes)")
    ap.add_argument("--recipe", default="q4")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the child")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF outputs")
    args = ap.parse_args()
    sizes = [args.size_gb, 2 * args.size_gb] if args.size_gb else [float(s) for s in args.sizes.split(",")]
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    need = sum(sizes) * 1e9 * 1.7
    if need > free:
        raise SystemExit(f"{root}: needs about {need / 1e9:.0f} GB free, has {free / 1e9:.0f} GB")
    rows = []
    for size in sizes:
        src = build_checkpoint(root, size)
        out = root / f"{src.name}-{args.recipe.replace(':', '_')}.gguf"
        print(f"quantizing {src.name} ({_dir_size(src) / 1e9:.2f} GB) with recipe {args.recipe} ...", flush=True)
        r = measure(src, out, args.recipe, root / f"{out.stem}.log", args.threads)
        r["ckpt"], r["out"] = _dir_size(src), out.stat().st_size
        if not args.keep:
            out.unlink()
        rows.append(r)
        b, p = r["baseline"], r["peak"]
        print(f"  {r['seconds']:.0f} s; peak RSS {p.get('VmHWM', 0) / 1e6:.0f} MB (anon {p.get('RssAnon', 0) / 1e6:.0f}"
              f", file {p.get('RssFile', 0) / 1e6:.0f}); after imports {b.get('VmRSS', 0) / 1e6:.0f} MB", flush=True)
    print("\nMB (1e6 bytes); peak = VmHWM (exact); anon/file peaks sampled every 5 ms in the child")
    print(f"{'checkpoint':>10} {'output':>8} {'seconds':>8} {'base RSS':>8} {'base anon':>9} {'peak RSS':>8} "
          f"{'peak anon':>9} {'peak file':>9} {'psutil':>8} {'peak-base':>9} {'anon-base':>9} {'peak/ckpt':>9}")
    for r in rows:
        b, p = r["baseline"], r["peak"]
        hwm = max(p.get("VmHWM", 0), r["end"].get("VmHWM", 0))
        print(f"{_mb(r['ckpt']):>10} {_mb(r['out'])} {r['seconds']:8.0f} {_mb(b['VmRSS'])} {_mb(b['RssAnon']):>9} "
              f"{_mb(hwm)} {_mb(p['RssAnon']):>9} {_mb(p['RssFile']):>9} {_mb(r['psutil_peak_rss'])} "
              f"{_mb(hwm - b['VmRSS']):>9} {_mb(p['RssAnon'] - b['RssAnon']):>9} {hwm / r['ckpt']:9.3f}")
    if len(rows) > 1:
        a, z = rows[0], rows[-1]
        growth = (max(z["peak"]["VmHWM"], z["end"].get("VmHWM", 0)) - max(a["peak"]["VmHWM"],
                                                                         a["end"].get("VmHWM", 0)))
        print(f"\ncheckpoint x{z['ckpt'] / a['ckpt']:.2f}: peak RSS changed by {growth / 1e6:+.0f} MB, peak anon by "
              f"{(z['peak']['RssAnon'] - a['peak']['RssAnon']) / 1e6:+.0f} MB")


if __name__ == "__main__":
    main()
