"""Token sampling: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; Kimi K2's recommended temperature is 0.6."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 512
    seed: int | None = None
    stop_ids: frozenset[int] | None = None  # None: the tokenizer's end-of-turn ids
    to_context_end: bool = False
    """The request named no max_tokens: generate up to the end of the context window (the server replaces
    ``max_tokens`` with the room the prompt leaves)."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    prefix_choices: tuple[tuple[int, ...], ...] = ()
    """The output starts with one of these token sequences (each step masked to the tokens that continue one of
    them; sampling is free after): a required tool choice picks one of the declared names this way."""

    def validate(self) -> None:
        if not (0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        for key in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, key) <= 2.0):
                raise ValueError(f"{key} must be in [-2, 2], got {getattr(self, key)}")
        if any(not (-100.0 <= b <= 100.0) for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")


class Sampler:
    """Stateful sampler (owns the RNG so a seed gives a reproducible sequence)."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.out: list[int] = []  # the tokens picked so far
        self.counts: Counter[int] = Counter()
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick one token id from fp32 logits [vocab]; the sampler remembers it (penalties, prefix choices)."""
        tok = self._pick(self._adjust(logits.float().cpu()))
        self.out.append(tok)
        self.counts[tok] += 1
        return tok

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias, presence / frequency penalties and the prefix-choice mask, as OpenAI applies them."""
        p = self.p
        if p.logit_bias or (self.counts and (p.presence_penalty or p.frequency_penalty)):
            logits = logits.clone()
        if p.logit_bias:
            ids = [i for i in p.logit_bias if 0 <= i < logits.numel()]
            logits[ids] += torch.tensor([float(p.logit_bias[i]) for i in ids])
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            ids = list(self.counts)
            n = torch.tensor([float(self.counts[i]) for i in ids])
            logits[ids] -= n * p.frequency_penalty + p.presence_penalty
        if p.prefix_choices:
            k = len(self.out)
            nxt = {seq[k] for seq in p.prefix_choices if len(seq) > k and list(seq[:k]) == self.out}
            done = any(len(seq) <= k and list(seq) == self.out[: len(seq)] for seq in p.prefix_choices)
            if nxt and not done:
                mask = torch.full_like(logits, float("-inf"))
                ids = sorted(nxt)
                mask[ids] = logits[ids]
                logits = mask
        return logits

    def _pick(self, logits: torch.Tensor) -> int:
        if self.p.temperature <= 0:
            return int(logits.argmax())
        logits = logits / self.p.temperature
        if self.p.top_k > 0:
            kth = torch.topk(logits, min(self.p.top_k, logits.numel()))[0][-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.p.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            cum = sp.cumsum(0)
            drop = cum - sp > self.p.top_p  # keep the smallest prefix whose mass reaches top_p
            sp[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, si, sp)
        return int(torch.multinomial(probs, 1, generator=self.gen))
