"""Quantization quality: our quantizer vs llama.cpp's (llama_model_quantize) on the same model, same types.

Writes an F32 GGUF of the model with our converter (the reference), then per type
  - ours:      k2local convert with recipe pure:TYPE (and, with --imatrix, using an imatrix we collect);
  - llama.cpp: llama_model_quantize(reference F32 GGUF, ftype for TYPE, pure=True) (same imatrix when given);
and the recipes (ours q4/q3/q2 vs llama.cpp Q4_K_M/Q3_K_M/Q2_K). Every file is run by k2local's forward on a
fixed prompt set; the table shows KL(reference || quantized) and top-1 agreement with the reference, size in
bits/weight, and how many tensors are byte-identical between the two quantizers.

    python bench/quant_quality.py [--model DIR] [--types Q4_K,Q3_K,Q2_K] [--prompts 8] [--len 48]
                                  [--imatrix] [--recipes] [--work DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: E402
from k2local.convert.to_gguf import convert  # noqa: E402
from k2local.model import KimiK2Model  # noqa: E402
from tests.peers import llama_cpp as llama  # noqa: E402

PURE_FTYPE = {"Q8_0": 7, "Q6_K": 18, "Q5_K": 17, "Q4_K": 15, "Q3_K": 12, "Q2_K": 10}
RECIPE_VS = [("q4", 15, "Q4_K_M"), ("q3", 12, "Q3_K_M"), ("q2", 10, "Q2_K")]
CALIBRATION = (
    "The quick brown fox jumps over the lazy dog. Kimi K2 is a mixture-of-experts language model with 384 "
    "experts per layer, of which eight are active for each token. Quantization stores each weight in a few bits; "
    "an importance matrix tells the quantizer which columns matter most. 1234567890 + 42 = ? Python: def f(x): "
    "return x * 2\n你好，世界！这是一个测试。\n"
) * 8


def prompts(tok, vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Fixed prompt set: half tokenized text, half random ids (deterministic)."""
    rng = np.random.default_rng(seed)
    text = tok.encode(CALIBRATION[::-1] + CALIBRATION, allow_special=False)
    out = []
    for i in range(n):
        if i % 2 == 0 and len(text) > length:
            s = int(rng.integers(0, len(text) - length))
            out.append(text[s:s + length])
        else:
            out.append(rng.integers(0, vocab, length).tolist())
    return out


@torch.inference_mode()
def logits_of(path: Path, ps: list[list[int]]) -> list[torch.Tensor]:
    m = KimiK2Model(open_checkpoint(path))
    return [m.forward(p, m.new_cache(len(p))).float() for p in ps]


def kl_top1(ref: list[torch.Tensor], got: list[torch.Tensor]) -> tuple[float, float]:
    kls, agree, n = 0.0, 0, 0
    for r, g in zip(ref, got):
        lp, lq = r.log_softmax(-1), g.log_softmax(-1)
        kls += (lp.exp() * (lp - lq)).sum(-1).sum().item()
        agree += (r.argmax(-1) == g.argmax(-1)).sum().item()
        n += r.shape[0]
    return kls / n, agree / n


def llama_quantize(src: Path, dst: Path, ftype: int, pure: bool, imatrix=None) -> None:
    """llama.cpp's quantizer (tests/peers/llama_cpp.py), with our importance matrix as {tensor: weights}."""
    weights = None if imatrix is None else {n: imatrix.weights(n) for n in sorted(imatrix.sums)}
    llama.quantize(str(src), str(dst), ftype, pure=pure, imatrix=weights)


def identical_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors with identical type and bytes, tensors) between two GGUFs."""
    sa, sb = open_checkpoint(a), open_checkpoint(b)
    same = 0
    for name, t in sa.tensors.items():
        u = sb.tensors.get(name)
        if u is not None and u.qtype == t.qtype and np.array_equal(sa._bytes(t), sb._bytes(u)):
            same += 1
    return same, len(sa.tensors)


def bpw(path: Path) -> float:
    s = open_checkpoint(path)
    return 8.0 * sum(t.nbytes for t in s.tensors.values()) / sum(int(np.prod(t.shape)) for t in s.tensors.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF checkpoint dir (default: the built-in tiny kimi_k2 checkpoint)")
    ap.add_argument("--types", default="Q4_K,Q3_K,Q2_K")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--len", type=int, default=48)
    ap.add_argument("--imatrix", action="store_true", help="also compare with an importance matrix")
    ap.add_argument("--recipes", action="store_true", help="also compare recipes q4/q3/q2 with Q4_K_M/Q3_K_M/Q2_K")
    ap.add_argument("--work", help="keep files in this directory")
    a = ap.parse_args()
    if not llama.available():
        sys.exit("llama-cpp-python is needed for the comparison (pip install -e .[test])")
    from k2local.engine import load_tokenizer_and_template  # noqa: PLC0415
    from k2local.convert.imatrix import IMatrix, collect  # noqa: PLC0415
    from k2local.tiny import default_tiny_path  # noqa: PLC0415

    model = Path(a.model) if a.model else default_tiny_path("kimi_k2")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="k2q-"))
    work.mkdir(parents=True, exist_ok=True)
    src = open_checkpoint(model)
    tok, _ = load_tokenizer_and_template(src)
    ps = prompts(tok, src.config.vocab_size, a.prompts, a.len)
    ref_path = work / "ref-f32.gguf"
    if not ref_path.exists():
        convert(model, ref_path, "f32")
    ref = logits_of(ref_path, ps)
    imat = None
    if a.imatrix:  # both quantizers get the same values: those of the saved file
        collect(model, CALIBRATION, ctx=128, dataset="bench calibration").save(work / "imatrix.gguf")
        imat = IMatrix.load(work / "imatrix.gguf")

    rows = []

    def run(label: str, ours_recipe: str, ftype: int, pure: bool, llama_label: str, im) -> None:
        tag = label.replace(":", "-") + ("-imat" if im is not None else "")
        ours, theirs = work / f"ours-{tag}.gguf", work / f"llama-{tag}.gguf"
        t0 = time.time()
        if not ours.exists():
            convert(model, ours, ours_recipe, imatrix=(work / "imatrix.gguf") if im is not None else None)
        t_ours = time.time() - t0
        t0 = time.time()
        if not theirs.exists():
            llama_quantize(ref_path, theirs, ftype, pure, im)
        t_llama = time.time() - t0
        ko, to = kl_top1(ref, logits_of(ours, ps))
        kl_, tl = kl_top1(ref, logits_of(theirs, ps))
        same, n = identical_tensors(ours, theirs)
        rows.append((label + (" +imatrix" if im is not None else ""), f"{ours_recipe}", bpw(ours), ko, to,
                     llama_label, bpw(theirs), kl_, tl, f"{same}/{n}", t_ours, t_llama))
        print(f"  done {rows[-1][0]}", file=sys.stderr, flush=True)

    for t in [x.strip().upper() for x in a.types.split(",") if x.strip()]:
        run(t, f"pure:{t}", PURE_FTYPE[t], True, f"pure {t}", None)
        if imat is not None:
            run(t, f"pure:{t}", PURE_FTYPE[t], True, f"pure {t}", imat)
    if a.recipes:
        for rec, ftype, name in RECIPE_VS:
            run(rec, rec, ftype, False, name, None)

    cfg = src.config
    print(f"\nmodel: {model} ({cfg.model_type}, {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts); "
          f"{len(ps)} prompts x {a.len} tokens; reference: F32 GGUF; forward: k2local")
    head = (f"{'type':<16}{'ours':>10}{'bpw':>6}{'KL':>10}{'top1':>7}   {'llama.cpp':<10}{'bpw':>6}{'KL':>10}"
            f"{'top1':>7}{'same bytes':>12}{'t ours':>8}{'t llama':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r[0]:<16}{r[1]:>10}{r[2]:>6.2f}{r[3]:>10.5f}{r[4]:>7.3f}   {r[5]:<10}{r[6]:>6.2f}{r[7]:>10.5f}"
              f"{r[8]:>7.3f}{r[9]:>12}{r[10]:>7.0f}s{r[11]:>7.1f}s")
    print(f"\nfiles in {work}")


if __name__ == "__main__":
    main()
