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
    prefilled: int | None = None  # prompt positions in the KV cache at the end (< prompt_tokens: prefill was cut)

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
        """Generate after prompt `ids` until a stop id, max_tokens, the context end, or a stop request.

        A stop request (should_stop) is honoured between prefill chunks too: the cache then holds the prompt
        positions computed so far (``GenerationResult.prefilled``), and a later call reuses them."""
        run = self.start(ids, params, stop_ids, on_token, should_stop, choose)
        while not run.step():
            pass
        assert run.result is not None
        return run.result

    def start(self, ids: list[int], params: SamplingParams, stop_ids: set[int] | frozenset[int],
              on_token: TokenCallback | None = None,
              should_stop: Callable[[], bool] | None = None,
              choose: TokenChooser | None = None) -> "Generation":
        """A generation of this conversation advanced by its caller one step at a time (the server interleaves
        several); raises ContextOverflow / ValueError for a prompt that cannot start."""
        return Generation(self, ids, params, stop_ids, on_token, should_stop, choose)


class Generation:
    """One generation, stepped: each :meth:`step` runs one prefill chunk or one decoded token, then returns.

    The Generator's cache and token list are consistent between steps (positions [0, len(tokens)) hold the
    KV of ``tokens``), so a caller may stop after any step, or copy the cache's prefix elsewhere between steps.
    A stop request (should_stop) is checked before every step: a long prefill stops within one chunk."""

    def __init__(self, gen: Generator, ids: list[int], params: SamplingParams,
                 stop_ids: set[int] | frozenset[int], on_token: TokenCallback | None = None,
                 should_stop: Callable[[], bool] | None = None, choose: TokenChooser | None = None):
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= gen.max_context:
            raise ContextOverflow(f"prompt has {len(ids)} tokens; the context window is {gen.max_context}")
        self.gen, self.ids, self.params = gen, list(ids), params
        self.pick: TokenChooser = choose or Sampler(params)
        self.stops = params.stop_ids if params.stop_ids is not None else stop_ids
        self.on_token, self.should_stop = on_token, should_stop
        self.keep = gen._common_prefix(self.ids)
        gen.cache.truncate(self.keep)
        gen.tokens = list(self.ids[: self.keep])
        self.pos = self.keep  # next prompt position to compute
        self.logits: torch.Tensor | None = None  # last position's logits, once the prompt is in
        self.out: list[int] = []
        self.result: GenerationResult | None = None
        self.prefill_s = self.decode_s = 0.0  # this generation's own compute time (not others' steps between)
        self.chunks = 0  # prefill chunks run

    @property
    def prefilling(self) -> bool:
        return self.result is None and self.logits is None

    def step(self) -> bool:
        """Advance by one prefill chunk or one token; True once finished (``result`` is then set)."""
        if self.result is not None:
            return True
        if self.should_stop and self.should_stop():
            return self._end("cancelled")
        t = time.perf_counter()
        if self.logits is None:
            try:
                self._prefill_chunk()
            finally:
                self.prefill_s += time.perf_counter() - t
            return False
        try:
            return self._decode()
        finally:
            dt = time.perf_counter() - t
            self.decode_s += dt
            if self.result is not None:
                self.result.decode_s = self.decode_s

    def _prefill_chunk(self) -> None:
        g = self.gen
        chunk = self.ids[self.pos: self.pos + g.prefill_chunk]
        logits = g.model.forward(chunk, g.cache, pos=self.pos, last_only=True)
        g.tokens.extend(chunk)
        self.pos += len(chunk)
        self.chunks += 1
        if self.pos >= len(self.ids):
            self.logits = logits[-1]

    def _decode(self) -> bool:
        g = self.gen
        assert self.logits is not None
        tok = self.pick(self.logits)
        if tok is None:
            return self._end("stop")
        self.out.append(tok)
        halt = self.on_token(tok) if self.on_token else False
        if tok in self.stops:
            return self._end("stop")
        if halt:
            return self._end("cancelled" if self.should_stop and self.should_stop() else "stop")
        if len(self.out) >= self.params.max_tokens or len(g.tokens) + 1 >= g.max_context:
            return self._end("length")
        self.logits = g.model.forward([tok], g.cache, pos=len(g.tokens))[-1]
        g.tokens.append(tok)
        return False

    def _end(self, reason: GenerationFinish) -> bool:
        self.result = GenerationResult(self.out, reason, len(self.ids), self.keep, self.prefill_s, self.decode_s,
                                       prefilled=min(self.pos, len(self.ids)))
        return True


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
