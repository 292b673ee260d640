"""Compiled grammars and the per-sequence matcher that masks logits each step and advances on the picked token."""
from __future__ import annotations

import re

import numpy as np
import torch
import llguidance

from k2local.grammar.grammars import GrammarError
from k2local.grammar.vocab import ll_tokenizer
from k2local.tokenizer.common import TextTokenizer


def apply_bitmask(logits: torch.Tensor, bitmask: bytes) -> torch.Tensor:
    """``logits`` [vocab] with every id whose bit is clear in ``bitmask`` (little-endian bits, llguidance's
    layout) set to -inf; ids past the mask (a model's padded embedding rows) are masked too."""
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little").view(np.bool_)
    n = logits.numel()
    if bits.size < n:
        bits = np.concatenate([bits, np.zeros(n - bits.size, dtype=np.bool_)])
    x = logits.detach().float().cpu().contiguous().numpy()
    return torch.from_numpy(np.where(bits[:n], x, np.float32(-np.inf)))


class Grammar:
    """A grammar compiled for one tokenizer (checked once); :meth:`matcher` starts a sequence's matcher."""

    def __init__(self, tokenizer: TextTokenizer, lark: str):
        self.lark = lark
        self.lt = ll_tokenizer(tokenizer)
        self.stop_ids = sorted(tokenizer.stop_ids)
        proto = llguidance.LLMatcher(self.lt, lark, log_level=0)
        if proto.is_error():  # "at 1(8): failed to compile JSON schema: Unimplemented keys: ["not"]\n<grammar>"
            first = proto.get_error().strip().splitlines()[0]
            raise GrammarError(re.sub(r"^at \d+\(\d+\): ", "", first))
        self._proto = proto

    def matcher(self) -> "Constraint":
        return Constraint(self._proto.deep_copy(), self.stop_ids)


class Constraint:
    """One sequence's position in a grammar. Once the grammar is complete only end-of-turn ids are allowed; if the
    matcher ever errs (it should not: every pick is from its mask) the turn is ended the same way."""

    def __init__(self, m: llguidance.LLMatcher, stop_ids: list[int]):
        self.m = m
        self.stop_ids = stop_ids

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        if self.m.is_error():
            return self._stop_only(logits)
        return apply_bitmask(logits, self.m.compute_bitmask())

    def advance(self, tok: int) -> None:
        self.m.consume_token(tok)

    @property
    def finished(self) -> bool:
        """The grammar is complete (only an end-of-turn id may follow)."""
        return self.m.is_stopped() or self.m.is_accepting()

    def _stop_only(self, logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, float("-inf"))
        ids = [i for i in self.stop_ids if i < logits.numel()] or [int(logits.argmax())]
        out[ids] = logits[ids]
        return out
