"""Constrained decoding libraries side by side on Kimi K2's real tokenizer (163,840 ids), on this CPU.

    python bench/constrain.py [--tokenizer /work/shared/kimi_k2] [--rounds 5]

For llguidance, xgrammar and outlines-core it prints: tokenizer setup (once per process), grammar compile time of a
tool-call JSON schema (nested object, array, enum, integer), per-token mask computation time while walking a valid
arguments string token by token (mask + advance), and the cost of applying a mask to a 163,840-wide fp32 logits
tensor (k2local's apply_bitmask for every library; xgrammar's own CPU kernel beside it). Each per-token figure is
also given as a ratio to the tiny model's per-token forward time measured in the same run (the tiny random-weights
Kimi layout, 4 layers, hidden 512: a floor; a real K2 token costs far more, so real overheads are far smaller).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/decode.py: idle torch workers must not spin

import torch  # noqa: E402

from k2local.grammar.matcher import apply_bitmask  # noqa: E402
from k2local.tokenizer.tiktoken_bpe import load_tokenizer  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hours": {"type": "array", "items": {"type": "integer"}},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                  "required": ["lat", "lon"], "additionalProperties": False},
    },
    "required": ["city", "unit", "where"],
    "additionalProperties": False,
}
VALUE = {"city": "San Francisco, California", "unit": "celsius", "days": 3, "hours": [6, 12, 18],
         "where": {"lat": 37.7749, "lon": -122.4194}}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class Lib:
    """One library: setup(), compile() -> a fresh matcher, mask(matcher) -> int32 bitmask tensor, advance."""

    name = ""

    def setup(self, tok: Any) -> None: ...
    def compile(self) -> Any: ...
    def start(self, compiled: Any) -> Any: ...
    def mask(self, m: Any) -> torch.Tensor: ...
    def advance(self, m: Any, t: int) -> None: ...


class LLGuidance(Lib):
    name = "llguidance"

    def setup(self, tok: Any) -> None:
        import llguidance  # noqa: PLC0415

        from k2local.grammar.vocab import ll_tokenizer  # noqa: PLC0415
        self.llg, self.lt = llguidance, ll_tokenizer(tok)
        self.version = llguidance.get_version() if hasattr(llguidance, "get_version") else "?"

    def compile(self) -> Any:
        from k2local.grammar import json_grammar  # noqa: PLC0415
        m = self.llg.LLMatcher(self.lt, json_grammar(SCHEMA), log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def start(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def mask(self, m: Any) -> torch.Tensor:
        return torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)

    def advance(self, m: Any, t: int) -> None:
        assert m.consume_token(t)


class XGrammar(Lib):
    name = "xgrammar"

    def setup(self, tok: Any) -> None:
        import xgrammar as xgr  # noqa: PLC0415
        self.xgr = xgr
        vocab = [b"" if i in tok.special_ids else tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=sorted(tok.stop_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = tok.vocab_size

    def compile(self) -> Any:
        return self.compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))

    def start(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled), self.xgr.allocate_token_bitmask(1, self.vocab_size)

    def mask(self, m: Any) -> torch.Tensor:
        matcher, bm = m
        matcher.fill_next_token_bitmask(bm)
        return bm[0].clone()

    def advance(self, m: Any, t: int) -> None:
        assert m[0].accept_token(t)


class OutlinesCore(Lib):
    name = "outlines-core"

    def setup(self, tok: Any) -> None:
        import outlines_core as oc  # noqa: PLC0415
        from outlines_core.json_schema import build_regex_from_schema  # noqa: PLC0415
        self.oc = oc
        eos = min(tok.stop_ids)
        table: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            if i not in tok.special_ids:
                table.setdefault(tok.token_bytes(i), []).append(i)
        self.vocab = oc.Vocabulary(eos, table)
        self.regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r"[ ]?")
        self.vocab_size = tok.vocab_size

    def compile(self) -> Any:
        return self.oc.Index(self.regex, self.vocab)

    def start(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled), torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)

    def mask(self, m: Any) -> torch.Tensor:
        guide, bm = m
        guide.write_mask_into(bm.data_ptr(), bm.numel(), 4)
        return bm.clone()

    def advance(self, m: Any, t: int) -> None:
        m[0].advance(t, return_tokens=False)


def tiny_forward_s(rounds: int) -> float:
    """Per-token decode forward of the tiny Kimi-layout model (median over rounds of 32 tokens)."""
    from k2local.engine import Engine, LoadOptions  # noqa: PLC0415
    from k2local.tiny import default_tiny_path  # noqa: PLC0415
    eng = Engine.load(default_tiny_path(), LoadOptions(max_context=512))
    gen = eng.new_generator()
    times = []
    for _ in range(rounds):
        gen.reset()
        gen.prefill([1, 2, 3, 4])
        t = time.perf_counter()
        for p in range(32):
            gen.model.forward([5], gen.cache, pos=4 + p)
        times.append((time.perf_counter() - t) / 32)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="/work/shared/kimi_k2", help="directory with tiktoken.model")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core")
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(json.dumps(VALUE), allow_special=False) + [min(tok.stop_ids)]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"tokenizer: {args.tokenizer} (vocab {tok.vocab_size}); walk: {len(ids)} tokens of a valid argument "
          f"object; rounds {args.rounds}")
    fwd = tiny_forward_s(args.rounds)
    print(f"tiny model forward: {fwd * 1e3:.2f} ms/token (reference for the ratios)")
    logits = torch.randn(tok.vocab_size)
    from k2local.sampler import Sampler, SamplingParams  # noqa: PLC0415
    sampler = Sampler(SamplingParams(temperature=0.6, top_p=0.95, seed=0))
    t = time.perf_counter()
    for _ in range(20):
        sampler(logits)
    samp = (time.perf_counter() - t) / 20
    print(f"k2local Sampler alone (temperature 0.6, top_p 0.95, vocab {tok.vocab_size}): {samp * 1e6:.0f} us/token "
          f"({samp / fwd:.3f} x fwd)")
    libs = {c.name: c for c in (LLGuidance, XGrammar, OutlinesCore)}
    rows = []
    for name in args.libs.split(","):
        lib = libs[name]()
        setup_s, _ = timed(lambda: lib.setup(tok))
        compiles, per_tok, applies = [], [], []
        for _ in range(args.rounds):
            c_s, compiled = timed(lib.compile)
            compiles.append(c_s)
            m = lib.start(compiled)
            t = time.perf_counter()
            masks = []
            for i in ids:
                bm = lib.mask(m)
                assert (int(bm[i // 32]) >> (i % 32)) & 1, f"{name}: token {i} masked out"
                masks.append(bm)
                if i not in tok.stop_ids:
                    lib.advance(m, i)
            per_tok.append((time.perf_counter() - t) / len(ids))
            t = time.perf_counter()
            for bm in masks:
                apply_bitmask(logits, bm.numpy().tobytes())
            applies.append((time.perf_counter() - t) / len(masks))
        native = ""
        if name == "xgrammar":
            import xgrammar as xgr  # noqa: PLC0415
            bm = lib.xgr.allocate_token_bitmask(1, tok.vocab_size)
            lg = logits.unsqueeze(0).clone()
            t = time.perf_counter()
            for _ in range(50):
                xgr.apply_token_bitmask_inplace(lg, bm)
            native = f" (own CPU kernel {(time.perf_counter() - t) / 50 * 1e6:.0f} us)"
        rows.append((name, setup_s, statistics.median(compiles), statistics.median(per_tok),
                     statistics.median(applies), native))
        print(f"  {name} done", file=sys.stderr, flush=True)
    print(f"\n{'library':<14} {'setup s':>8} {'compile ms':>11} {'mask+advance us/tok':>20} {'x fwd':>7} "
          f"{'apply us':>9} {'x fwd':>7}")
    for name, setup_s, comp, pt, ap_s, native in rows:
        print(f"{name:<14} {setup_s:>8.2f} {comp * 1e3:>11.2f} {pt * 1e6:>20.0f} {pt / fwd:>7.3f} "
              f"{ap_s * 1e6:>9.0f} {ap_s / fwd:>7.3f}{native}")


if __name__ == "__main__":
    main()
