"""OpenAI-compatible HTTP server over one Engine, plus Anthropic's ``/v1/messages`` and OpenAI's ``/v1/responses``
(k2local.server.responses).

One worker thread owns the model and runs up to ``parallel`` requests at once in shared forward steps (continuous
batching: each round one decoded token or prefill chunk of every request, in one forward), each on its own KV cache. A small pool of Generators keeps KV
caches, so a request that continues a cached conversation only prefills its new tokens. Output tokens go through
one path for every endpoint: stream-decode -> stop strings -> reasoning parser (thinking models) -> tool-call parser
(Kimi's or DeepSeek's dialect) -> events -> JSON / SSE.

Thinking models (a chat template that writes ``<think>``, or a prompt that opens it): the reasoning is parsed out of
the output and answered as OpenAI's ``reasoning_content`` (message and stream deltas) and Anthropic's ``thinking``
blocks; a model that does not think, or a request that turns thinking off (``chat_template_kwargs``
``{"thinking": false}``), gets its output as content exactly as before.
A client that disconnects (streaming or not) cancels its request, queued or running.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import threading
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2local.generate import ChatBackend
from k2local.sampler import SamplingParams, TokenLogprob
from k2local.server.anthropic import (
    anthropic_plan,
    anthropic_stop,
    anthropic_stream,
    json_input,
    thinking_block,
)
from k2local.server.events import (
    openai_finish,
    run_all_to_end,
    run_to_end,
    sse,
    stream_all,
    stream_events,
    stream_response,
    usage_json,
)
from k2local.server.logprobs import chat_logprobs_json, completion_logprobs_json
from k2local.server.requests import (
    APIError,
    ContextLengthError,
    Plan,
    ToolMode,
    bad_param,
    chat_logprobs,
    chat_messages,
    choice_count,
    completion_logprobs,
    check_logit_bias,
    check_model,
    check_unsupported,
    error_response,
    flag,
    parse_tool_choice,
    parse_tools,
    sampling_params,
    stop_strings,
    template_kwargs,
    thinking_disabled,
    tool_mode,
    want_usage,
)
from k2local.server.constraints import output_grammar, response_format_schema, tool_grammar
from k2local.server.responses import register_responses
from k2local.server.worker import Done, Failed, Job, Logprob, Output, RequestKind, ServerEvent, TokenSource, Worker
from k2local.chat.reasoning import THINK_END, ReasoningDelta, prompt_opens_reasoning, template_thinks
from k2local.chat.toolcalls import ContentDelta, ToolCallArgsDelta, ToolCallStart, tool_dialect

__all__ = ["APIError", "create_app"]

log = logging.getLogger("k2local.server.app")


# ------------------------------------------------------------------------------------------------ the app


class Server:
    """What the routes share: backend, worker, names, auth."""

    def __init__(self, backend: ChatBackend, model_name: str, api_key: str | None, worker: Worker,
                 ping_interval: float | None = 5.0):
        self.backend, self.model_name, self.api_key, self.worker = backend, model_name, api_key, worker
        self.ping_interval = ping_interval  # seconds without output before a stream sends a keep-alive
        self.created = int(time.time())
        self._thinks: bool | None = None

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
        except RecursionError:
            raise APIError(400, "We could not parse the JSON body of your request (nested too deeply).") from None
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        check_model(body, self.model_name)
        return body

    # -- planning -----------------------------------------------------------------------------------------------
    def finish_plan(self, prompt: list[int], params: SamplingParams, stops: list[str], tools: ToolMode,
                    param: str, check_context: bool = True) -> Plan:
        ctx = self.backend.max_context
        if not prompt:
            raise bad_param(param, "the prompt is empty")
        check_logit_bias(params, self.backend.tokenizer.vocab_size)
        if len(prompt) >= ctx:
            if check_context:
                raise ContextLengthError(len(prompt), ctx, param)
            return Plan(prompt, params, stops, tools)  # counted, never run
        room = ctx - len(prompt)
        if params.to_context_end:
            params.max_tokens = room
        params.max_tokens = min(params.max_tokens, room)
        return Plan(prompt, params, stops, tools)

    def chat_plan(self, messages: list[dict], tools: list[dict] | None, choice: str, params: SamplingParams,
                  stops: list[str], template_kwargs: dict[str, Any] | None = None, *,
                  check_context: bool = True, output_schema: dict[str, Any] | None = None,
                  schema_param: str = "response_format", parallel: bool = True) -> Plan:
        """``output_schema``: the answer is JSON satisfying it (response_format / text.format; a forced tool choice
        wins over it). A forced tool choice's call (tool_choice required / any / a name) is generated under a
        grammar: a declared tool, arguments valid for its schema; ``parallel`` lets more calls follow."""
        tok = self.backend.tokenizer
        dialect = tool_dialect(tok)
        mode = tool_mode(choice, tools, messages, dialect)
        kw = template_kwargs or {}
        try:
            prompt = self.backend.chat_ids(messages, tools if choice != "none" else None, **kw)
        except (ValueError, TypeError, KeyError) as e:  # ChatTemplateError is a ValueError
            raise bad_param("messages", f"cannot render the conversation: {e}") from None
        plan_reasoning = start = False
        if not thinking_disabled(kw):
            start = prompt_opens_reasoning(tok.decode(prompt[-16:]))
        if mode.prefix:  # a forced tool choice: the turn starts inside a call, never in reasoning
            prompt = prompt + tok.encode(mode.prefix, allow_special=True)
            forced = choice[3:] if choice.startswith("fn:") else None
            if forced is None and not mode.choices:  # 'required' with one tool: its call header is in the prefix
                forced = (tools or [])[0]["function"]["name"]
            params.constraint = tool_grammar(tok, dialect, mode, tools or [], forced, parallel)
        elif output_schema is not None:  # JSON out: an opened reasoning is closed empty first
            if start:
                prompt = prompt + tok.encode(THINK_END, allow_special=True)
            params.constraint = output_grammar(tok, output_schema, schema_param)
        elif not thinking_disabled(kw):
            plan_reasoning = start or self.thinks
        plan = self.finish_plan(prompt, params, stops, mode, "messages", check_context)
        plan.reasoning, plan.start_in_reasoning = plan_reasoning, start
        return plan

    @property
    def thinks(self) -> bool:
        """A thinking model: its chat template writes ``<think>`` / ``</think>`` (K2-Thinking, K2.5, DeepSeek-R1).
        Its output is parsed for reasoning even when the prompt does not open it (the model may write the tag)."""
        if self._thinks is None:
            self._thinks = template_thinks(getattr(self.backend, "template", None))
        return self._thinks

    # -- running ------------------------------------------------------------------------------------------------
    def start(self, plan: Plan, kind: RequestKind) -> tuple[Job, asyncio.Queue[ServerEvent]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[ServerEvent] = asyncio.Queue()

        def post(ev: ServerEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        out = Output(self.backend.tokenizer, plan.stops, plan.tools, post, plan.reasoning, plan.start_in_reasoning)
        job = Job(plan.prompt, plan.params, out, post, kind=kind)
        self.worker.submit(job)
        return job, events


    def start_n(self, plan: Plan, kind: RequestKind, n: int
                ) -> tuple[list[Job], asyncio.Queue[tuple[int, ServerEvent]]]:
        """``n`` choices of one plan, their events tagged with the choice index. The first runs at once; the others
        are submitted once its prompt is in the KV cache, so the worker copies that prefix into their slots
        (:meth:`Worker._pick`) instead of prefilling it n times. Choice i samples with ``seed + i``."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, ServerEvent]] = asyncio.Queue()
        jobs: list[Job] = []
        rest: list[Job] = []
        lock = threading.Lock()

        def start_rest() -> None:  # on the model thread (prefill done) or with the first choice's end
            with lock:
                todo, rest[:] = list(rest), []
            for j in todo:
                try:
                    self.worker.submit(j)
                except APIError as e:
                    j.post(Failed(e))

        for i in range(n):
            def post(ev: ServerEvent, i: int = i) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone (server shutting down)
                    pass
                if i == 0 and n > 1 and isinstance(ev, (Done, Failed)):
                    start_rest()

            seed = plan.params.seed
            params = dataclasses.replace(plan.params, seed=None if seed is None else seed + i)
            out = Output(self.backend.tokenizer, plan.stops, plan.tools, post, plan.reasoning,
                         plan.start_in_reasoning)
            if params.logprobs is not None:
                params.on_logprob = out.on_logprob
            jobs.append(Job(plan.prompt, params, out, post, kind=kind))
        rest.extend(jobs[1:])
        if rest:
            jobs[0].on_prefilled = start_rest
        self.worker.submit(jobs[0])
        return jobs, events


def create_app(engine_or_backend: ChatBackend, model_name: str, api_key: str | None = None, *, cache_slots: int = 4,
               max_queue: int = 256, parallel: int = 4, ping_interval: float | None = 5.0,
               _token_source: TokenSource | None = None) -> FastAPI:
    """The FastAPI app serving `engine_or_backend` (an Engine or anything with its interface) as `model_name`.

    api_key: when set, every endpoint but /health needs `Authorization: Bearer KEY` (or `x-api-key: KEY`).
    cache_slots: conversations whose KV cache is kept between requests (at least ``parallel``).
    parallel: requests run at once, batched into shared forward steps on the one model thread (each on its own KV
        cache).
    ping_interval: seconds without output (a long prefill) after which an Anthropic stream sends a ``ping`` event.
    _token_source: testing seam, not an HTTP feature. Called with each prompt's token ids on the model thread;
    when it returns ids, they are emitted as if sampled (after a real prefill) and go through the same
    detokenize -> stop -> tool-call parsing path as model output.
    """
    worker = Worker(engine_or_backend, cache_slots=cache_slots, max_queue=max_queue, token_source=_token_source,
                    parallel=parallel)
    srv = Server(engine_or_backend, model_name, api_key, worker, ping_interval)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # noqa: ANN202
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="k2local", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.k2 = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path.startswith("/v1/messages"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        msg = f"Unknown endpoint {request.method} {request.url.path}" if status == 404 else str(exc.detail)
        return error_response(APIError(status, msg, code="not_found" if status == 404 else None),
                               request.url.path.startswith("/v1/messages"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"),
                               request.url.path.startswith("/v1/messages"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": worker.jobs.qsize(), "busy": worker.busy,
                "running": len(worker.active), "parallel": worker.parallel, "batch": dataclasses.asdict(worker.batch)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        srv.auth(request)
        card = _model_card(srv)  # one listing for both APIs: OpenAI's fields and Anthropic's
        return {"object": "list", "data": [card], "has_more": False, "first_id": card["id"], "last_id": card["id"]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        srv.auth(request)
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return _model_card(srv)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await srv.body(request)
        n = choice_count(body)
        check_unsupported(body)
        messages = chat_messages(body.get("messages"))
        tools = parse_tools(body.get("tools"))
        choice = parse_tool_choice(body.get("tool_choice"), tools)
        params = sampling_params(body, None)
        params.logprobs = chat_logprobs(body)
        schema = response_format_schema(body)
        stops = stop_strings(body, "stop")
        stream = flag(body, "stream")
        include_usage = want_usage(body, stream)
        kw = template_kwargs(body)
        plan = await run_in_threadpool(srv.chat_plan, messages, tools, choice, params, stops, kw,
                                       output_schema=schema, parallel=body.get("parallel_tool_calls") is not False)
        jobs, events = srv.start_n(plan, "chat", n)
        cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
        if stream:
            return stream_response(_chat_stream(srv, jobs, events, cid, created, include_usage))
        ds = await run_all_to_end(request, jobs, events)
        tok = srv.backend.tokenizer
        choices = []
        for i, d in enumerate(ds):
            msg: dict[str, Any] = {"role": "assistant",
                                   "content": d.content if (d.content or not d.tool_calls) else None}
            if d.reasoning:
                msg["reasoning_content"] = d.reasoning
            if d.tool_calls:
                msg["tool_calls"] = [c.to_openai() for c in d.tool_calls]
            lp = chat_logprobs_json(tok, d.logprobs) if params.logprobs is not None else None
            choices.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": openai_finish(d)})
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage_json(*ds)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await srv.body(request)
        n = choice_count(body)
        check_unsupported(body)
        params = sampling_params(body, 16, max_keys=("max_tokens",))
        params.logprobs = completion_logprobs(body)
        stops = stop_strings(body, "stop")
        stream = flag(body, "stream")
        echo = flag(body, "echo")
        include_usage = want_usage(body, stream)
        prompt_text, prompt_ids = await run_in_threadpool(_completion_prompt, srv.backend, body.get("prompt"))
        plan = srv.finish_plan(prompt_ids, params, stops, ToolMode(raw=True), "prompt")
        jobs, events = srv.start_n(plan, "completion", n)
        cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
        prefix = prompt_text if echo else ""
        if stream:
            return stream_response(_completion_stream(srv, jobs, events, cid, created, include_usage, prefix))
        ds = await run_all_to_end(request, jobs, events)
        tok = srv.backend.tokenizer
        return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                "choices": [{"index": i, "text": prefix + d.content,
                             "logprobs": (completion_logprobs_json(tok, d.logprobs, len(prefix))
                                          if params.logprobs is not None else None),
                             "finish_reason": "length" if d.finish_reason == "length" else "stop"}
                            for i, d in enumerate(ds)],
                "usage": usage_json(*ds)}

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        body = await srv.body(request)
        plan = await run_in_threadpool(anthropic_plan, srv, body)
        job, events = srv.start(plan, "messages")
        mid = "msg_" + uuid.uuid4().hex[:24]
        if flag(body, "stream"):
            return stream_response(anthropic_stream(srv, job, events, mid))
        d = await run_to_end(request, job, events)
        content: list[dict] = [thinking_block(d.reasoning)] if d.reasoning else []
        content += [{"type": "text", "text": d.content}] if d.content or not d.tool_calls else []
        content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": json_input(c.arguments)}
                    for c in d.tool_calls]
        return {"id": mid, "type": "message", "role": "assistant", "model": model_name, "content": content,
                "stop_reason": anthropic_stop(d), "stop_sequence": d.stop_sequence,
                "usage": {"input_tokens": d.prompt_tokens, "output_tokens": d.completion_tokens,
                          "cache_read_input_tokens": d.cached_tokens}}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        body = await srv.body(request)
        body = {**body, "max_tokens": body.get("max_tokens") or 1}
        plan = await run_in_threadpool(anthropic_plan, srv, body, True)
        return {"input_tokens": len(plan.prompt)}

    register_responses(app, srv)  # POST /v1/responses, GET / DELETE /v1/responses/{id}
    return app


def _model_card(srv: Server) -> dict:
    """The served model as OpenAI's and Anthropic's model listings describe it, with its context window under the
    names clients read (vLLM's ``max_model_len``, llama-server / OpenRouter's ``context_length``)."""
    ctx = srv.backend.max_context
    created_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(srv.created))
    return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "k2local",
            "max_model_len": ctx, "context_length": ctx, "context_window": ctx,
            "type": "model", "display_name": srv.model_name, "created_at": created_at}


# ------------------------------------------------------------------------------------- OpenAI chat streaming

def _openai_error(err: APIError) -> dict:
    """An error event of an OpenAI stream."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


async def _chat_stream(srv: Server, jobs: list[Job], events: asyncio.Queue[tuple[int, ServerEvent]], cid: str,
                       created: int, include_usage: bool) -> AsyncIterator[str]:
    """The n choices' chunks as they come (each with its ``index``); a choice's logprobs ride on its next content
    chunk (those of tokens that wrote no content, on its finish chunk)."""
    tok = srv.backend.tokenizer
    want_lp = jobs[0].params.logprobs is not None
    pending: list[list[TokenLogprob]] = [[] for _ in jobs]

    def chunk(i: int, delta: dict, finish: str | None = None, with_lp: bool = False) -> str:
        lp = None
        if with_lp and want_lp and pending[i]:
            lp, pending[i] = chat_logprobs_json(tok, pending[i]), []
        c: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                             "model": srv.model_name,
                             "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return sse(c)

    for i in range(len(jobs)):
        yield chunk(i, {"role": "assistant", "content": ""})
    done: list[Done] = []
    async for i, ev in stream_all(jobs, events):
        if isinstance(ev, Logprob):
            pending[i].append(ev.item)
        elif isinstance(ev, ContentDelta):
            yield chunk(i, {"content": ev.text}, with_lp=True)
        elif isinstance(ev, ReasoningDelta):
            yield chunk(i, {"reasoning_content": ev.text})
        elif isinstance(ev, ToolCallStart):
            yield chunk(i, {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                            "function": {"name": ev.name, "arguments": ""}}]})
        elif isinstance(ev, ToolCallArgsDelta):
            yield chunk(i, {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]})
        elif isinstance(ev, Failed):
            yield sse(_openai_error(ev.error))
        elif isinstance(ev, Done):
            done.append(ev)
            yield chunk(i, {}, openai_finish(ev), with_lp=True)
    if include_usage and done:
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": srv.model_name, "choices": [], "usage": usage_json(*done)})
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------ completions

def _completion_prompt(backend: ChatBackend, prompt: Any) -> tuple[str, list[int]]:
    """A completions prompt (string, [string], token ids or [token ids]) -> (text, ids)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    tok = backend.tokenizer
    if isinstance(prompt, str):
        ids = tok.encode(prompt, allow_special=True)
        bos = tok.bos_id
        if tok.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids  # DeepSeek-V3's tokenizer prepends BOS to a raw prompt (Kimi's never does)
        return prompt, ids
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        vocab = tok.vocab_size
        if any(i < 0 or i >= vocab for i in prompt):
            raise bad_param("prompt", f"prompt token ids must be in [0, {vocab})")
        try:
            return tok.decode(prompt), list(prompt)
        except ValueError as e:  # TokenizerError: an id outside the vocabulary
            raise bad_param("prompt", str(e)) from None
    raise bad_param("prompt", "'prompt' must be a string or a list of token ids (one prompt per request)")


async def _completion_stream(srv: Server, jobs: list[Job], events: asyncio.Queue[tuple[int, ServerEvent]],
                             cid: str, created: int, include_usage: bool, prefix: str) -> AsyncIterator[str]:
    tok = srv.backend.tokenizer
    want_lp = jobs[0].params.logprobs is not None
    pending: list[list[TokenLogprob]] = [[] for _ in jobs]
    offset = [len(prefix)] * len(jobs)

    def chunk(i: int, text: str, finish: str | None = None) -> str:
        lp = None
        if want_lp and pending[i]:
            lp, pending[i] = completion_logprobs_json(tok, pending[i], offset[i]), []
            offset[i] += sum(len(t) for t in lp["tokens"])
        c: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": srv.model_name,
                             "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return sse(c)

    if prefix:
        for i in range(len(jobs)):
            yield chunk(i, prefix)
    done: list[Done] = []
    async for i, ev in stream_all(jobs, events):
        if isinstance(ev, Logprob):
            pending[i].append(ev.item)
        elif isinstance(ev, ContentDelta):
            yield chunk(i, ev.text)
        elif isinstance(ev, Failed):
            yield sse(_openai_error(ev.error))
        elif isinstance(ev, Done):
            done.append(ev)
            yield chunk(i, "", "length" if ev.finish_reason == "length" else "stop")
    if include_usage and done:
        yield sse({"id": cid, "object": "text_completion", "created": created, "model": srv.model_name,
                   "choices": [], "usage": usage_json(*done)})
    yield "data: [DONE]\n\n"
