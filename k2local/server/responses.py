"""OpenAI's Responses API (``POST /v1/responses``) over the same worker as the chat endpoints.

The request is translated into chat messages and tools and planned like a chat completion (same template, tool-call
parser, reasoning parser); the worker's typed events are turned into Responses output items by one state machine
(:class:`_Items`) for both the JSON answer and the stream, so the two always agree.

Input: ``input`` as a string or a list of items: ``message`` items (roles user / assistant / system / developer,
content a string or ``input_text`` / ``output_text`` parts), ``function_call`` and ``function_call_output`` items
of earlier turns (``custom_tool_call`` / ``custom_tool_call_output`` are read the same way), and ``reasoning``
items sent back (their text becomes the next assistant turn's ``reasoning_content`` for the template).
``instructions`` becomes the leading system message. Function ``tools`` become the template's tools; tools of other
types (web_search, local_shell, custom, ...) are not something a local model can run and are left out.

Output: ``reasoning`` items (a thinking model's reasoning as ``content`` ``reasoning_text``; ``summary`` stays empty,
since nothing summarizes it), ``message`` items with ``output_text`` parts, ``function_call`` items whose
``call_id`` is the model's tool-call id. With ``include: ["reasoning.encrypted_content"]`` (Codex with
``store: false``) a reasoning item also carries its text in ``encrypted_content`` (encoded, not encrypted: this
server keeps no secrets), which is read back when the item returns without its content.

Streaming follows OpenAI's event sequence (``response.created``, ``response.in_progress``, per item
``response.output_item.added`` / ``.content_part.added`` / deltas / ``.done`` events, then ``response.completed``,
or ``response.incomplete`` when ``max_output_tokens`` cut the answer, or ``error`` + ``response.failed``), each
event with its ``sequence_number``.

``store`` (OpenAI's default: true) keeps the finished response and its conversation in memory (the newest
:data:`MAX_STORED`), so ``previous_response_id`` can continue it and ``GET /v1/responses/{id}`` returns it; with
``store: false`` nothing is kept.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from k2local.chat.reasoning import ReasoningDelta
from k2local.chat.toolcalls import ContentDelta, ToolCallArgsDelta, ToolCallStart
from k2local.server.events import sse, stream_events, stream_response
from k2local.server.constraints import text_format_schema
from k2local.server.requests import (
    APIError,
    ChatPlanner,
    Plan,
    bad_param,
    flag,
    integer_param,
    parse_tool_choice,
    parse_tools,
    sampling_params,
    template_kwargs,
)
from k2local.generate import ChatBackend
from k2local.server.worker import Done, Failed, Job, RequestKind, ServerEvent


class Server(ChatPlanner, Protocol):
    """What this endpoint needs from k2local.server.app.Server (a protocol, so the app can import this module)."""

    backend: ChatBackend

    def auth(self, request: Request) -> None: ...

    async def body(self, request: Request) -> dict: ...

    def start(self, plan: Plan, kind: RequestKind) -> tuple[Job, asyncio.Queue[ServerEvent]]: ...

log = logging.getLogger("k2local.server.responses")

MAX_STORED = 256  # stored responses kept for previous_response_id (oldest dropped first)
ENCRYPTED_PREFIX = "k2local:"  # our (plain, base64) stand-in for encrypted reasoning content
IMAGE_NOTE = "[an image or file was here: this model reads text only]"  # stands for one in a tool's output
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text", "refusal")
_IGNORED_ITEMS = ("web_search_call", "file_search_call", "local_shell_call", "local_shell_call_output",
                  "image_generation_call", "code_interpreter_call", "computer_call", "computer_call_output",
                  "mcp_list_tools", "mcp_call", "shell_call", "shell_call_output", "compaction")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------- request -> chat

def _text_of(content: Any, where: str, images: str | None = None) -> str:
    """A message's (or a tool output's) content: a string or a list of text parts -> text. Image, file and audio
    parts are an error, or (tool outputs: `images`) replaced by that note, so that an agent's session goes on."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_param("input", f"{where}: content must be a string or a list of content parts")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in _TEXT_PARTS and isinstance(p.get("text", p.get("refusal")), str):
            out.append(p.get("text", p.get("refusal")))
        elif kind in ("input_image", "input_file", "input_audio") and images is not None:
            out.append(images)
        elif kind in ("input_image", "input_file", "input_audio"):
            raise bad_param("input", f"{where}.content[{j}]: {kind} is not supported (this model reads text only)")
        else:
            raise bad_param("input", f"{where}.content[{j}]: unsupported content part type {kind!r}")
    return "".join(out)


def _reasoning_text(item: dict, where: str) -> str:
    """The text of a reasoning item sent back: its content, else its summary, else our encrypted_content."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if parts:
            return _text_of(parts, where)
    enc = item.get("encrypted_content")
    if isinstance(enc, str) and enc.startswith(ENCRYPTED_PREFIX):
        try:
            return base64.b64decode(enc[len(ENCRYPTED_PREFIX):], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            pass
    return ""  # another server's encrypted reasoning: nothing a local template can use


def _arguments(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v if v is not None else {}, ensure_ascii=False)


def input_messages(raw: Any) -> list[dict]:
    """``input`` (a string or a list of items) -> OpenAI chat messages (assistant tool_calls, tool results)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list):
        raise bad_param("input", "'input' must be a string or a list of input items")
    out: list[dict] = []
    reasoning: list[str] = []  # reasoning items waiting for the assistant turn they belong to

    def assistant(fresh: bool) -> dict:
        """The assistant message to add to: the last one when it is last (and not `fresh`), else a new one."""
        if not fresh and out and out[-1]["role"] == "assistant":
            msg = out[-1]
        else:
            msg = {"role": "assistant", "content": ""}
            out.append(msg)
        if reasoning:
            msg["reasoning_content"] = msg.get("reasoning_content", "") + "".join(reasoning)
            reasoning.clear()
        return msg

    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_param("input", f"{where} must be an object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in _MESSAGE_ROLES:
                raise bad_param("input", f"{where}: role must be one of {list(_MESSAGE_ROLES)}, got {role!r}")
            text = _text_of(item.get("content", ""), where)
            if role == "assistant":
                msg = assistant(fresh=bool(out and out[-1].get("tool_calls")))
                msg["content"] += text
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind in ("function_call", "custom_tool_call"):
            name, call_id = item.get("name"), item.get("call_id")
            if not isinstance(name, str) or not name:
                raise bad_param("input", f"{where}: a {kind} item needs a name")
            if not isinstance(call_id, str) or not call_id:
                raise bad_param("input", f"{where}: a {kind} item needs a call_id")
            args = _arguments(item.get("arguments") if kind == "function_call" else item.get("input", ""))
            msg = assistant(fresh=False)
            msg.setdefault("tool_calls", []).append(
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad_param("input", f"{where}: a {kind} item needs a call_id")
            output = item.get("output")
            if output is None:
                raise bad_param("input", f"{where}: a {kind} item needs an output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _text_of(output, where + ".output", IMAGE_NOTE)})
        elif kind == "reasoning":
            text = _reasoning_text(item, where)
            if text:
                reasoning.append(text)
        elif kind == "item_reference":
            raise bad_param("input", f"{where}: item_reference is not supported; send the item itself, or use "
                                     "previous_response_id")
        elif kind in _IGNORED_ITEMS:
            continue  # a built-in tool of OpenAI's that this server never offers: nothing to render
        else:
            raise bad_param("input", f"{where}: unsupported input item type {kind!r}")
    return out


def request_tools(raw: Any) -> tuple[list[dict] | None, list[dict]]:
    """Responses ``tools`` -> (chat tools for the template, function tools echoed in the response)."""
    if raw is None:
        return None, []
    if not isinstance(raw, list):
        raise bad_param("tools", "'tools' must be a list")
    chat: list[dict] = []
    echo: list[dict] = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or not isinstance(t.get("type"), str):
            raise bad_param("tools", f"tools[{i}] must be an object with a type")
        if t["type"] != "function":
            log.info("responses: tools[%d] of type %r left out (only function tools reach the model)", i, t["type"])
            continue
        fn = {"name": t.get("name"), "description": t.get("description") or "",
              "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
        chat.append({"type": "function", "function": fn})
        echo.append({"type": "function", "name": t.get("name"), "description": t.get("description"),
                     "parameters": t.get("parameters"), "strict": t.get("strict")})
    try:
        tools = parse_tools(chat)
    except APIError as e:
        raise bad_param("tools", e.message.replace(".function.", ".")) from None
    return tools, echo


def request_tool_choice(raw: Any, tools: list[dict] | None) -> str:
    """auto / none / required / {"type": "function", "name": ...} -> the chat planner's choice."""
    if raw is None or raw in ("auto", "none", "required"):
        if raw == "required" and not tools:
            raise bad_param("tool_choice", "tool_choice 'required' needs function tools")
        return parse_tool_choice(raw, tools)
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "function" and isinstance(raw.get("name"), str):
        return parse_tool_choice({"type": "function", "function": {"name": raw["name"]}}, tools)
    if kind == "allowed_tools" and raw.get("mode") in ("auto", "required"):
        return parse_tool_choice(raw["mode"], tools)
    raise bad_param("tool_choice", "tool_choice must be 'auto', 'none', 'required' or "
                                   "{\"type\": \"function\", \"name\": ...}")


def _check_unsupported(body: dict) -> None:
    if body.get("top_logprobs") not in (None, 0):
        raise bad_param("top_logprobs", "logprobs are not supported by k2local")
    if flag(body, "background"):
        raise bad_param("background", "background responses are not supported by k2local")
    for key in ("conversation", "prompt"):
        if body.get(key) is not None:
            raise bad_param(key, f"'{key}' is not supported by k2local")
    include = body.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(s, str) for s in include)):
        raise bad_param("include", "'include' must be a list of strings")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise bad_param("reasoning", "'reasoning' must be an object")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, (str, list)):
        raise bad_param("instructions", "'instructions' must be a string")


def _template_kw(body: dict) -> dict[str, Any]:
    """chat_template_kwargs (extra body), and ``reasoning.effort: "none"`` as the template's thinking=False."""
    kw = template_kwargs(body)
    r = body.get("reasoning")
    if isinstance(r, dict) and r.get("effort") == "none" and "thinking" not in kw:
        kw["thinking"] = False
    return kw


class ResponsesRequest:
    """One validated Responses request: its plan, what the response echoes, and its conversation."""

    def __init__(self, srv: Server, body: dict, history: list[dict]):
        _check_unsupported(body)
        instructions = body.get("instructions")
        if isinstance(instructions, list):  # instructions as a list of input items: they lead the conversation
            lead = input_messages(instructions)
        else:
            lead = [{"role": "system", "content": instructions}] if instructions else []
        # the conversation a stored response keeps: instructions are not carried over to the next response
        self.conversation = history + input_messages(body.get("input"))
        if not any(m["role"] != "system" for m in self.conversation):
            raise bad_param("input", "'input' holds no message, function call or function call output")
        messages = lead + self.conversation
        tools, self.tools_echo = request_tools(body.get("tools"))
        tc = body.get("tool_choice")
        if isinstance(tc, dict) and tc.get("type") == "allowed_tools" and tools:  # only these reach the model
            allowed = {t.get("name") for t in tc.get("tools") or [] if isinstance(t, dict)}
            tools = [t for t in tools if t["function"]["name"] in allowed] or None
        choice = request_tool_choice(tc, tools)
        params = sampling_params(body, None, max_keys=("max_output_tokens",))
        self.max_output_tokens = integer_param(body, "max_output_tokens", None, lo=1)
        self.parallel = body.get("parallel_tool_calls") is not False
        self.store = body.get("store") is not False
        include = body.get("include") or []
        self.encrypted = "reasoning.encrypted_content" in include
        self.stream = flag(body, "stream")
        try:
            schema = text_format_schema(body)
            self.plan: Plan = srv.chat_plan(messages, tools, choice, params, [], _template_kw(body),
                                            output_schema=schema, schema_param="text.format",
                                            parallel=self.parallel)
        except APIError as e:  # the chat planner names its own fields
            if e.param == "messages":
                e.param, e.message = "input", e.message.replace("length of the messages", "length of the input")
            raise
        reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else None
        self.echo: dict[str, Any] = {
            "instructions": instructions, "max_output_tokens": self.max_output_tokens,
            "model": srv.model_name, "parallel_tool_calls": self.parallel,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
            "store": self.store, "temperature": params.temperature, "text": {"format": _format_echo(body)},
            "tool_choice": _choice_echo(body.get("tool_choice"), tools), "tools": self.tools_echo,
            "top_p": params.top_p, "truncation": "disabled", "user": body.get("user"),
            "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        }


def _format_echo(body: dict) -> Any:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    return fmt if isinstance(fmt, dict) else {"type": "text"}


def _choice_echo(raw: Any, tools: list[dict] | None) -> Any:
    if raw is None:
        return "auto" if tools else "none"
    return raw


# ------------------------------------------------------------------------------------ events -> output items

class _Items:
    """Worker events -> the response's output items, and (when streaming) the Responses stream events."""

    def __init__(self, req: ResponsesRequest, rid: str, tokenizer: Any, stream: bool):
        self.req, self.rid, self.tokenizer, self.stream = req, rid, tokenizer, stream
        self.created_at = int(time.time())
        self.output: list[dict] = []
        self.open: dict | None = None  # the item being written (the last of output)
        self.open_call = -1  # the worker's index of the open function call
        self.seq = 0
        self.stop_requested = False  # parallel_tool_calls false and a second call began: the job should stop
        self.done: Done | None = None
        self.reasoning_text: list[str] = []

    # -- the response object ------------------------------------------------------------------------------------
    def response(self, status: str, error: APIError | None = None) -> dict:
        d = self.done
        usage = None
        if d is not None:
            reasoning_tokens = (len(self.tokenizer.encode("".join(self.reasoning_text), allow_special=False))
                                if self.reasoning_text else 0)
            usage = {"input_tokens": d.prompt_tokens, "input_tokens_details": {"cached_tokens": d.cached_tokens},
                     "output_tokens": d.completion_tokens,
                     "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, d.completion_tokens)},
                     "total_tokens": d.prompt_tokens + d.completion_tokens}
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.rid, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": int(time.time()) if status == "completed" else None,
                "error": None if error is None else {"code": error.code or error.type, "message": error.message},
                "incomplete_details": incomplete, **self.req.echo, "output": self.output, "usage": usage}

    # -- events -------------------------------------------------------------------------------------------------
    def _ev(self, out: list[dict], type: str, **fields: Any) -> None:
        if self.stream:
            out.append({"type": type, "sequence_number": self.seq, **copy.deepcopy(fields)})
            self.seq += 1

    def start(self) -> list[dict]:
        out: list[dict] = []
        self._ev(out, "response.created", response=self.response("in_progress"))
        self._ev(out, "response.in_progress", response=self.response("in_progress"))
        return out

    def feed(self, ev: ServerEvent) -> list[dict]:
        out: list[dict] = []
        if isinstance(ev, Done):
            self._close(out)
            self.done = ev
            if ev.finish_reason == "length":
                self._ev(out, "response.incomplete", response=self.response("incomplete"))
            else:
                self._ev(out, "response.completed", response=self.response("completed"))
            return out
        if isinstance(ev, Failed):
            self._close(out, "incomplete")
            err = ev.error
            self._ev(out, "error", code=err.code or err.type, message=err.message, param=err.param)
            self._ev(out, "response.failed", response=self.response("failed", err))
            return out
        if self.stop_requested:
            return out  # output past the first tool call, with parallel_tool_calls false: dropped
        if isinstance(ev, ReasoningDelta):
            self.reasoning_text.append(ev.text)
            self._text(out, "reasoning", ev.text)
        elif isinstance(ev, ContentDelta):
            self._text(out, "message", ev.text)
        elif isinstance(ev, ToolCallStart):
            if not self.req.parallel and any(i["type"] == "function_call" for i in self.output):
                self.stop_requested = True
                return out
            self._close(out)
            item = {"id": _new_id("fc"), "type": "function_call", "status": "in_progress", "call_id": ev.id,
                    "name": ev.name, "arguments": ""}
            self._add(out, item)
            self.open_call = ev.index
        elif isinstance(ev, ToolCallArgsDelta):
            item = self.open
            if item is None or item["type"] != "function_call" or ev.index != self.open_call:
                return out  # a dropped call's arguments
            item["arguments"] += ev.text
            self._ev(out, "response.function_call_arguments.delta", item_id=item["id"],
                     output_index=len(self.output) - 1, delta=ev.text)
        return out

    def _add(self, out: list[dict], item: dict) -> None:
        self.output.append(item)
        self.open = item
        self._ev(out, "response.output_item.added", output_index=len(self.output) - 1, item=item)

    def _text(self, out: list[dict], kind: str, text: str) -> None:
        if not text:
            return
        item = self.open
        idx = len(self.output) - 1
        if item is None or item["type"] != kind:
            self._close(out)
            if kind == "message":
                item = {"id": _new_id("msg"), "type": "message", "status": "in_progress", "role": "assistant",
                        "content": []}
                part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"id": _new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                        "content": []}
                part = {"type": "reasoning_text", "text": ""}
            self._add(out, item)
            idx = len(self.output) - 1
            item["content"].append(part)
            self._ev(out, "response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                     part=part)
        part = item["content"][0]
        part["text"] += text
        if kind == "message":
            self._ev(out, "response.output_text.delta", item_id=item["id"], output_index=idx, content_index=0,
                     delta=text, logprobs=[])
        else:
            self._ev(out, "response.reasoning_text.delta", item_id=item["id"], output_index=idx, content_index=0,
                     delta=text)

    def _close(self, out: list[dict], status: str = "completed") -> None:
        item, self.open = self.open, None
        if item is None:
            return
        idx = len(self.output) - 1
        item["status"] = status
        if item["type"] == "function_call":
            self._ev(out, "response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                     name=item["name"], arguments=item["arguments"])
        else:
            part = item["content"][0]
            if item["type"] == "message":
                self._ev(out, "response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                         text=part["text"], logprobs=[])
            else:
                self._ev(out, "response.reasoning_text.done", item_id=item["id"], output_index=idx,
                         content_index=0, text=part["text"])
                if self.req.encrypted:
                    item["encrypted_content"] = ENCRYPTED_PREFIX + base64.b64encode(
                        part["text"].encode("utf-8")).decode("ascii")
            self._ev(out, "response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                     part=part)
        self._ev(out, "response.output_item.done", output_index=idx, item=item)

    def status(self) -> str:
        d = self.done
        return "incomplete" if d is not None and d.finish_reason == "length" else "completed"

    def assistant_messages(self) -> list[dict]:
        """The output as chat messages (for the conversation a stored response continues)."""
        msgs: list[dict] = []
        cur: dict | None = None
        for item in self.output:
            if cur is None or (item["type"] != "function_call" and cur.get("tool_calls")):
                cur = {"role": "assistant", "content": ""}
                msgs.append(cur)
            if item["type"] == "reasoning":
                cur["reasoning_content"] = cur.get("reasoning_content", "") + item["content"][0]["text"]
            elif item["type"] == "message":
                cur["content"] += item["content"][0]["text"]
            else:
                cur.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                    "name": item["name"], "arguments": item["arguments"]}})
        return msgs


# -------------------------------------------------------------------------------------------------- the routes

class _Store:
    """Finished responses (store: true), newest last, for previous_response_id and GET."""

    def __init__(self, limit: int = MAX_STORED):
        self.limit = limit
        self.items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()
        self.lock = threading.Lock()

    def put(self, rid: str, response: dict, conversation: list[dict]) -> None:
        with self.lock:
            self.items[rid] = (response, conversation)
            while len(self.items) > self.limit:
                self.items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        with self.lock:
            return self.items.get(rid)

    def pop(self, rid: str) -> bool:
        with self.lock:
            return self.items.pop(rid, None) is not None


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            cancel.set()
            return


def register_responses(app: FastAPI, srv: Server) -> None:
    """Add ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}`` to the app."""
    store = _Store()

    def not_found(rid: str, param: str | None = None) -> APIError:
        return APIError(404 if param is None else 400, f"Response with id '{rid}' not found.", param=param,
                        code="previous_response_not_found" if param else "not_found")

    def plan(body: dict) -> ResponsesRequest:
        prev = body.get("previous_response_id")
        history: list[dict] = []
        if prev is not None:
            if not isinstance(prev, str):
                raise bad_param("previous_response_id", "'previous_response_id' must be a string")
            stored = store.get(prev)
            if stored is None:
                raise not_found(prev, "previous_response_id")
            history = list(stored[1])
        return ResponsesRequest(srv, body, history)

    def finish(req: ResponsesRequest, items: _Items) -> None:
        if req.store and items.done is not None:
            store.put(items.rid, items.response(items.status()), req.conversation + items.assistant_messages())

    async def events_of(job: Job, events: asyncio.Queue[ServerEvent], items: _Items) -> AsyncIterator[list[dict]]:
        async for ev in stream_events(job, events):
            out = items.feed(ev)
            if items.stop_requested:
                job.cancel.set()
            yield out
            if isinstance(ev, Failed) and not items.stream:
                raise ev.error

    async def run_stream(req: ResponsesRequest, job: Job, events: asyncio.Queue[ServerEvent], items: _Items
                         ) -> AsyncIterator[str]:
        for e in items.start():
            yield sse(e, e["type"])
        async for out in events_of(job, events, items):
            for e in out:
                yield sse(e, e["type"])
        finish(req, items)

    @app.post("/v1/responses")
    async def create(request: Request) -> Any:
        body = await srv.body(request)
        req = await run_in_threadpool(plan, body)
        job, events = srv.start(req.plan, "responses")
        items = _Items(req, _new_id("resp"), srv.backend.tokenizer, req.stream)
        if req.stream:
            return stream_response(run_stream(req, job, events, items))
        watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
        try:
            async for _ in events_of(job, events, items):
                pass
        finally:
            watcher.cancel()
        finish(req, items)
        return items.response(items.status())

    @app.get("/v1/responses/{rid}")
    async def retrieve(rid: str, request: Request) -> dict:
        srv.auth(request)
        stored = store.get(rid)
        if stored is None:
            raise not_found(rid)
        return stored[0]

    @app.delete("/v1/responses/{rid}")
    async def delete(rid: str, request: Request) -> dict:
        srv.auth(request)
        if not store.pop(rid):
            raise not_found(rid)
        return {"id": rid, "object": "response", "deleted": True}
