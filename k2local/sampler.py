"""Token sampling: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from dataclasses import dataclass

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

    def validate(self) -> None:
        if not (0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class Sampler:
    """Stateful sampler (owns the RNG so a seed gives a reproducible sequence)."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick one token id from fp32 logits [vocab]."""
        logits = logits.float().cpu()
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
