"""Generation: greedy/sampled decoding, stop tokens, streaming callback, KV prefix reuse across turns."""
from __future__ import annotations

import pytest
import torch

from k2local.weights.hf_checkpoint import SafetensorsSource
from k2local.generate import ContextOverflow, Generator
from k2local.model import KimiK2Model
from k2local.sampler import Sampler, SamplingParams


@pytest.fixture(scope="module")
def model(tiny_k2) -> KimiK2Model:
    return KimiK2Model(SafetensorsSource(tiny_k2))


def greedy(n: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n)


def test_greedy_equals_argmax_of_full_forward(model: KimiK2Model) -> None:
    prompt = [3, 14, 15, 92, 65]
    res = Generator(model, 256).generate(prompt, greedy(6), stop_ids=set())
    assert res.finish_reason == "length" and len(res.tokens) == 6
    seq = prompt + res.tokens
    logits = model.forward(seq, model.new_cache())
    assert res.tokens == logits[len(prompt) - 1:-1].argmax(-1).tolist()


def test_prefix_reuse_gives_same_tokens_and_skips_work(model: KimiK2Model) -> None:
    g = Generator(model, 256)
    turn1 = [3, 14, 15, 92, 65]
    r1 = g.generate(turn1, greedy(5), stop_ids=set())
    turn2 = turn1 + r1.tokens + [7, 8, 9]
    r2 = g.generate(turn2, greedy(5), stop_ids=set())
    assert r2.cached_tokens == len(turn1) + len(r1.tokens) - 1  # only the unsent last token is recomputed
    fresh = Generator(model, 256).generate(turn2, greedy(5), stop_ids=set())
    assert fresh.cached_tokens == 0 and fresh.tokens == r2.tokens
    # a divergent prompt truncates the cache to the common prefix
    r3 = g.generate(turn1[:2] + [1, 1], greedy(3), stop_ids=set())
    assert r3.cached_tokens == 2
    assert r3.tokens == Generator(model, 256).generate(turn1[:2] + [1, 1], greedy(3), stop_ids=set()).tokens


def test_stop_token_and_callback(model: KimiK2Model) -> None:
    prompt = [3, 14, 15]
    first = Generator(model, 256).generate(prompt, greedy(4), stop_ids=set()).tokens
    stopped = Generator(model, 256).generate(prompt, greedy(4), stop_ids={first[1]})
    assert stopped.finish_reason == "stop" and stopped.tokens == first[:2]
    seen: list[int] = []
    res = Generator(model, 256).generate(prompt, greedy(10), stop_ids=set(),
                                         on_token=lambda t: (seen.append(t), len(seen) >= 3)[1])
    assert seen == res.tokens and len(res.tokens) == 3


def test_seeded_sampling_is_reproducible(model: KimiK2Model) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=6, seed=123)
    a = Generator(model, 256).generate([1, 2, 3], p, stop_ids=set()).tokens
    b = Generator(model, 256).generate([1, 2, 3], p, stop_ids=set()).tokens
    assert a == b


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.tensor([10.0, 9.0, 0.0, -5.0])
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    assert {s(logits) for _ in range(50)} == {0}
    with pytest.raises(ValueError, match="top_p"):
        Sampler(SamplingParams(top_p=0.0))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.8), (3, 1.0), (4, 0.7)])
def test_sampled_frequencies_match_the_distribution(top_k: int, top_p: float) -> None:
    """The candidate-only top-k / top-p and the inverse-CDF draw give softmax(logits / T) restricted to the
    nucleus, renormalised (checked against the full-vocabulary definition over 20k draws)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -9.0])
    t = 0.8
    probs = (logits / t).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: top_k or len(order)]] = True
    p = torch.where(keep, probs, 0)
    p = p / p.sum()
    sp, si = p.sort(descending=True)
    nucleus = (sp.cumsum(0) - sp) <= top_p
    want = torch.zeros_like(p)
    want[si[nucleus]] = sp[nucleus]
    want /= want.sum()
    s = Sampler(SamplingParams(temperature=t, top_k=top_k, top_p=top_p, seed=7))
    n = 20000
    got = torch.bincount(torch.tensor([s(logits) for _ in range(n)]), minlength=len(logits)).double() / n
    assert torch.all(got[want == 0] == 0)
    assert torch.allclose(got, want.double(), atol=0.015)


def test_context_overflow(model: KimiK2Model) -> None:
    with pytest.raises(ContextOverflow, match="context window is 8"):
        Generator(model, 8).generate(list(range(10)), greedy(2), stop_ids=set())
