"""Anthropic's ``/v1/messages``: request translation and streamed events.

A thinking model's reasoning is answered as a ``thinking`` content block before the text and tool_use blocks
(streamed as ``thinking_delta`` events). Its ``signature`` is empty: k2local signs nothing, and takes thinking
blocks sent back in later turns as they are, handing their text to the chat template as the turn's
``reasoning_content``. The request's ``thinking`` ({"type": "enabled" | "disabled"}) becomes the template's
``thinking`` variable (K2.5-style templates read it; "disabled" also turns reasoning parsing off)."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from k2local.server.events import Idle, sse, stream_events
from k2local.server.requests import (
    ANTHROPIC_TYPES,
    DEFAULT_TEMPERATURE,
    APIError,
    ChatPlanner,
    ContextLengthError,
    Plan,
    bad_param,
    integer_param,
    parse_tool_choice,
    parse_tools,
    sampling_params,
    stop_strings,
)
from k2local.server.worker import Done, Failed, Job, ServerEvent
from k2local.chat.reasoning import ReasoningDelta
from k2local.chat.toolcalls import ContentDelta, ToolCallArgsDelta, ToolCallStart

ANTHROPIC_TEMPERATURE_SCALE = 0.6  # Moonshot's Anthropic API: real temperature = request temperature * 0.6


# -------------------------------------------------------------------------------------------- Anthropic

def _anthropic_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_param(None, f"{where}: content must be a string or a list of blocks")
    parts = []
    for b in content:
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise bad_param(None, f"{where}: unsupported content block {kind!r} (only text is supported here)")
        parts.append(b["text"])
    return "".join(parts)


def _anthropic_messages(body: dict) -> list[dict]:
    """Anthropic system + messages -> OpenAI-style messages (tool_use -> tool_calls, tool_result -> tool)."""
    out: list[dict] = []
    systems: list[str] = []  # the system prompt, then each {"role": "system"} entry of messages, in order
    system = body.get("system")
    if system is not None:
        systems.append(_anthropic_text(system, "system"))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_param(None, "messages: must be a non-empty list")
    for i, m in enumerate(raw):
        where = f"messages.{i}"
        if isinstance(m, dict) and m.get("role") == "system":  # Claude Code sends these inside messages
            systems.append(_anthropic_text(m.get("content"), where))
            continue
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_param(None, f"{where}: role must be 'user', 'assistant' or 'system'")
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_param(None, f"{where}: content must be a string or a list of blocks")
        texts: list[str] = []
        thoughts: list[str] = []
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
            elif kind == "thinking" and role == "assistant":
                if not isinstance(b.get("thinking"), str):
                    raise bad_param(None, f"{where}.content.{j}: a thinking block needs 'thinking' text")
                thoughts.append(b["thinking"])
            elif kind in ("thinking", "redacted_thinking"):
                continue  # redacted (encrypted) reasoning: nothing a local template can use
            else:
                raise bad_param(None, f"{where}.content.{j}: unsupported block type {kind!r}")
        if role == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
            if thoughts:
                msg["reasoning_content"] = "".join(thoughts)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
        elif texts:
            out.append({"role": "user", "content": "".join(texts)})
    if not out:
        raise bad_param(None, "messages: needs a user or assistant message besides system entries")
    systems = [t for t in systems if t]
    return ([{"role": "system", "content": "\n\n".join(systems)}] if systems else []) + out


def _anthropic_tools(body: dict) -> tuple[list[dict] | None, str]:
    raw = body.get("tools")
    tools = None
    if raw is not None:
        if not isinstance(raw, list):
            raise bad_param(None, "tools: must be a list")
        tools = []
        for i, t in enumerate(raw):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise bad_param(None, f"tools.{i}: needs a name")
            fn = {"name": t["name"], "description": t.get("description", ""),
                  "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
            tools.append({"type": "function", "function": fn})
        tools = parse_tools(tools)
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
        raise bad_param(None, "tool_choice: type must be auto, any, tool or none")
    return tools, parse_tool_choice(choice, tools)


def anthropic_plan(srv: ChatPlanner, body: dict, count_only: bool = False) -> Plan:
    """The run plan of a Messages request. A prompt past the context is refused in Anthropic's words (Claude Code
    reads them to compact its conversation); ``count_only`` (count_tokens) skips that check."""
    if integer_param(body, "max_tokens", None, lo=1) is None:
        raise bad_param("max_tokens", "max_tokens: field required")
    params = sampling_params(body, None, temperature_scale=ANTHROPIC_TEMPERATURE_SCALE,
                       temperature_default=DEFAULT_TEMPERATURE, temperature_max=1.0, max_keys=("max_tokens",))
    stops = stop_strings(body, "stop_sequences")
    messages = _anthropic_messages(body)
    tools, choice = _anthropic_tools(body)
    tc = body.get("tool_choice")
    parallel = not (isinstance(tc, dict) and tc.get("disable_parallel_tool_use"))
    try:
        return srv.chat_plan(messages, tools, choice, params, stops, _thinking_kwargs(body),
                             check_context=not count_only, parallel=parallel)
    except ContextLengthError as e:
        raise anthropic_overflow(e) from None


def anthropic_overflow(e: ContextLengthError) -> APIError:
    """Anthropic's wording for a prompt past the context window."""
    return APIError(400, f"prompt is too long: {e.prompt_tokens} tokens > {e.limit} maximum")


def _thinking_kwargs(body: dict) -> dict[str, Any]:
    """The request's ``thinking`` setting as the chat template's ``thinking`` variable (absent: the template's
    default)."""
    t = body.get("thinking")
    if t is None:
        return {}
    kind = t.get("type") if isinstance(t, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise bad_param(None, "thinking: type must be 'enabled', 'adaptive' or 'disabled'")
    return {"thinking": kind != "disabled"}


def thinking_block(text: str) -> dict[str, Any]:
    """A finished ``thinking`` content block (its signature empty: see the module docstring)."""
    return {"type": "thinking", "thinking": text, "signature": ""}


def anthropic_stop(d: Done) -> str:
    if d.finish_reason == "tool_calls":
        return "tool_use"
    if d.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if d.stop_sequence else "end_turn"


def json_input(arguments: str) -> Any:
    try:
        v = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_raw_arguments": arguments}
    return v if isinstance(v, dict) else {"value": v}


async def anthropic_stream(srv: ChatPlanner, job: Job, events: asyncio.Queue[ServerEvent], mid: str
                           ) -> AsyncIterator[str]:
    usage = {"input_tokens": len(job.prompt), "output_tokens": 0}
    yield sse({"type": "message_start", "message": {
        "id": mid, "type": "message", "role": "assistant", "model": srv.model_name, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage}}, "message_start")
    block = -1  # index of the open content block
    open_kind: str | None = None
    tool_block: dict[int, int] = {}
    tool_args: dict[int, list[str]] = {}
    ping = {"type": "ping"}
    yield sse(ping, "ping")  # as Anthropic's API does; then again every ping_interval seconds without output

    def close() -> Iterable[str]:
        nonlocal open_kind
        if open_kind == "tool":  # the call's arguments, as one piece of valid JSON (see below)
            index = next(i for i, b in tool_block.items() if b == block)
            args = json.dumps(json_input("".join(tool_args[index])), ensure_ascii=False)
            yield sse({"type": "content_block_delta", "index": block,
                       "delta": {"type": "input_json_delta", "partial_json": args}}, "content_block_delta")
        if open_kind is not None:
            open_kind = None
            yield sse({"type": "content_block_stop", "index": block}, "content_block_stop")

    async for ev in stream_events(job, events, getattr(srv, "ping_interval", None)):
        if isinstance(ev, Idle):
            yield sse(ping, "ping")
        elif isinstance(ev, ReasoningDelta):
            if open_kind != "thinking":
                for s in close():
                    yield s
                block, open_kind = block + 1, "thinking"
                yield sse({"type": "content_block_start", "index": block,
                            "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
                           "content_block_start")
            yield sse({"type": "content_block_delta", "index": block,
                        "delta": {"type": "thinking_delta", "thinking": ev.text}}, "content_block_delta")
        elif isinstance(ev, ContentDelta):
            if open_kind != "text":
                for s in close():
                    yield s
                block, open_kind = block + 1, "text"
                yield sse({"type": "content_block_start", "index": block,
                            "content_block": {"type": "text", "text": ""}}, "content_block_start")
            yield sse({"type": "content_block_delta", "index": block,
                        "delta": {"type": "text_delta", "text": ev.text}}, "content_block_delta")
        elif isinstance(ev, ToolCallStart):
            for s in close():
                yield s
            block, open_kind = block + 1, "tool"
            tool_block[ev.index] = block
            tool_args[ev.index] = []
            yield sse({"type": "content_block_start", "index": block,
                        "content_block": {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}},
                       "content_block_start")
        elif isinstance(ev, ToolCallArgsDelta):
            # Held to the end of the call: the model's text may not be JSON (or not the JSON the non-streamed
            # answer gives, see json_input), and the SDKs parse the concatenated partial_json as JSON.
            tool_args.setdefault(ev.index, []).append(ev.text)
        elif isinstance(ev, Failed):
            err = ev.error
            yield sse({"type": "error", "error": {"type": ANTHROPIC_TYPES.get(err.status, "api_error"),
                                                   "message": err.message}}, "error")
        elif isinstance(ev, Done):
            d = ev
            for s in close():
                yield s
            yield sse({"type": "message_delta", "delta": {"stop_reason": anthropic_stop(d),
                                                           "stop_sequence": d.stop_sequence},
                        "usage": {"output_tokens": d.completion_tokens}}, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")
