"""The server's model thread: queued jobs, KV-cache slots with prefix reuse, and the one output path
(stream decode -> stop strings -> reasoning parser -> tool-call parser of the model's dialect -> events).

Stop strings apply to the generated text as decoded, reasoning included (as in vLLM, where stop strings are
matched by the detokenizer before any reasoning parser runs): a stop string the model writes inside its
``<think>`` ends the output there, and the reasoning parser then sees the output cut at that point."""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

from k2local.generate import (BatchStep, ChatBackend, ContextOverflow, Generation, GenerationResult, Generator,
                              step_batch)
from k2local.sampler import SamplingParams, TokenLogprob
from k2local.server.requests import APIError, ToolMode
from k2local.tokenizer.common import TextTokenizer
from k2local.chat.reasoning import THINK_END, THINK_START, ReasoningDelta, ReasoningStreamParser
from k2local.chat.toolcalls import (
    ContentDelta,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    ToolDialect,
    ToolEvent,
    make_tool_call_id,
    tool_dialect,
)

log = logging.getLogger("k2local.server.app")
MIN_COPY_PREFIX = 16  # shared prompt tokens worth copying from another conversation's KV cache
MAX_PREFILL_ROWS = 512  # prompt rows in one shared forward step (other streams' decodes wait at most this long)
TokenSource = Callable[[list[int]], "Iterable[int] | None"]
RequestKind = Literal["chat", "completion", "messages", "responses"]
FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]
# Dialects whose tool-call sections are kept out of the content of a chat without tools. DeepSeek's are not: its
# served tests pin its markers staying in such content (tests/test_server.py, test_deepseek_tool_calls_streamed_*).
HIDDEN_SECTION_DIALECTS = ("kimi_k2",)


# --------------------------------------------------------------------------------------- output (worker side)

@dataclass
class Done:
    """A finished request: what the endpoints format."""

    finish_reason: FinishReason
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    content: str
    tool_calls: list[ToolCall]
    reasoning: str = ""  # the model's reasoning (empty for a model that does not think, or with reasoning off)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when asked for


@dataclass(frozen=True)
class Failed:
    """A request that ended in an error (answered as the API's error JSON, or an error event when streaming)."""

    error: APIError


@dataclass(frozen=True)
class Logprob:
    """A generated token's logprob (requests that ask for logprobs), posted before that token's text events."""

    item: TokenLogprob


ServerEvent = Union[ReasoningDelta, ContentDelta, ToolCallStart, ToolCallArgsDelta, Logprob, Done, Failed]
"""What the worker posts for one request, in order: reasoning, text and tool-call deltas (the reasoning and
tool-call parsers' typed events; a forced tool choice's call ids already rewritten), then exactly one Done or
Failed. Reasoning deltas come only first (the reasoning ends before any content or tool call)."""


class _StopMatcher:
    """Cuts text at the first stop string, holding back a tail that could still begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.buf = ""
        self.hit: str | None = None

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        buf = self.buf + text
        first: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.buf, self.hit = "", first[1]
            return buf[: first[0]]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.buf = buf[len(buf) - hold:]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _marker_ids(tokenizer: TextTokenizer, dialect: ToolDialect) -> frozenset[int]:
    """Ids of the dialect's markers and of ``<think>`` / ``</think>`` that ``skip_special_tokens`` would drop (the
    parsers match them as text, so the decoder must keep them)."""
    skip = tokenizer.skip_ids
    if not skip:
        return frozenset()
    ids = (tokenizer.token_to_id(m) for m in (*dialect.markers, THINK_START, THINK_END))
    return frozenset(i for i in ids if i is not None and i in skip)


class Output:
    """Token ids -> text -> stop strings -> reasoning parser -> tool-call parser -> events. Runs on the worker thread.

    The tool-call parser's dialect (Kimi K2 or DeepSeek-V3 markers) comes from the tokenizer's special tokens.
    ``reasoning`` turns on the reasoning parser (:class:`k2local.chat.reasoning.ReasoningStreamParser`, ended by
    ``<think>``'s close or by the dialect's tool-call section) with ``start_in_reasoning`` as the prompt decided;
    its reasoning becomes :class:`ReasoningDelta` events and its content goes on to the tool-call parser. It is
    never used with a forced tool choice's prefix (the turn then starts inside a tool call, not in reasoning).
    """

    def __init__(self, tokenizer: TextTokenizer, stops: Sequence[str], tools: ToolMode,
                 emit: Callable[[ServerEvent], None], reasoning: bool = False, start_in_reasoning: bool = False):
        dialect = tool_dialect(tokenizer)
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True, keep=_marker_ids(tokenizer, dialect))
        # marker ids (as text) that bypass the stop strings: they match the visible text only, never a marker
        self._marker_text = {i: m for m in (*dialect.markers, THINK_START, THINK_END)
                             if (i := tokenizer.token_to_id(m)) is not None}
        self.stop = _StopMatcher(stops)
        self.tools = tools
        self.emit = emit
        self.parser = ToolCallStreamParser(dialect, tools.call_base) if tools.parse else None
        # no tools asked for (a chat, not a raw completion): a tool-call section the model writes anyway is parsed
        # and dropped, so its marker tokens never reach the content
        self.hidden = (ToolCallStreamParser(dialect) if not tools.parse and not tools.raw
                       and dialect.name in HIDDEN_SECTION_DIALECTS else None)
        self.thinker = (ReasoningStreamParser(start_in_reasoning, (dialect.section_begin,))
                        if reasoning and not (self.parser and tools.prefix) else None)
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # filled by the sampler (SamplingParams.on_logprob) when asked for
        self._calls: list[ToolCallStart] = []
        self._args: list[list[str]] = []  # argument fragments of each call
        if self.parser and tools.prefix:
            self._content(tools.prefix)

    @property
    def calls(self) -> list[ToolCall]:
        """The tool calls written so far (ids as the client sees them)."""
        return [ToolCall(c.id, c.name, "".join(a)) for c, a in zip(self._calls, self._args)]

    def on_logprob(self, item: TokenLogprob) -> None:
        """The sampler's record of the token it just picked (before :meth:`on_token` sees that token)."""
        if self.stop.hit is None:
            self.logprobs.append(item)
            self.emit(Logprob(item))

    def on_token(self, tok: int) -> bool:
        """Feed one generated id; True when a stop string ended the output."""
        if self.stop.hit is None:
            text = self.decoder.feed(tok)
            marker = self._marker_text.get(tok)
            if marker is not None and text.endswith(marker):  # the text before it, then the marker unmatched
                self._text(text[: len(text) - len(marker)])
                if self.stop.hit is None:
                    self._route(self.stop.flush())
                    self._route(marker)
            elif text:
                self._text(text)
        return self.stop.hit is not None

    def close(self) -> None:
        if self.stop.hit is None:
            self._text(self.decoder.flush())
            if self.stop.hit is None:
                self._route(self.stop.flush())
        if self.thinker:
            self._thought(self.thinker.finish())
        if self.hidden:
            self._visible(self.hidden.finish())
        if self.parser:
            self._events(self.parser.finish())

    def _text(self, text: str) -> None:
        out = self.stop.feed(text)
        if out:
            self._route(out)

    def _route(self, text: str) -> None:
        if not text:
            return
        if self.thinker is None:
            self._content(text)
        else:
            self._thought(self.thinker.feed(text))

    def _thought(self, events: Iterable[ReasoningDelta | ContentDelta]) -> None:
        for ev in events:
            if isinstance(ev, ReasoningDelta):
                self.reasoning.append(ev.text)
                self.emit(ev)
            else:
                self._content(ev.text)

    def _content(self, text: str) -> None:
        if not text:
            return
        if self.hidden is not None:
            self._visible(self.hidden.feed(text))
        elif self.parser is None:
            self.content.append(text)
            self.emit(ContentDelta(text))
        else:
            self._events(self.parser.feed(text))

    def _visible(self, events: Iterable[ToolEvent]) -> None:
        """The content of a request without tools; the calls it wrote are dropped."""
        for ev in events:
            if isinstance(ev, ContentDelta) and ev.text:
                self.content.append(ev.text)
                self.emit(ev)

    def _events(self, events: Iterable[ToolEvent]) -> None:
        for ev in events:
            if isinstance(ev, ContentDelta):
                self.content.append(ev.text)
            elif isinstance(ev, ToolCallStart):
                if self.tools.id_base is not None:
                    ev = ToolCallStart(ev.index, make_tool_call_id(ev.name, self.tools.id_base + ev.index), ev.name)
                self._calls.append(ev)
                self._args.append([])
            elif isinstance(ev, ToolCallArgsDelta):
                self._args[ev.index].append(ev.text)
            self.emit(ev)


# ----------------------------------------------------------------------------------------------------- worker

@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    output: Output
    post: Callable[[ServerEvent], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    kind: RequestKind = "chat"
    on_prefilled: Callable[[], None] | None = None  # called once, when the prompt is in the cache (or the job ends)


@dataclass
class Finished:
    """A record of one finished (or cancelled) request."""

    kind: RequestKind
    params: SamplingParams
    result: GenerationResult


@dataclass
class _Slot:
    gen: Generator
    prompt_len: int = 0
    last_used: float = 0.0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class BatchStats:
    """Counters of the worker's shared forward steps (tests, /health and benchmarks read them)."""

    forwards: int = 0  # forward steps run
    rows: int = 0  # rows (tokens) over all of them
    prefill_rows: int = 0  # of which prompt rows
    sequences: int = 0  # sequences over all of them (a step of 4 streams counts 4)
    shared: int = 0  # steps that carried two or more sequences
    max_sequences: int = 0  # the most sequences one step carried

    def record(self, step: BatchStep) -> None:
        if not step.sequences:
            return
        self.forwards += 1
        self.rows += step.rows
        self.prefill_rows += step.prefill_rows
        self.sequences += step.sequences
        self.shared += step.sequences > 1
        self.max_sequences = max(self.max_sequences, step.sequences)


@dataclass
class _Active:
    """A running request: its job, the slot whose KV cache it uses, its stepped generation."""

    job: Job
    slot: _Slot
    run: Generation


class Worker:
    """The thread that owns the model: admits queued jobs in arrival order, up to ``parallel`` at a time, each on
    its own KV-cache slot, and runs them in shared forward steps (continuous batching): each round, every running
    sequence adds its next decoded token, and those still reading their prompt add their next chunk while the
    round has prefill room (``max_prefill_rows``, oldest request first), all in one forward. So every stream makes
    progress, a new request's first token does not wait for others to end, and the model's weights are read once
    per round for all of them. A cancelled job (client gone) stops at its next step: within one prefill chunk or
    one token."""

    def __init__(self, backend: ChatBackend, cache_slots: int = 4, max_queue: int = 256,
                 token_source: TokenSource | None = None, parallel: int = 1,
                 max_prefill_rows: int = MAX_PREFILL_ROWS):
        self.backend = backend
        self.parallel = max(1, parallel)
        self.max_slots = max(1, cache_slots, self.parallel)
        self.max_queue = max_queue
        self.max_prefill_rows = max(1, max_prefill_rows)
        self.token_source = token_source
        self.slots: list[_Slot] = []
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active: list[_Active] = []
        self.busy = False
        self.steps = 0  # scheduling rounds run (tests and benchmarks read it)
        self.batch = BatchStats()
        self.finished: deque[Finished] = deque(maxlen=256)  # recent requests, newest last
        self.thread = threading.Thread(target=self._loop, name="k2local-model", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(429, f"the server queue is full ({self.max_queue} requests waiting); retry later",
                           type="rate_limit_error", code="queue_full")
        self.jobs.put(job)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            while len(self.active) < self.parallel:  # admit: wait for work only when nothing is running
                try:
                    job = self.jobs.get_nowait() if self.active else self.jobs.get()
                except queue.Empty:
                    break
                if job is None:
                    for a in self.active:
                        a.job.cancel.set()
                    self._round()
                    return
                self.busy = True
                self._admit(job)
            self.busy = bool(self.active)
            self.steps += 1
            self._round()

    def _round(self) -> None:
        """One shared forward step of every running request; the ended ones are answered and leave."""
        if not self.active:
            return
        model = self.active[0].run.gen.model  # every slot's generator runs the backend's one model
        self.batch.record(step_batch(model, [a.run for a in self.active], self.max_prefill_rows))
        for a in list(self.active):
            if a.run.done:
                self.active.remove(a)
                self._end(a)
            elif a.job.on_prefilled is not None and not a.run.prefilling:
                a.job.on_prefilled()  # e.g. n > 1: the other choices start from this cache's prompt
                a.job.on_prefilled = None

    def _fail(self, job: Job, e: BaseException) -> None:
        log.exception("request failed")
        job.post(Failed(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")))

    def _pick(self, ids: list[int]) -> _Slot:
        """The slot whose conversation this prompt continues; otherwise a fresh (or least recently used) slot,
        seeded with the longest shared prefix (e.g. a common system prompt) copied from another slot's cache.
        Slots in use by running requests are never taken, but may give their prefix (their caches are
        consistent between steps)."""
        busy = {id(a.slot) for a in self.active}
        scored = [(_common_prefix(s.gen.tokens, ids), s) for s in self.slots]
        cont = [(n, s) for n, s in scored if n >= s.prompt_len and id(s) not in busy]
        if cont:
            return max(cont, key=lambda x: (x[0], x[1].last_used))[1]
        free = [s for s in self.slots if id(s) not in busy]
        if len(self.slots) < self.max_slots:
            target = _Slot(self.backend.new_generator())
            self.slots.append(target)
        else:
            target = min(free, key=lambda s: s.last_used)
        n, donor = max(scored, key=lambda x: x[0], default=(0, None))
        if donor is not None and donor is not target and n >= MIN_COPY_PREFIX:
            target.gen.copy_prefix_from(donor.gen, n)
        target.prompt_len = 0
        return target

    def _admit(self, job: Job) -> None:
        """Start a job on a slot (it runs from the next round), or answer it now (cancelled while queued, a
        prompt that does not fit)."""
        p = job.params
        stops = p.stop_ids if p.stop_ids is not None else frozenset(self.backend.stop_ids)
        if job.cancel.is_set():
            self._finish(job, GenerationResult([], "cancelled", len(job.prompt), 0, 0.0, 0.0, prefilled=0))
            return
        slot = None
        try:
            slot = self._pick(job.prompt)
            slot.last_used = time.monotonic()
            script = self.token_source(job.prompt) if self.token_source else None
            choose = None
            if script is not None:
                it = iter(script)
                choose = lambda _logits: next(it, None)  # noqa: E731 (scripted output; None ends the turn)
            run = slot.gen.start(job.prompt, p, stops, on_token=job.output.on_token,
                                 should_stop=job.cancel.is_set, choose=choose)
        except ContextOverflow as e:
            job.post(Failed(APIError(400, str(e), param="messages", code="context_length_exceeded")))
            return
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            if slot is not None:
                slot.gen.reset()
                slot.prompt_len = 0
            self._fail(job, e)
            return
        slot.prompt_len = 0  # until this request ends, the slot holds no finished prompt
        self.active.append(_Active(job, slot, run))

    def _end(self, a: _Active) -> None:
        """Answer a request whose generation has ended (finished, cancelled or failed)."""
        res = a.run.result
        try:
            if a.run.error is not None:
                raise a.run.error
            assert res is not None
            a.slot.prompt_len = min(len(a.job.prompt), res.prefilled if res.prefilled is not None
                                    else len(a.job.prompt))
            a.slot.last_used = time.monotonic()
            a.job.output.close()
        except Exception as e:  # noqa: BLE001 - the model thread must outlive any one request
            log.error("generation failed", exc_info=e)
            a.slot.gen.reset()
            a.slot.prompt_len = 0
            a.job.post(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))
            return
        self._finish(a.job, res)

    def _finish(self, job: Job, res: GenerationResult) -> None:
        self.finished.append(Finished(job.kind, job.params, res))
        out = job.output
        calls = out.calls
        reason: FinishReason = res.finish_reason
        if reason == "stop" and calls:
            reason = "tool_calls"
        if res.tokens:
            log.info("%s: prompt %d tokens (%d cached), %d generated, %s; prefill %.1f tok/s, decode %.1f tok/s",
                     job.kind, res.prompt_tokens, res.cached_tokens, len(res.tokens), reason, res.prefill_tps,
                     res.decode_tps)
        job.post(Done(reason, out.stop.hit, res.prompt_tokens, len(res.tokens), res.cached_tokens,
                      "".join(out.content), calls, "".join(out.reasoning), list(out.logprobs)))
