"""Generation loop with a persistent KV cache: the longest common prefix with the previous call is reused."""
from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from k2local.errors import K2Error
from k2local.model import KimiK2Model, SeqRows
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
    """One generation, stepped: each step runs one prefill chunk or one decoded token, then returns.

    A step is split in two so that several generations can share one forward step (:func:`step_batch`):
    :meth:`plan` decides this generation's rows (sampling the next token from the last logits, with its callbacks
    and stop checks), the caller runs the model on them (with other generations' rows), and :meth:`feed` takes
    the logits back. :meth:`step` is the batch of one.

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
        self.error: Exception | None = None  # what ended it, when a step failed (result is then None)
        self.prefill_s = self.decode_s = 0.0  # time of the steps this generation took part in
        self.chunks = 0  # prefill chunks run

    @property
    def prefilling(self) -> bool:
        return self.result is None and self.logits is None

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def step(self) -> bool:
        """Advance by one prefill chunk or one token; True once finished (``result`` is then set). A failed step
        raises its error."""
        step_batch(self.gen.model, [self], self.gen.prefill_chunk)
        if self.error is not None:
            raise self.error
        return self.result is not None

    def plan(self, max_prefill: int) -> SeqRows | None:
        """This generation's rows for the next forward step: the next prefill chunk (at most max_prefill rows;
        none when max_prefill is 0), or the token sampled from the last logits. None when it has ended (``result``
        set: a stop token, max_tokens, the context end, a stop request) or waits for prefill room."""
        g = self.gen
        if self.result is not None:
            return None
        if self.should_stop and self.should_stop():
            self._end("cancelled")
            return None
        if self.logits is None:
            n = min(g.prefill_chunk, max_prefill)
            return SeqRows(self.ids[self.pos: self.pos + n], g.cache, self.pos, last_only=True) if n > 0 else None
        tok = self.pick(self.logits)
        if tok is None:
            self._end("stop")
            return None
        self.out.append(tok)
        halt = self.on_token(tok) if self.on_token else False
        if tok in self.stops:
            self._end("stop")
        elif halt:
            self._end("cancelled" if self.should_stop and self.should_stop() else "stop")
        elif len(self.out) >= self.params.max_tokens or len(g.tokens) + 1 >= g.max_context:
            self._end("length")
        return None if self.result is not None else SeqRows([tok], g.cache, len(g.tokens), last_only=True)

    def feed(self, rows: SeqRows, logits: torch.Tensor) -> None:
        """The forward step's logits for the rows :meth:`plan` gave ([1, vocab]: their last row)."""
        g = self.gen
        g.tokens.extend(rows.ids)
        if self.logits is None:
            self.pos += len(rows.ids)
            self.chunks += 1
            if self.pos >= len(self.ids):
                self.logits = logits[-1]
        else:
            self.logits = logits[-1]

    def _end(self, reason: GenerationFinish) -> None:
        self.result = GenerationResult(self.out, reason, len(self.ids), self.keep, self.prefill_s, self.decode_s,
                                       prefilled=min(self.pos, len(self.ids)))


@dataclass(frozen=True)
class BatchStep:
    """What one shared forward step ran."""

    sequences: int  # generations whose rows went into the forward (0: no forward ran)
    rows: int  # all rows of the step
    prefill_rows: int  # of which prompt rows
    seconds: float


def step_batch(model: KimiK2Model, runs: Sequence[Generation], max_prefill_rows: int) -> BatchStep:
    """Advance every unfinished generation of `runs` by one step, sharing one forward (continuous batching): each
    decoding generation adds its next token's row, and prefilling ones add their next prompt chunk while the step
    has prefill room (max_prefill_rows in all, handed out in the order of `runs`, so the decodes of other streams
    are not held up by a long prompt for more than that many rows). A generation whose own part fails (a
    callback, the sampler) ends with ``error`` set; a failed forward sets it on every generation in the step."""
    t0 = time.perf_counter()
    room = max_prefill_rows
    work: list[tuple[Generation, SeqRows, bool]] = []
    for run in runs:
        if run.done:
            continue
        prefill = run.prefilling
        try:
            rows = run.plan(room if prefill else 0)
        except Exception as e:  # noqa: BLE001 - this generation fails, the others go on
            run.error = e
            continue
        if rows is not None:
            work.append((run, rows, prefill))
            room -= len(rows.ids) if prefill else 0
        elif run.result is not None:  # ended while planning: its time counts as decode time
            run.decode_s += time.perf_counter() - t0
            run.result.decode_s = run.decode_s
    if work:
        try:
            logits = model.forward_batch([rows for _, rows, _ in work])
        except Exception as e:  # noqa: BLE001 - reported through each generation of the step
            for run, _, _ in work:
                run.error = e
            logits = []
        for (run, rows, _), lg in zip(work, logits):
            run.feed(rows, lg)
    dt = time.perf_counter() - t0
    for run, _, prefill in work:
        if prefill:
            run.prefill_s += dt
        else:
            run.decode_s += dt
    n_pre = sum(len(rows.ids) for _, rows, prefill in work if prefill)
    return BatchStep(len(work), sum(len(rows.ids) for _, rows, _ in work), n_pre, dt)


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
