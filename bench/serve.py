"""Serving benchmark: aggregate and per-stream tokens/s and time to first token at 1/2/4/8 concurrent streams,
k2local's server beside llama.cpp's (``llama-server -np N``) on the same GGUF, prompts and max tokens, in one run.

    python bench/serve.py                          # synthetic Kimi-K2-shaped GGUF (bench/decode.py "small", q4)
    python bench/serve.py --model MODEL.gguf       # your GGUF (a checkpoint folder: k2local only)
    python bench/serve.py --llama-server PATH      # that llama-server binary (mainline or ik_llama.cpp)
    python bench/serve.py --no-peer                # k2local only
    python bench/serve.py --url http://127.0.0.1:8000 --served-model-name NAME   # a server already running

The llama-server binary: --llama-server PATH, else $K2LOCAL_LLAMA_SERVER, else the one
bench/peers/build_llama_server.sh builds (CPU only, from the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp,
into ~/.cache/k2local/llama-server-0.3.36/bin/llama-server; about 10 minutes on 2 cores).

Each stream is one streamed /v1/completions request (greedy, ignore_eos, --max-tokens tokens) with its own prompt
of token ids (no shared prefix, so no stream reuses another's KV cache). Both servers are started once, with
--parallel / -np of the largest stream count, and stay loaded; each round runs every level on k2local, then on
llama-server (a shared or throttling machine then slows both alike), and each level keeps its best round by
aggregate tokens/s. For N concurrent streams it prints: the time to first token (min / median / max over the
streams), per-stream decode tokens/s (tokens after the first over the time after the first, median), aggregate
tokens/s (all streams' tokens over the wall time from the first request to the last stream's end), and for
k2local the rows per forward step its worker ran (/health's batch counters). Loopback only; every loop is
bounded.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_LLAMA_SERVER = Path.home() / ".cache" / "k2local" / "llama-server-0.3.36" / "bin" / "llama-server"
BUILD_HINT = "bench/peers/build_llama_server.sh (builds it from the llama-cpp-python 0.3.36 sdist, CPU only)"


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        cpu = m.group(1).strip() if m else "unknown CPU"
    except (OSError, subprocess.SubprocessError):
        cpu = "unknown CPU"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError):
        mem = 0.0
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.0f} GiB RAM"


@dataclass
class Server:
    """One server under test."""

    name: str
    url: str
    model: str  # the model id its requests name
    config: str  # how it was started (printed beside the numbers)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    rows: list[dict] = field(default_factory=list)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_k2local(args: argparse.Namespace, model: str | None) -> Server:
    cmd = [sys.executable, "-m", "k2local.cli", "serve", "--port", "0", "--parallel", str(args.parallel),
           "--max-context", str(args.max_context), "--log-level", "warning", "--served-model-name", "bench"]
    if model:
        cmd.insert(4, model)
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
            config = (f"k2local serve {model or '(tiny)'} --parallel {args.parallel} --max-context "
                      f"{args.max_context}{' --cpu-only' if args.cpu_only else ''} (torch "
                      f"{_torch_version()}, {os.cpu_count()} threads)")
            return Server("k2local", m.group(1), "bench", config, proc)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the k2local server did not start: " + " ".join(cmd))


def _torch_version() -> str:
    try:
        import torch  # noqa: PLC0415

        return torch.__version__
    except ImportError:
        return "?"


def llama_server_binary(args: argparse.Namespace) -> Path | None:
    """The llama-server to compare against, or None (the reason is printed)."""
    given = args.llama_server or os.environ.get("K2LOCAL_LLAMA_SERVER")
    path = Path(given).expanduser() if given else DEFAULT_LLAMA_SERVER
    if path.is_file() and os.access(path, os.X_OK):
        return path
    if given:
        raise SystemExit(f"--llama-server: {path} is not an executable file")
    print(f"peer: llama-server not found at {path}; build it with {BUILD_HINT}, or pass --llama-server PATH "
          f"(e.g. an ik_llama.cpp build)", file=sys.stderr)
    return None


def _llama_version(binary: Path) -> str:
    try:
        p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        m = re.search(r"version: (.+)", p.stdout + p.stderr)
        return m.group(1).strip() if m else "unknown version"
    except (OSError, subprocess.SubprocessError):
        return "unknown version"


def start_llama(args: argparse.Namespace, binary: Path, gguf: Path) -> Server:
    """llama-server -np N on the GGUF: everything on the CPU, the context split evenly between the N slots."""
    from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: PLC0415
    from tests.peers import llama_cpp as llama  # noqa: PLC0415

    port = _free_port()
    per_slot = args.prompt_tokens + args.max_tokens + 64
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(args.parallel),
           "-c", str(per_slot * args.parallel), "-t", str(args.threads), "-tb", str(args.threads), "-ngl", "0",
           "--alias", "bench"]
    # the YaRN betas llama.cpp's deepseek2 loader does not read from the GGUF (bench/decode.py passes the same)
    for k, v in open_checkpoint(gguf).config.llama_cpp_overrides.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    try:
        repack = llama.config().extra_bufts  # off where the extra buffer types abort (AMX CPUs)
    except llama.PeerUnavailable:
        repack = True
    if not repack:
        cmd.append("--no-repack")
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.load_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited ({proc.returncode}) before serving; its log ({log}):\n{_tail(log)}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                config = f"llama-server {_llama_version(binary)}: " + " ".join(cmd[1:])
                return Server("llama-server", url, "bench", config, proc, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"llama-server did not become ready in {args.load_timeout:.0f}s; log {log}:\n{_tail(log)}")


def one_stream(url: str, model: str, prompt: list[int], max_tokens: int, go: threading.Barrier,
               timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    go.wait()
    t0 = time.monotonic()
    first = None
    tokens = chunks = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                tokens = d["usage"]["completion_tokens"]
            elif d.get("timings", {}).get("predicted_n"):  # llama-server's own counters
                tokens = d["timings"]["predicted_n"]
            if d.get("choices") and d["choices"][0].get("text"):
                chunks += 1
                if first is None:
                    first = time.monotonic()
    end = time.monotonic()
    first = first or end
    tokens = tokens or chunks
    return {"start": t0, "ttft": first - t0, "end": end, "tokens": tokens,
            "decode_tps": (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0}


def prompt(i: int, n: int, vocab: int) -> list[int]:
    return [(i * 7919 + k * 104729) % vocab for k in range(n)]


def batch_counters(srv: Server) -> dict | None:
    try:
        return httpx.get(srv.url + "/health", timeout=30).json().get("batch")
    except (httpx.HTTPError, ValueError):
        return None


def run_level(srv: Server, n: int, args: argparse.Namespace, max_tokens: int | None = None) -> dict:
    before = batch_counters(srv)
    go = threading.Barrier(n)
    with ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(one_stream, srv.url, srv.model, prompt(1000 * n + i, args.prompt_tokens, args.vocab),
                            max_tokens or args.max_tokens, go, args.timeout) for i in range(n)]
        res = [f.result(timeout=args.timeout) for f in futs]
    after = batch_counters(srv)
    wall = max(r["end"] for r in res) - min(r["start"] for r in res)
    ttft = sorted(r["ttft"] for r in res)
    row = {"server": srv.name, "streams": n, "ttft_min": ttft[0], "ttft_median": statistics.median(ttft),
           "ttft_max": ttft[-1], "stream_tps": statistics.median(r["decode_tps"] for r in res),
           "aggregate_tps": sum(r["tokens"] for r in res) / wall, "tokens": sum(r["tokens"] for r in res),
           "wall_s": wall}
    if before and after and after["forwards"] > before["forwards"]:
        row["rows_per_step"] = (after["rows"] - before["rows"]) / (after["forwards"] - before["forwards"])
        row["seqs_per_step"] = (after["sequences"] - before["sequences"]) / (after["forwards"] - before["forwards"])
    return row


def default_model(args: argparse.Namespace) -> Path:
    """bench/decode.py's synthetic Kimi-K2-shaped GGUF (random weights; built once into --workdir)."""
    from bench.decode import synthetic_model  # noqa: PLC0415

    args.workdir.mkdir(parents=True, exist_ok=True)
    return synthetic_model(args.workdir, args.recipe, args.shape)[1]


def print_table(servers: list[Server], args: argparse.Namespace) -> None:
    print(f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens per stream, greedy, best of {args.rounds} "
          f"round(s) by aggregate tok/s")
    print(f"{'server':>12} {'streams':>7} {'TTFT min':>9} {'median':>8} {'max':>8} {'tok/s/stream':>13} "
          f"{'aggregate tok/s':>16} {'rows/step':>9}")
    for srv in servers:
        for r in srv.rows:
            rows = f"{r['rows_per_step']:>9.1f}" if "rows_per_step" in r else f"{'':>9}"
            print(f"{srv.name:>12} {r['streams']:>7} {r['ttft_min']:>8.3f}s {r['ttft_median']:>7.3f}s "
                  f"{r['ttft_max']:>7.3f}s {r['stream_tps']:>13.1f} {r['aggregate_tps']:>16.1f} {rows}")
    if len(servers) == 2 and servers[0].rows and servers[1].rows:
        a, b = servers
        print(f"ratio {a.name} / {b.name} (aggregate and per-stream tok/s: higher is better for {a.name}; "
              f"TTFT median: lower is better)")
        print(f"{'streams':>7} {'aggregate':>10} {'per-stream':>11} {'TTFT median':>12}")
        for x, y in zip(a.rows, b.rows):
            print(f"{x['streams']:>7} {x['aggregate_tps'] / y['aggregate_tps']:>9.2f}x "
                  f"{x['stream_tps'] / y['stream_tps'] if y['stream_tps'] else 0:>10.2f}x "
                  f"{x['ttft_median'] / y['ttft_median'] if y['ttft_median'] else 0:>11.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF or checkpoint folder (default: the synthetic model, see --shape)")
    ap.add_argument("--tiny", action="store_true", help="k2local's built-in tiny model (no peer column)")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("K2LOCAL_BENCH_DIR", "/tmp/k2local-bench")))
    ap.add_argument("--shape", default="small", help="synthetic model shapes (bench/decode.py SHAPES)")
    ap.add_argument("--recipe", default="q4", help="quant recipe of the synthetic model's GGUF")
    ap.add_argument("--url", help="a running k2local server (http://127.0.0.1:PORT); loopback only")
    ap.add_argument("--served-model-name", default="bench", help="with --url: the model id it serves")
    ap.add_argument("--llama-server", help="llama-server binary (mainline or ik_llama.cpp; default: "
                                           f"$K2LOCAL_LLAMA_SERVER, else {DEFAULT_LLAMA_SERVER})")
    ap.add_argument("--no-peer", action="store_true", help="skip the llama-server column")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--parallel", type=int, default=0, help="--parallel / -np of the servers (default: most streams)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=1000, help="prompt token ids are drawn below this")
    ap.add_argument("--max-context", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server -t / -tb")
    ap.add_argument("--rounds", type=int, default=1, help="runs of every level per server, taken in turns")
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for any one level")
    ap.add_argument("--load-timeout", type=float, default=1800.0)
    ap.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = ap.parse_args()
    levels = [int(n) for n in args.streams.split(",")]
    args.parallel = args.parallel or max(levels)

    servers: list[Server] = []
    try:
        if args.url:
            if not re.match(r"^http://(127\.\d+\.\d+\.\d+|localhost|\[::1\])(:\d+)?/?$", args.url):
                raise SystemExit("--url must be a loopback address")
            servers.append(Server("k2local", args.url.rstrip("/"), args.served_model_name, f"running at {args.url}"))
            model = args.model
        else:
            model = None if args.tiny else (args.model or str(default_model(args)))
            servers.append(start_k2local(args, model))
        binary = None if args.no_peer or args.tiny else llama_server_binary(args)
        if binary is not None:
            if model is None or not str(model).endswith(".gguf"):
                print("peer: not run (llama-server needs a GGUF: pass --model FILE.gguf)", file=sys.stderr)
            else:
                servers.append(start_llama(args, binary, Path(model)))
        for srv in servers:
            httpx.get(srv.url + "/health", timeout=30).raise_for_status()
            run_level(srv, 1, args, max_tokens=4)  # warm-up (first-call allocations), not measured
        best: dict[tuple[str, int], dict] = {}
        for _ in range(args.rounds):
            for n in levels:
                for srv in servers:
                    r = run_level(srv, n, args)
                    key = (srv.name, n)
                    if key not in best or r["aggregate_tps"] > best[key]["aggregate_tps"]:
                        best[key] = r
        for srv in servers:
            srv.rows = [best[(srv.name, n)] for n in levels]
    finally:
        for srv in servers:
            srv.stop()

    print(f"machine: {machine()}")
    print(f"model: {model or 'k2local built-in tiny (random weights)'}")
    for srv in servers:
        print(f"{srv.name}: {srv.config}")
    if len(servers) == 1 and not args.no_peer and not args.tiny:
        print("peer: not run (see above)")
    print_table(servers, args)
    if args.json:
        print(json.dumps([r for srv in servers for r in srv.rows]))


if __name__ == "__main__":
    main()
