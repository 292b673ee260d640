"""Token sampling: greedy, temperature, top-k, top-p, seeded."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch


MAX_TOP_LOGPROBS = 20


class LogitsMatcher(Protocol):
    """One sequence's grammar state (k2local.grammar.Constraint): masks logits, advances on the picked token."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...

    def advance(self, tok: int) -> None: ...


class LogitsConstraint(Protocol):
    """A compiled grammar (k2local.grammar.Grammar): every sampler starts its own matcher from it."""

    def matcher(self) -> LogitsMatcher: ...


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a picked token under the model's raw distribution, and the most likely alternatives."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


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
    constraint: LogitsConstraint | None = None
    """A grammar the output must follow (each step masked to the tokens it allows): forced tool calls, JSON."""
    logprobs: int | None = None
    """Record each picked token's logprob and this many top alternatives (0..20); None records nothing."""
    on_logprob: Callable[[TokenLogprob], None] | None = None  # told each record as it is made (the server's output)

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
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")


class Sampler:
    """Stateful sampler (owns the RNG so a seed gives a reproducible sequence)."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.p = params
        self.out: list[int] = []  # the tokens picked so far
        self.counts: Counter[int] = Counter()
        self.matcher = params.constraint.matcher() if params.constraint is not None else None
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """Pick one token id from fp32 logits [vocab]; the sampler remembers it (penalties, its grammar's state)."""
        raw = logits.float().cpu()
        adjusted = self._adjust(raw)
        if self.matcher is not None:
            adjusted = self.matcher.mask(adjusted)
        tok = self._pick(adjusted)
        if self.matcher is not None:
            self.matcher.advance(tok)
        if self.p.logprobs is not None:
            if self.p.on_logprob is not None:
                self.p.on_logprob(token_logprob(raw, tok, self.p.logprobs))
        self.out.append(tok)
        self.counts[tok] += 1
        return tok

    def _adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias and presence / frequency penalties, as OpenAI applies them."""
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
        return logits

    def _pick(self, logits: torch.Tensor) -> int:
        """Temperature, then top-k and top-p on the candidates alone (no sort of the whole vocabulary), then one
        inverse-CDF draw (torch.multinomial over 163,840 ids costs ~25x a cumsum)."""
        if self.p.temperature <= 0:
            return int(logits.argmax())
        logits = logits / self.p.temperature
        ids: torch.Tensor | None = None
        if self.p.top_k > 0:
            logits, ids = torch.topk(logits, min(self.p.top_k, logits.numel()))  # sorted, highest first
        probs = logits.softmax(-1)
        if self.p.top_p < 1.0:
            if ids is None:
                probs, ids = _top_mass(probs, self.p.top_p)
            cum = probs.cumsum(0)
            keep = int((cum - probs <= self.p.top_p).sum())  # the smallest prefix whose mass reaches top_p
            probs, ids = probs[:keep], ids[:keep]
        i = _draw(probs, self.gen)
        return i if ids is None else int(ids[i])


def _top_mass(probs: torch.Tensor, mass: float, first: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely ids, sorted, until they hold at least `mass` of the probability (or all of them)."""
    k = min(first, probs.numel())
    while True:
        v, i = torch.topk(probs, k)
        if k == probs.numel() or float(v.sum()) >= mass:
            return v, i
        k = min(k * 8, probs.numel())


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One index drawn with probability proportional to probs (unnormalised, >= 0)."""
    cum = probs.double().cumsum(0)
    u = torch.rand((), generator=gen, dtype=torch.float64) * cum[-1]
    return min(int(torch.searchsorted(cum, u, right=True)), probs.numel() - 1)


def token_logprob(logits: torch.Tensor, tok: int, top: int) -> TokenLogprob:
    """``tok``'s logprob under softmax(logits) (the model's own distribution, before temperature, penalties and
    grammar masks, as vLLM reports it) and the ``top`` most likely ids with theirs."""
    lp = logits.log_softmax(-1)
    alts: tuple[tuple[int, float], ...] = ()
    if top:
        v, i = torch.topk(lp, min(top, lp.numel()))
        alts = tuple(zip(i.tolist(), v.tolist()))
    return TokenLogprob(tok, float(lp[tok]), alts)
