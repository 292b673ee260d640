"""Generation loop with a persistent KV cache: the longest common prefix with the previous call is reused."""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from k2local.errors import K2Error
from k2local.model import KimiK2Model
from k2local.sampler import Sampler, SamplingParams

if TYPE_CHECKING:
    from k2local.chat.template import ChatTemplate
    from k2local.tokenizer.common import TextTokenizer

GenerationFinish = Literal["stop", "length", "cancelled"]


class ContextOverflow(K2Error):
    """The prompt (plus at least one new token) does not fit the context window."""


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: GenerationFinish
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV was reused instead of recomputed
    prefill_s: float
    decode_s: float

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 and len(self.tokens) > 1 else 0.0


# on_token(token_id) is called for every generated token (stop tokens included); returning True stops early.
TokenCallback = Callable[[int], "bool | None"]
# choose(logits) picks the next token instead of the sampler (None ends the turn); a seam for scripted output.
TokenChooser = Callable[[torch.Tensor], "int | None"]


class Generator:
    """One conversation's state: the tokens whose KV is in the cache."""

    def __init__(self, model: KimiK2Model, max_context: int, prefill_chunk: int = 512):
        self.model = model
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_cache()
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.cache.truncate(0)
        self.tokens = []

    def copy_prefix_from(self, other: "Generator", n: int) -> None:
        """Start this conversation from the first n cached positions of another one (shared system prompt)."""
        if n > other.cache.length:
            raise ValueError(f"cannot copy {n} positions from a cache of {other.cache.length}")
        self.cache.copy_prefix_from(other.cache, n)
        self.tokens = list(other.tokens[:n])

    def _common_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        return min(n, len(ids) - 1)  # always recompute the last prompt token to get its logits

    def prefill(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Bring the cache to `ids`, reusing the shared prefix; returns last-position logits and reused count."""
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_context:
            raise ContextOverflow(f"prompt has {len(ids)} tokens; the context window is {self.max_context}")
        keep = self._common_prefix(ids)
        self.cache.truncate(keep)
        self.tokens = list(ids[:keep])
        logits = None
        for s in range(keep, len(ids), self.prefill_chunk):
            chunk = ids[s: s + self.prefill_chunk]
            logits = self.model.forward(chunk, self.cache, pos=s, last_only=True)
            self.tokens.extend(chunk)
        assert logits is not None
        return logits[-1], keep

    def generate(self, ids: list[int], params: SamplingParams, stop_ids: set[int] | frozenset[int],
                 on_token: TokenCallback | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 choose: TokenChooser | None = None) -> GenerationResult:
        """Generate after prompt `ids` until a stop id, max_tokens, the context end, or a stop request."""
        pick: TokenChooser = choose or Sampler(params)
        stops = params.stop_ids if params.stop_ids is not None else stop_ids
        t0 = time.perf_counter()
        logits, reused = self.prefill(ids)
        t1 = time.perf_counter()
        out: list[int] = []
        reason: GenerationFinish = "length"
        while True:
            if should_stop and should_stop():
                reason = "cancelled"
                break
            tok = pick(logits)
            if tok is None:
                reason = "stop"
                break
            out.append(tok)
            halt = on_token(tok) if on_token else False
            if tok in stops:
                reason = "stop"
                break
            if halt:
                reason = "cancelled" if should_stop and should_stop() else "stop"
                break
            if len(out) >= params.max_tokens or len(self.tokens) + 1 >= self.max_context:
                break
            logits = self.model.forward([tok], self.cache, pos=len(self.tokens))[-1]
            self.tokens.append(tok)
        return GenerationResult(out, reason, len(ids), reused, t1 - t0, time.perf_counter() - t1)


class ChatBackend(Protocol):
    """What the chat session and the server drive: a :class:`k2local.engine.Engine`, or a stand-in with its interface
    (tests stub it). ``chat_ids`` renders messages (OpenAI shape) through ``template`` and tokenizes them."""

    tokenizer: TextTokenizer
    template: ChatTemplate
    max_context: int

    @property
    def name(self) -> str: ...

    @property
    def stop_ids(self) -> Collection[int]: ...

    def new_generator(self) -> Generator: ...

    def chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                 **template_kwargs: Any) -> list[int]: ...
