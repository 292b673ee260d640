"""Kimi K2 native tool calls: parse model output (batch or streaming) and format calls back into native text.

Native format (``functions.NAME:IDX`` ids, any text content first)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>

Parsing is tolerant, like vLLM's and SGLang's ``kimi_k2`` parsers: whitespace around ids and arguments is ignored,
a missing section begin/end or a missing final ``<|tool_call_end|>`` at end of output is accepted, and a call
without an argument marker is dropped. Whitespace between content and a tool section is dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "ARGUMENT_BEGIN",
    "CALL_BEGIN",
    "CALL_END",
    "SECTION_BEGIN",
    "SECTION_END",
    "ContentDelta",
    "ToolCall",
    "ToolCallArgsDelta",
    "ToolCallStart",
    "ToolCallStreamParser",
    "ToolEvent",
    "count_tool_calls",
    "format_tool_calls",
    "make_tool_call_id",
    "parse_tool_calls",
    "tool_call_name",
]

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
_MAX_MARKER = max(map(len, _MARKERS))
_ID_RE = re.compile(r"(?:functions\.)?(?P<name>.+?)(?::\d+)?")


@dataclass(frozen=True)
class ToolCall:
    """One parsed tool call; ``arguments`` is the raw (normally JSON) text the model wrote."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """OpenAI ``message.tool_calls[i]`` shape."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    """Plain assistant text."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A new tool call (``index`` counts calls in this output from 0)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """A fragment of the arguments of call ``index``."""

    index: int
    text: str


ToolEvent = Union[ContentDelta, ToolCallStart, ToolCallArgsDelta]


def tool_call_name(call_id: str) -> str:
    """``functions.get_weather:0`` -> ``get_weather`` (the prefix and the ``:IDX`` suffix are optional)."""
    m = _ID_RE.fullmatch(call_id.strip())
    return m.group("name") if m else call_id.strip()


def make_tool_call_id(name: str, index: int) -> str:
    """Kimi's id format ``functions.{name}:{index}`` (index counted over the whole conversation)."""
    return f"functions.{name}:{index}"


def count_tool_calls(messages: Iterable[Mapping[str, Any]]) -> int:
    """Number of tool calls already in a conversation: the next call's Kimi index."""
    return sum(len(m.get("tool_calls") or ()) for m in messages if m.get("role") == "assistant")


def _held_prefix_len(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker (may still become one)."""
    start = max(0, len(text) - _MAX_MARKER + 1)
    i = text.find("<", start)
    while i != -1:
        tail = text[i:]
        if any(m.startswith(tail) for m in _MARKERS):
            return len(text) - i
        i = text.find("<", i + 1)
    return 0


def _find_marker(text: str) -> tuple[int, str] | None:
    i = text.find("<|")
    while i != -1:
        for m in _MARKERS:
            if text.startswith(m, i):
                return i, m
        i = text.find("<|", i + 1)
    return None


class ToolCallStreamParser:
    """Incremental parser: ``feed(piece)`` returns events for complete text, ``finish()`` flushes at end of output.

    Text that might be the start of a marker (``"<|tool_ca"``) is held back until it is resolved; whitespace at the
    end of content or arguments is held until more text shows whether it is interior. After ``finish``,
    ``content`` and ``tool_calls`` hold the whole result.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._state = "content"  # content | section | call_id | args | skip
        self._pending_ws = ""
        self._started = False  # current arguments have emitted text
        self._strip_leading = False  # content right after a tool section: drop its leading whitespace
        self._id_buf = ""
        self._args: list[str] = []
        self._call_id = ""
        self._content: list[str] = []
        self.tool_calls: list[ToolCall] = []
        self._finished = False

    @property
    def content(self) -> str | None:
        """Content text so far (None when empty)."""
        return "".join(self._content) or None

    def feed(self, piece: str) -> list[ToolEvent]:
        """Add decoded text; return the events it completes."""
        if self._finished:
            raise RuntimeError("ToolCallStreamParser.feed after finish")
        self._buf += piece
        return self._process(final=False)

    def finish(self) -> list[ToolEvent]:
        """End of output: flush held text, close an open call, drop an incomplete one."""
        if self._finished:
            return []
        events = self._process(final=True)
        if self._state == "content" and not self.tool_calls and self._pending_ws:
            events += self._emit_content(self._pending_ws)
        elif self._state == "args":
            self._close_call()
        self._pending_ws = ""
        self._finished = True
        return events

    # -- internals -------------------------------------------------------------------------------------------------

    def _process(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while True:
            found = _find_marker(self._buf)
            if found is not None:
                idx, marker = found
                text, self._buf = self._buf[:idx], self._buf[idx + len(marker) :]
                events += self._text(text)
                events += self._marker(marker)
                continue
            hold = 0 if final else _held_prefix_len(self._buf)
            text, self._buf = self._buf[: len(self._buf) - hold], self._buf[len(self._buf) - hold :]
            events += self._text(text)
            return events

    def _emit_content(self, text: str) -> list[ToolEvent]:
        self._content.append(text)
        return [ContentDelta(text)]

    def _text(self, text: str) -> list[ToolEvent]:
        if not text:
            return []
        if self._state == "content":
            s = self._pending_ws + text
            if self._strip_leading:
                s = s.lstrip()
                self._strip_leading = not s
            body = s.rstrip()
            self._pending_ws = s[len(body) :]
            return self._emit_content(body) if body else []
        if self._state == "call_id":
            self._id_buf += text
        elif self._state == "args":
            s = self._pending_ws + text
            if not self._started:
                s = s.lstrip()
            body = s.rstrip()
            self._pending_ws = s[len(body) :]
            if body:
                self._started = True
                self._args.append(body)
                return [ToolCallArgsDelta(len(self.tool_calls), body)]
        return []  # "section" (text between calls) and "skip" ignore text

    def _marker(self, marker: str) -> list[ToolEvent]:
        state = self._state
        if state == "args" and marker in (CALL_END, SECTION_END, CALL_BEGIN):
            self._close_call()
        if marker == SECTION_BEGIN:
            if state == "content":
                self._state = "section"
        elif marker == CALL_BEGIN:
            self._state, self._id_buf = "call_id", ""
        elif marker == ARGUMENT_BEGIN:
            if state == "call_id":
                return self._open_call()
        elif marker == CALL_END:
            if state != "content":
                self._state = "section"
        elif marker == SECTION_END:
            self._state = "content"
            self._strip_leading = self._strip_leading or state != "content"
        if state == "content" and self._state != "content":
            self._pending_ws = ""  # whitespace right before a tool section is not content
        return []

    def _open_call(self) -> list[ToolEvent]:
        call_id = self._id_buf.strip()
        self._id_buf = ""
        if not call_id:
            self._state = "skip"
            return []
        self._state, self._call_id, self._args, self._started, self._pending_ws = "args", call_id, [], False, ""
        return [ToolCallStart(len(self.tool_calls), call_id, tool_call_name(call_id))]

    def _close_call(self) -> None:
        self.tool_calls.append(ToolCall(self._call_id, tool_call_name(self._call_id), "".join(self._args)))
        self._state, self._pending_ws, self._args = "section", "", []


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Whole model output -> (content or None, tool calls). Same result as streaming the text in any pieces."""
    parser = ToolCallStreamParser()
    parser.feed(text)
    parser.finish()
    return parser.content, parser.tool_calls


def _call_fields(call: ToolCall | Mapping[str, Any]) -> tuple[str | None, str, Any]:
    if isinstance(call, ToolCall):
        return call.id, call.name, call.arguments
    fn = call.get("function", call)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tool call needs a function name: {call!r}")
    return call.get("id"), fn["name"], fn.get("arguments", "{}")


def format_tool_calls(calls: Sequence[ToolCall | Mapping[str, Any]], start_index: int = 0) -> str:
    """Tool calls -> native Kimi text (a full section). Accepts ToolCall objects or OpenAI-style dicts.

    Calls without an id get ``functions.NAME:IDX`` with IDX counted from ``start_index``; non-string arguments are
    JSON-encoded.
    """
    out = [SECTION_BEGIN]
    for i, call in enumerate(calls):
        call_id, name, args = _call_fields(call)
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        out += [CALL_BEGIN, call_id or make_tool_call_id(name, start_index + i), ARGUMENT_BEGIN, args, CALL_END]
    out.append(SECTION_END)
    return "".join(out)
