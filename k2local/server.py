"""OpenAI-compatible HTTP server over one Engine, plus Anthropic's ``/v1/messages``.

One worker thread owns the model and runs queued requests one at a time. A small pool of Generators keeps KV
caches, so a request that continues a cached conversation only prefills its new tokens. Output tokens go through
one path for every endpoint: stream-decode -> stop strings -> Kimi tool-call parser -> events -> JSON / SSE.
A client that disconnects (streaming or not) cancels its request, queued or running.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import re
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2local.generate import ContextOverflow, GenerationResult, Generator
from k2local.sampler import SamplingParams
from k2local.toolcalls import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    SECTION_BEGIN,
    ContentDelta,
    ToolCallArgsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    count_tool_calls,
    make_tool_call_id,
)

__all__ = ["APIError", "create_app"]

log = logging.getLogger("k2local.server")

DEFAULT_TEMPERATURE = 0.6  # Moonshot's recommendation for Kimi K2 Instruct
ANTHROPIC_TEMPERATURE_SCALE = 0.6  # Moonshot's Anthropic API: real temperature = request temperature * 0.6
MAX_STOP_STRINGS = 16
MIN_COPY_PREFIX = 16  # shared prompt tokens worth copying from another conversation's KV cache
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# token_source(prompt_ids) -> ids to emit instead of sampling, or None to sample. Test seam (see create_app).
TokenSource = Callable[[list[int]], "Iterable[int] | None"]


# ---------------------------------------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as OpenAI's (or Anthropic's) error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error"}


def _error_response(err: APIError, anthropic: bool) -> JSONResponse:
    if anthropic:
        kind = _ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": err.message}}
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


def _bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


# ------------------------------------------------------------------------------------------- parameter parsing

def _field(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[key] checked against kinds (None when absent or null); bools never count as numbers."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds:
        raise _bad(key, f"'{key}' must be {what}, got {json.dumps(v)}")
    if not isinstance(v, kinds):
        raise _bad(key, f"'{key}' must be {what}, got {type(v).__name__}")
    return v


def _number(body: dict, key: str, default: float | None, lo: float, hi: float, lo_open: bool = False
            ) -> float | None:
    v = _field(body, key, (int, float), "a number")
    if v is None:
        return default
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        raise _bad(key, f"'{key}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}")
    return float(v)


def _integer(body: dict, key: str, default: int | None, lo: int | None = None) -> int | None:
    v = _field(body, key, (int,), "an integer")
    if v is None:
        return default
    if lo is not None and v < lo:
        raise _bad(key, f"'{key}' must be >= {lo}, got {v}")
    return v


def _flag(body: dict, key: str) -> bool:
    return bool(_field(body, key, (bool,), "a boolean"))


def _stop_strings(body: dict, key: str) -> list[str]:
    v = body.get(key)
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad(key, f"'{key}' must be a non-empty string or a list of non-empty strings")
    if len(items) > MAX_STOP_STRINGS:
        raise _bad(key, f"'{key}' may hold at most {MAX_STOP_STRINGS} strings")
    return items


def _include_usage(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    return stream and _flag(opts, "include_usage")


def _require_n1(body: dict) -> None:
    if _integer(body, "n", 1, lo=1) != 1:
        raise _bad("n", "k2local generates one choice per request; 'n' must be 1")


def _sampling(body: dict, default_max: int | None, temperature_scale: float = 1.0,
              temperature_default: float = DEFAULT_TEMPERATURE, temperature_max: float = 2.0,
              max_keys: Sequence[str] = ("max_completion_tokens", "max_tokens")) -> SamplingParams:
    """SamplingParams from the request; max_tokens None means 'to the end of the context' (filled in later)."""
    t = _number(body, "temperature", None, 0.0, temperature_max)
    temperature = temperature_default if t is None else t * temperature_scale
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _integer(body, "top_k", 0, lo=-1)
    seed = _integer(body, "seed", None)
    max_tokens = None
    for key in max_keys:
        max_tokens = _integer(body, key, None, lo=1)
        if max_tokens is not None:
            break
    p = SamplingParams(temperature=temperature, top_p=top_p or 1.0, top_k=max(top_k or 0, 0),
                       max_tokens=max_tokens or default_max or 1, seed=seed)
    p.extra["max_given"] = max_tokens is not None or default_max is not None
    if _flag(body, "ignore_eos"):  # vLLM extension: generate through end-of-turn tokens
        p.stop_ids = frozenset()
    try:
        p.validate()
    except ValueError as e:
        raise _bad(None, str(e)) from None
    return p


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        raise _bad("model", "you must provide a model parameter")
    if not isinstance(model, str):
        raise _bad("model", "'model' must be a string")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{model_name}`.",
                       param="model", code="model_not_found")


def _check_unsupported(body: dict) -> None:
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs", "logprobs are not supported by k2local")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format", "k2local supports only response_format {\"type\": \"text\"}")
    if body.get("suffix"):
        raise _bad("suffix", "'suffix' is not supported by k2local")
    if body.get("best_of") not in (None, 1):
        raise _bad("best_of", "'best_of' must be 1")


# ---------------------------------------------------------------------------------------------- chat requests

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _chat_messages(raw: Any) -> list[dict]:
    """Validate OpenAI messages; 'developer' becomes 'system', dict tool-call arguments become JSON text, calls
    without an id get Kimi's functions.NAME:IDX (IDX counted over the conversation)."""
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "'messages' must be a non-empty list")
    out: list[dict] = []
    n_calls = 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad("messages", f"{where} must be an object")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad("messages", f"{where}: role must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise _bad("messages", f"{where}: content must be a string, a list of content parts, or null")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = "system" if role == "developer" else role
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            msg["tool_calls"] = _assistant_tool_calls(calls, where, n_calls)
            n_calls += len(calls)
        elif content is None and role != "assistant":
            raise _bad("messages", f"{where}: a {role} message needs content")
        if role == "assistant" and content is None and not calls:
            msg["content"] = ""
        out.append(msg)
    return out


def _assistant_tool_calls(calls: Any, where: str, first_index: int) -> list[dict]:
    if not isinstance(calls, list):
        raise _bad("messages", f"{where}.tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("messages", f"{where}.tool_calls[{j}] needs function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        call_id = c.get("id") or make_tool_call_id(fn["name"], first_index + j)
        out.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def _tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _bad("tools", "'tools' must be a list")
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad("tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
            raise _bad("tools", f"tools[{i}].function.name must match [A-Za-z0-9_.-]{{1,64}}, got {name!r}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _bad("tools", f"tools[{i}].function.parameters must be a JSON schema object")
    return raw or None


def _tool_choice(raw: Any, tools: list[dict] | None) -> str:
    """'auto' | 'none' | 'required' | 'fn:NAME'."""
    names = [t["function"]["name"] for t in tools or []]
    if raw is None:
        return "auto" if tools else "none"
    if raw in ("auto", "none", "required"):
        if raw == "required" and not tools:
            raise _bad("tool_choice", "tool_choice 'required' needs 'tools'")
        return raw
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice", "tool_choice must be 'auto', 'none', 'required' or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if fn["name"] not in names:
        raise _bad("tool_choice", f"tool_choice names {fn['name']!r}, which is not among the tools")
    return "fn:" + fn["name"]


@dataclass
class ToolMode:
    """How to treat tool calls in one request's output."""

    parse: bool = False
    prefix: str = ""  # forced start of the assistant turn (fed to the parser as if the model wrote it)
    id_base: int | None = None  # forced choice: ids are rewritten to functions.NAME:(id_base + i)


def _tool_mode(choice: str, tools: list[dict] | None, messages: list[dict]) -> ToolMode:
    if choice == "none" or not tools:
        return ToolMode()
    if choice == "auto":
        return ToolMode(parse=True)
    base = count_tool_calls(messages)
    names = [t["function"]["name"] for t in tools]
    name = choice[3:] if choice.startswith("fn:") else (names[0] if len(names) == 1 else None)
    if name is None:  # 'required' with several tools: the model picks the name after "functions."
        return ToolMode(True, SECTION_BEGIN + CALL_BEGIN + "functions.", base)
    return ToolMode(True, SECTION_BEGIN + CALL_BEGIN + make_tool_call_id(name, base) + ARGUMENT_BEGIN, base)


# --------------------------------------------------------------------------------------- output (worker side)

@dataclass
class Done:
    """A finished request: what the endpoints format."""

    finish_reason: str  # stop | length | tool_calls | cancelled
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    content: str
    tool_calls: list[dict]


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


class Output:
    """Token ids -> text -> stop strings -> tool-call parser -> events. Runs on the worker thread."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], tools: ToolMode, emit: Callable[[tuple], None]):
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.stop = _StopMatcher(stops)
        self.tools = tools
        self.emit = emit
        self.parser = ToolCallStreamParser() if tools.parse else None
        self.content: list[str] = []
        self.calls: list[dict] = []
        if self.parser and tools.prefix:
            self._route(tools.prefix)

    def on_token(self, tok: int) -> bool:
        """Feed one generated id; True when a stop string ended the output."""
        if self.stop.hit is None:
            text = self.decoder.feed(tok)
            if text:
                self._text(text)
        return self.stop.hit is not None

    def close(self) -> None:
        if self.stop.hit is None:
            self._text(self.decoder.flush())
            if self.stop.hit is None:
                self._route(self.stop.flush())
        if self.parser:
            self._events(self.parser.finish())

    def _text(self, text: str) -> None:
        out = self.stop.feed(text)
        if out:
            self._route(out)

    def _route(self, text: str) -> None:
        if not text:
            return
        if self.parser is None:
            self.content.append(text)
            self.emit(("text", text))
        else:
            self._events(self.parser.feed(text))

    def _events(self, events: Iterable[Any]) -> None:
        for ev in events:
            if isinstance(ev, ContentDelta):
                self.content.append(ev.text)
                self.emit(("text", ev.text))
            elif isinstance(ev, ToolCallStart):
                call_id = ev.id if self.tools.id_base is None else make_tool_call_id(ev.name,
                                                                                     self.tools.id_base + ev.index)
                self.calls.append({"id": call_id, "name": ev.name, "arguments": ""})
                self.emit(("tool_start", ev.index, call_id, ev.name))
            elif isinstance(ev, ToolCallArgsDelta):
                self.calls[ev.index]["arguments"] += ev.text
                self.emit(("tool_args", ev.index, ev.text))


# ----------------------------------------------------------------------------------------------------- worker

@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    output: Output
    post: Callable[[tuple], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    kind: str = "chat"


@dataclass
class Finished:
    """A record of one finished (or cancelled) request."""

    kind: str
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


class Worker:
    """The thread that owns the model: runs jobs in arrival order over a pool of KV-cache slots."""

    def __init__(self, backend: Any, cache_slots: int = 4, max_queue: int = 256,
                 token_source: TokenSource | None = None):
        self.backend = backend
        self.max_slots = max(1, cache_slots)
        self.max_queue = max_queue
        self.token_source = token_source
        self.slots: list[_Slot] = []
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.busy = False
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
            job = self.jobs.get()
            if job is None:
                return
            self.busy = True
            try:
                self._run(job)
            except BaseException as e:  # noqa: BLE001 - the model thread must outlive any one request
                log.exception("request failed")
                job.post(("error", APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")))
            finally:
                self.busy = False

    def _pick(self, ids: list[int]) -> _Slot:
        """The slot whose conversation this prompt continues; otherwise a fresh (or least recently used) slot,
        seeded with the longest shared prefix (e.g. a common system prompt) copied from another slot's cache."""
        scored = [(_common_prefix(s.gen.tokens, ids), s) for s in self.slots]
        cont = [(n, s) for n, s in scored if n >= s.prompt_len]
        if cont:
            return max(cont, key=lambda x: (x[0], x[1].last_used))[1]
        if len(self.slots) < self.max_slots:
            target = _Slot(self.backend.new_generator())
            self.slots.append(target)
        else:
            target = min(self.slots, key=lambda s: s.last_used)
        n, donor = max(scored, key=lambda x: x[0], default=(0, None))
        if donor is not None and donor is not target and n >= MIN_COPY_PREFIX:
            target.gen.copy_prefix_from(donor.gen, n)
        target.prompt_len = 0
        return target

    def _run(self, job: Job) -> None:
        p = job.params
        stops = p.stop_ids if p.stop_ids is not None else frozenset(self.backend.stop_ids)
        if job.cancel.is_set():
            res = GenerationResult([], "cancelled", len(job.prompt), 0, 0.0, 0.0)
            self._finish(job, res)
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
            res = slot.gen.generate(job.prompt, p, stops, on_token=job.output.on_token,
                                    should_stop=job.cancel.is_set, choose=choose)
            slot.prompt_len = len(job.prompt)
            job.output.close()
        except ContextOverflow as e:
            job.post(("error", APIError(400, str(e), param="messages", code="context_length_exceeded")))
            return
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            log.exception("generation failed")
            if slot is not None:
                slot.gen.reset()
                slot.prompt_len = 0
            job.post(("error", APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))
            return
        self._finish(job, res)

    def _finish(self, job: Job, res: GenerationResult) -> None:
        self.finished.append(Finished(job.kind, job.params, res))
        out = job.output
        reason = res.finish_reason
        if reason == "stop" and out.calls:
            reason = "tool_calls"
        if res.tokens:
            log.info("%s: prompt %d tokens (%d cached), %d generated, %s; prefill %.1f tok/s, decode %.1f tok/s",
                     job.kind, res.prompt_tokens, res.cached_tokens, len(res.tokens), reason, res.prefill_tps,
                     res.decode_tps)
        job.post(("done", Done(reason, out.stop.hit, res.prompt_tokens, len(res.tokens), res.cached_tokens,
                               "".join(out.content), out.calls)))


# ------------------------------------------------------------------------------------------------ the app

@dataclass
class _Plan:
    """One request, ready to run."""

    prompt: list[int]
    params: SamplingParams
    stops: list[str]
    tools: ToolMode


class Server:
    """What the routes share: backend, worker, names, auth."""

    def __init__(self, backend: Any, model_name: str, api_key: str | None, worker: Worker):
        self.backend, self.model_name, self.api_key, self.worker = backend, model_name, api_key, worker
        self.created = int(time.time())

    # -- auth and body ------------------------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    async def body(self, request: Request) -> dict:
        self.auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"We could not parse the JSON body of your request ({e}).") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        _check_model(body, self.model_name)
        return body

    # -- planning -----------------------------------------------------------------------------------------------
    def finish_plan(self, prompt: list[int], params: SamplingParams, stops: list[str], tools: ToolMode,
                    param: str) -> _Plan:
        ctx = self.backend.max_context
        if not prompt:
            raise _bad(param, "the prompt is empty")
        if len(prompt) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your request has "
                                f"{len(prompt)} prompt tokens. Please reduce the length of the {param}.",
                           param=param, code="context_length_exceeded")
        room = ctx - len(prompt)
        if not params.extra.get("max_given"):
            params.max_tokens = room
        params.max_tokens = min(params.max_tokens, room)
        return _Plan(prompt, params, stops, tools)

    def chat_plan(self, messages: list[dict], tools: list[dict] | None, choice: str, params: SamplingParams,
                  stops: list[str]) -> _Plan:
        mode = _tool_mode(choice, tools, messages)
        try:
            prompt = self.backend.chat_ids(messages, tools if choice != "none" else None)
        except (ValueError, TypeError, KeyError) as e:  # ChatTemplateError is a ValueError
            raise _bad("messages", f"cannot render the conversation: {e}") from None
        if mode.prefix:
            prompt = prompt + self.backend.tokenizer.encode(mode.prefix, allow_special=True)
        return self.finish_plan(prompt, params, stops, mode, "messages")

    # -- running ------------------------------------------------------------------------------------------------
    def start(self, plan: _Plan, kind: str) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def post(ev: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        out = Output(self.backend.tokenizer, plan.stops, plan.tools, post)
        job = Job(plan.prompt, plan.params, out, post, kind=kind)
        self.worker.submit(job)
        return job, events


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (non-streaming requests)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            cancel.set()
            return


async def _run_to_end(request: Request, job: Job, events: asyncio.Queue) -> Done:
    watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
    try:
        while True:
            ev = await events.get()
            if ev[0] == "done":
                return ev[1]
            if ev[0] == "error":
                raise ev[1]
    finally:
        watcher.cancel()
        job.cancel.set()


async def _stream_events(job: Job, events: asyncio.Queue) -> AsyncIterator[tuple]:
    """Events until done/error; cancels the job when the consumer stops early (client disconnect)."""
    try:
        while True:
            ev = await events.get()
            yield ev
            if ev[0] in ("done", "error"):
                return
    finally:
        job.cancel.set()


def _sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _usage(d: Done) -> dict:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": d.cached_tokens}}


def _openai_finish(d: Done) -> str:
    return "stop" if d.finish_reason == "cancelled" else d.finish_reason


def _stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine_or_backend: Any, model_name: str, api_key: str | None = None, *, cache_slots: int = 4,
               max_queue: int = 256, _token_source: TokenSource | None = None) -> FastAPI:
    """The FastAPI app serving `engine_or_backend` (an Engine or anything with its interface) as `model_name`.

    api_key: when set, every endpoint but /health needs `Authorization: Bearer KEY` (or `x-api-key: KEY`).
    cache_slots: conversations whose KV cache is kept between requests.
    _token_source: testing seam, not an HTTP feature. Called with each prompt's token ids on the model thread;
    when it returns ids, they are emitted as if sampled (after a real prefill) and go through the same
    detokenize -> stop -> tool-call parsing path as model output.
    """
    worker = Worker(engine_or_backend, cache_slots=cache_slots, max_queue=max_queue, token_source=_token_source)
    srv = Server(engine_or_backend, model_name, api_key, worker)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="k2local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.k2 = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc, request.url.path.startswith("/v1/messages"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        msg = f"Unknown endpoint {request.method} {request.url.path}" if status == 404 else str(exc.detail)
        return _error_response(APIError(status, msg, code="not_found" if status == 404 else None),
                               request.url.path.startswith("/v1/messages"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"),
                               request.url.path.startswith("/v1/messages"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": worker.jobs.qsize(), "busy": worker.busy}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        srv.auth(request)
        return {"object": "list", "data": [_model_card(srv)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        srv.auth(request)
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return _model_card(srv)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await srv.body(request)
        _require_n1(body)
        _check_unsupported(body)
        messages = _chat_messages(body.get("messages"))
        tools = _tools(body.get("tools"))
        choice = _tool_choice(body.get("tool_choice"), tools)
        params = _sampling(body, None)
        stops = _stop_strings(body, "stop")
        stream = _flag(body, "stream")
        include_usage = _include_usage(body, stream)
        plan = await run_in_threadpool(srv.chat_plan, messages, tools, choice, params, stops)
        job, events = srv.start(plan, "chat")
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if stream:
            return _stream_response(_chat_stream(srv, job, events, cid, created, include_usage))
        d = await _run_to_end(request, job, events)
        msg: dict[str, Any] = {"role": "assistant", "content": d.content if (d.content or not d.tool_calls) else None}
        if d.tool_calls:
            msg["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in d.tool_calls]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": _openai_finish(d)}],
                "usage": _usage(d)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await srv.body(request)
        _require_n1(body)
        _check_unsupported(body)
        params = _sampling(body, 16, max_keys=("max_tokens",))
        stops = _stop_strings(body, "stop")
        stream = _flag(body, "stream")
        echo = _flag(body, "echo")
        include_usage = _include_usage(body, stream)
        prompt_text, prompt_ids = await run_in_threadpool(_completion_prompt, srv.backend, body.get("prompt"))
        plan = srv.finish_plan(prompt_ids, params, stops, ToolMode(), "prompt")
        job, events = srv.start(plan, "completion")
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        prefix = prompt_text if echo else ""
        if stream:
            return _stream_response(_completion_stream(srv, job, events, cid, created, include_usage, prefix))
        d = await _run_to_end(request, job, events)
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "text": prefix + d.content, "logprobs": None,
                             "finish_reason": "length" if d.finish_reason == "length" else "stop"}],
                "usage": _usage(d)}

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        body = await srv.body(request)
        plan = await run_in_threadpool(_anthropic_plan, srv, body)
        job, events = srv.start(plan, "messages")
        mid = "msg_" + uuid.uuid4().hex[:24]
        if _flag(body, "stream"):
            return _stream_response(_anthropic_stream(srv, job, events, mid))
        d = await _run_to_end(request, job, events)
        content: list[dict] = [{"type": "text", "text": d.content}] if d.content or not d.tool_calls else []
        content += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": _json_input(c["arguments"])}
                    for c in d.tool_calls]
        return {"id": mid, "type": "message", "role": "assistant", "model": model_name, "content": content,
                "stop_reason": _anthropic_stop(d), "stop_sequence": d.stop_sequence,
                "usage": {"input_tokens": d.prompt_tokens, "output_tokens": d.completion_tokens,
                          "cache_read_input_tokens": d.cached_tokens}}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        body = await srv.body(request)
        body = {**body, "max_tokens": body.get("max_tokens") or 1}
        plan = await run_in_threadpool(_anthropic_plan, srv, body)
        return {"input_tokens": len(plan.prompt)}

    return app


def _model_card(srv: Server) -> dict:
    return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "k2local",
            "max_model_len": srv.backend.max_context}


# ------------------------------------------------------------------------------------- OpenAI chat streaming

async def _chat_stream(srv: Server, job: Job, events: asyncio.Queue, cid: str, created: int,
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": srv.model_name,
                             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    yield chunk({"role": "assistant", "content": ""})
    async for ev in _stream_events(job, events):
        kind = ev[0]
        if kind == "text":
            yield chunk({"content": ev[1]})
        elif kind == "tool_start":
            yield chunk({"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                         "function": {"name": ev[3], "arguments": ""}}]})
        elif kind == "tool_args":
            yield chunk({"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]})
        elif kind == "error":
            err: APIError = ev[1]
            yield _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
        elif kind == "done":
            d: Done = ev[1]
            yield chunk({}, _openai_finish(d))
            if include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": srv.model_name, "choices": [], "usage": _usage(d)})
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------ completions

def _completion_prompt(backend: Any, prompt: Any) -> tuple[str, list[int]]:
    """A completions prompt (string, [string], token ids or [token ids]) -> (text, ids)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    tok = backend.tokenizer
    if isinstance(prompt, str):
        return prompt, tok.encode(prompt, allow_special=True)
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        vocab = getattr(tok, "vocab_size", None)
        if any(i < 0 or (vocab is not None and i >= vocab) for i in prompt):
            raise _bad("prompt", f"prompt token ids must be in [0, {vocab})")
        try:
            return tok.decode(prompt), list(prompt)
        except ValueError as e:  # TokenizerError: an id outside the vocabulary
            raise _bad("prompt", str(e)) from None
    raise _bad("prompt", "'prompt' must be a string or a list of token ids (one prompt per request)")


async def _completion_stream(srv: Server, job: Job, events: asyncio.Queue, cid: str, created: int,
                             include_usage: bool, prefix: str) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None) -> str:
        c: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": srv.model_name,
                             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    if prefix:
        yield chunk(prefix)
    async for ev in _stream_events(job, events):
        if ev[0] == "text":
            yield chunk(ev[1])
        elif ev[0] == "error":
            err: APIError = ev[1]
            yield _sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}})
        elif ev[0] == "done":
            d: Done = ev[1]
            yield chunk("", "length" if d.finish_reason == "length" else "stop")
            if include_usage:
                yield _sse({"id": cid, "object": "text_completion", "created": created, "model": srv.model_name,
                            "choices": [], "usage": _usage(d)})
    yield "data: [DONE]\n\n"


# -------------------------------------------------------------------------------------------- Anthropic

def _anthropic_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(None, f"{where}: content must be a string or a list of blocks")
    parts = []
    for b in content:
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise _bad(None, f"{where}: unsupported content block {kind!r} (only text is supported here)")
        parts.append(b["text"])
    return "".join(parts)


def _anthropic_messages(body: dict) -> list[dict]:
    """Anthropic system + messages -> OpenAI-style messages (tool_use -> tool_calls, tool_result -> tool)."""
    out: list[dict] = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _anthropic_text(system, "system")})
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad(None, "messages: must be a non-empty list")
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _bad(None, f"{where}: role must be 'user' or 'assistant'")
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(None, f"{where}: content must be a string or a list of blocks")
        texts: list[str] = []
        calls: list[dict] = []
        for j, b in enumerate(content):
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "text" and isinstance(b.get("text"), str):
                texts.append(b["text"])
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b.get("name"),
                                           "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user":
                res = b.get("content")
                text = "" if res is None else _anthropic_text(res, f"{where}.content.{j}")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": ("Error: " + text) if b.get("is_error") else text})
            elif kind in ("thinking", "redacted_thinking"):
                continue
            else:
                raise _bad(None, f"{where}.content.{j}: unsupported block type {kind!r}")
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def _anthropic_tools(body: dict) -> tuple[list[dict] | None, str]:
    raw = body.get("tools")
    tools = None
    if raw is not None:
        if not isinstance(raw, list):
            raise _bad(None, "tools: must be a list")
        tools = []
        for i, t in enumerate(raw):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise _bad(None, f"tools.{i}: needs a name")
            fn = {"name": t["name"], "description": t.get("description", ""),
                  "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
            tools.append({"type": "function", "function": fn})
        tools = _tools(tools)
    tc = body.get("tool_choice")
    kind = tc.get("type") if isinstance(tc, dict) else None
    if tc is None:
        choice: Any = None
    elif kind in ("auto", "none"):
        choice = kind
    elif kind == "any":
        choice = "required"
    elif kind == "tool":
        choice = {"type": "function", "function": {"name": tc.get("name")}}
    else:
        raise _bad(None, "tool_choice: type must be auto, any, tool or none")
    return tools, _tool_choice(choice, tools)


def _anthropic_plan(srv: Server, body: dict) -> _Plan:
    if _integer(body, "max_tokens", None, lo=1) is None:
        raise _bad("max_tokens", "max_tokens: field required")
    params = _sampling(body, None, temperature_scale=ANTHROPIC_TEMPERATURE_SCALE,
                       temperature_default=DEFAULT_TEMPERATURE, temperature_max=1.0, max_keys=("max_tokens",))
    stops = _stop_strings(body, "stop_sequences")
    messages = _anthropic_messages(body)
    tools, choice = _anthropic_tools(body)
    return srv.chat_plan(messages, tools, choice, params, stops)


def _anthropic_stop(d: Done) -> str:
    if d.finish_reason == "tool_calls":
        return "tool_use"
    if d.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if d.stop_sequence else "end_turn"


def _json_input(arguments: str) -> Any:
    try:
        v = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_raw_arguments": arguments}
    return v if isinstance(v, dict) else {"value": v}


async def _anthropic_stream(srv: Server, job: Job, events: asyncio.Queue, mid: str) -> AsyncIterator[str]:
    usage = {"input_tokens": len(job.prompt), "output_tokens": 0}
    yield _sse({"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": srv.model_name, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage}}, "message_start")
    block = -1  # index of the open content block
    open_kind: str | None = None
    tool_block: dict[int, int] = {}

    def close() -> Iterable[str]:
        nonlocal open_kind
        if open_kind is not None:
            open_kind = None
            yield _sse({"type": "content_block_stop", "index": block}, "content_block_stop")

    async for ev in _stream_events(job, events):
        kind = ev[0]
        if kind == "text":
            if open_kind != "text":
                for s in close():
                    yield s
                block, open_kind = block + 1, "text"
                yield _sse({"type": "content_block_start", "index": block,
                            "content_block": {"type": "text", "text": ""}}, "content_block_start")
            yield _sse({"type": "content_block_delta", "index": block,
                        "delta": {"type": "text_delta", "text": ev[1]}}, "content_block_delta")
        elif kind == "tool_start":
            for s in close():
                yield s
            block, open_kind = block + 1, "tool"
            tool_block[ev[1]] = block
            yield _sse({"type": "content_block_start", "index": block,
                        "content_block": {"type": "tool_use", "id": ev[2], "name": ev[3], "input": {}}},
                       "content_block_start")
        elif kind == "tool_args":
            yield _sse({"type": "content_block_delta", "index": tool_block[ev[1]],
                        "delta": {"type": "input_json_delta", "partial_json": ev[2]}}, "content_block_delta")
        elif kind == "error":
            err: APIError = ev[1]
            yield _sse({"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(err.status, "api_error"),
                                                   "message": err.message}}, "error")
        elif kind == "done":
            d: Done = ev[1]
            for s in close():
                yield s
            yield _sse({"type": "message_delta", "delta": {"stop_reason": _anthropic_stop(d),
                                                           "stop_sequence": d.stop_sequence},
                        "usage": {"output_tokens": d.completion_tokens}}, "message_delta")
            yield _sse({"type": "message_stop"}, "message_stop")
