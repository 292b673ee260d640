"""Serving benchmark: aggregate and per-stream tokens/s and time to first token at 1/2/4/8 concurrent streams.

    python bench/serve.py                          # starts `k2local serve` (tiny model) on a loopback port
    python bench/serve.py --model DIR_OR_GGUF      # your checkpoint
    python bench/serve.py --url http://127.0.0.1:8000 --served-model-name NAME   # a server already running

Each stream is one streamed /v1/completions request (greedy, ignore_eos, --max-tokens tokens) with its own prompt
(no shared prefix, so no stream reuses another's KV cache). For N concurrent streams it prints: the time to first
token (min / median / max over the streams), per-stream decode tokens/s (tokens after the first over the time
after the first, median), and aggregate tokens/s (all streams' tokens over the wall time from the first request
to the last stream's end). Loopback only; every loop is bounded. The llama.cpp peer column is not run yet.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        cpu = m.group(1).strip() if m else "unknown CPU"
    except (OSError, subprocess.SubprocessError):
        cpu = "unknown CPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "k2local.cli", "serve", "--port", "0", "--parallel", str(args.parallel),
           "--max-context", str(args.max_context), "--log-level", "warning", "--served-model-name", "bench"]
    if args.model:
        cmd.insert(4, args.model)
    if args.cpu_only:
        cmd.append("--cpu-only")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.load_timeout
    assert proc.stderr is not None
    for line in proc.stderr:  # bounded: the server prints its address once loaded, or exits
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain
            return proc, m.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start: " + " ".join(cmd))


def one_stream(url: str, model: str, prompt: list[int], max_tokens: int, go: threading.Barrier,
               timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    go.wait()
    t0 = time.monotonic()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            if d["choices"] and first is None:
                first = time.monotonic()
    end = time.monotonic()
    first = first or end
    return {"start": t0, "ttft": first - t0, "end": end, "tokens": tokens,
            "decode_tps": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0}


def prompt(i: int, n: int, vocab: int) -> list[int]:
    return [(i * 7919 + k * 104729) % vocab for k in range(n)]


def run_level(url: str, model: str, n: int, args: argparse.Namespace) -> dict:
    go = threading.Barrier(n)
    with ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(one_stream, url, model, prompt(1000 * n + i, args.prompt_tokens, args.vocab),
                            args.max_tokens, go, args.timeout) for i in range(n)]
        res = [f.result(timeout=args.timeout) for f in futs]
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    ttft = sorted(r["ttft"] for r in res)
    return {"streams": n, "ttft_min": ttft[0], "ttft_median": statistics.median(ttft), "ttft_max": ttft[-1],
            "stream_tps": statistics.median(r["decode_tps"] for r in res),
            "aggregate_tps": sum(r["tokens"] for r in res) / wall, "tokens": sum(r["tokens"] for r in res),
            "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder or GGUF (default: the built-in tiny model)")
    ap.add_argument("--url", help="a running server (http://127.0.0.1:PORT); loopback only")
    ap.add_argument("--served-model-name", default="bench", help="with --url: the model id it serves")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--parallel", type=int, default=8, help="--parallel of the server started here")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for any one level")
    ap.add_argument("--load-timeout", type=float, default=1800.0)
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = ap.parse_args()

    proc = None
    if args.url:
        if not re.match(r"^http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?/?$", args.url):
            raise SystemExit("--url must be a loopback address")
        url, model = args.url.rstrip("/"), args.served_model_name
    else:
        proc, url = start_server(args)
        model = "bench"
    try:
        httpx.get(url + "/health", timeout=30).raise_for_status()
        health = httpx.get(url + "/health", timeout=30).json()
        # warm-up (first-call allocations), not measured
        run_level(url, model, 1, argparse.Namespace(**{**vars(args), "max_tokens": 4}))
        rows = [run_level(url, model, int(n), args) for n in args.streams.split(",")]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"machine: {machine()}")
    print(f"server: {url} model {args.model or 'tiny (built-in, random weights)'} parallel "
          f"{health.get('parallel', '?')}; {args.prompt_tokens}-token prompts, {args.max_tokens} tokens per stream")
    print(f"{'streams':>7} {'TTFT min':>9} {'median':>8} {'max':>8} {'tok/s/stream':>13} {'aggregate tok/s':>16}")
    for r in rows:
        print(f"{r['streams']:>7} {r['ttft_min']:>8.3f}s {r['ttft_median']:>7.3f}s {r['ttft_max']:>7.3f}s "
              f"{r['stream_tps']:>13.1f} {r['aggregate_tps']:>16.1f}")
    print("peer: not run (llama-server -np N column not implemented yet)")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
