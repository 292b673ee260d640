"""Native tool calls of Kimi K2 and DeepSeek-V3: parse model output (batch or streaming), format calls back.

Native format (``functions.NAME:IDX`` ids, any text content first)::

    <|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>

Parsing is tolerant, like vLLM's and SGLang's ``kimi_k2`` parsers: whitespace around ids and arguments is ignored,
a missing section begin/end or a missing final ``<|tool_call_end|>`` at end of output is accepted, and a call
without an argument marker is dropped. Whitespace between content and a tool section is dropped.

DeepSeek-V3 (the same machinery, :data:`DEEPSEEK` dialect; the calls carry no ids, so they get
``functions.NAME:IDX`` with IDX counted from ``id_base``)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Beijing"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The type word before ``<｜tool▁sep｜>`` is ignored; the name ends at the first whitespace, backtick or ``{``; the
```` ```json ```` fence around the arguments is optional (k2local's tiny template writes bare JSON); a call with a
name but no arguments gets ``{}``. :func:`tool_dialect` picks the dialect from a tokenizer's special tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from k2local.tokenizer.common import TextTokenizer

__all__ = [
    "ARGUMENT_BEGIN",
    "CALL_BEGIN",
    "CALL_END",
    "DEEPSEEK",
    "KIMI",
    "SECTION_BEGIN",
    "SECTION_END",
    "ContentDelta",
    "ToolCall",
    "ToolCallArgsDelta",
    "ToolCallStart",
    "ToolCallStreamParser",
    "ToolDialect",
    "ToolEvent",
    "count_tool_calls",
    "format_tool_calls",
    "make_tool_call_id",
    "parse_tool_calls",
    "tool_call_name",
    "tool_dialect",
]

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
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


@dataclass(frozen=True)
class ToolDialect:
    """One model family's tool-call markers and how a call's header and body are cut.

    A call is ``call_begin HEADER sep BODY call_end``. With ``named_body`` False (Kimi) HEADER is the call id and
    BODY the arguments; with it True (DeepSeek) HEADER is a type word, BODY is ``NAME`` + newline + the arguments
    (optionally in a ```` ```json ```` fence) and ids are made up as ``functions.NAME:IDX``.
    """

    name: str
    section_begin: str
    section_end: str
    call_begin: str
    sep: str
    call_end: str
    named_body: bool = False

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.section_begin, self.section_end, self.call_begin, self.sep, self.call_end)

    @property
    def lead(self) -> str:
        """The opening characters all markers share (where a marker search starts)."""
        return "<|" if self.section_begin.startswith("<|") else self.section_begin[:2]

    def forced_prefix(self, name: str | None, call_id: str | None = None) -> str:
        """Text that starts the assistant turn for a forced tool choice: up to the arguments of a call to ``name``,
        or (``name`` None) up to where the model writes the name."""
        head = self.section_begin + self.call_begin
        if self.named_body:
            head += "function" + self.sep
            return head if name is None else head + name + "\n```json\n"
        if name is None:
            return head + "functions."
        return head + (call_id or make_tool_call_id(name, 0)) + self.sep


KIMI = ToolDialect("kimi_k2", SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)
DEEPSEEK = ToolDialect("deepseek_v3", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                       "<｜tool▁sep｜>", "<｜tool▁call▁end｜>", named_body=True)
_DIALECTS = (KIMI, DEEPSEEK)


def tool_dialect(tokenizer: TextTokenizer | None = None, model_type: str | None = None) -> ToolDialect:
    """The dialect of a loaded model: the one whose section marker is a special token of ``tokenizer``; failing
    that, DeepSeek for ``model_type`` deepseek_v3 / deepseek_v2; otherwise Kimi."""
    if tokenizer is not None:
        specials = tokenizer.special_tokens
        for d in _DIALECTS:
            if d.section_begin in specials:
                return d
    if model_type in ("deepseek_v3", "deepseek_v2"):
        return DEEPSEEK
    return KIMI


def _held_prefix_len(text: str, markers: Sequence[str], max_marker: int) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a marker (may still become one)."""
    start = max(0, len(text) - max_marker + 1)
    i = text.find("<", start)
    while i != -1:
        tail = text[i:]
        if any(m.startswith(tail) for m in markers):
            return len(text) - i
        i = text.find("<", i + 1)
    return 0


def _find_marker(text: str, markers: Sequence[str], lead: str) -> tuple[int, str] | None:
    i = text.find(lead)
    while i != -1:
        for m in markers:
            if text.startswith(m, i):
                return i, m
        i = text.find(lead, i + 1)
    return None


_FENCE_RE = re.compile(r"```[A-Za-z0-9_+-]*")


def _tail_start(s: str, fence: bool) -> int:
    """Where the held tail of argument text starts: trailing whitespace (and, in fenced dialects, backticks)."""
    if not fence:
        return len(s.rstrip())
    i = len(s)
    while i and (s[i - 1].isspace() or s[i - 1] == "`"):
        i -= 1
    return i


class ToolCallStreamParser:
    """Incremental parser: ``feed(piece)`` returns events for complete text, ``finish()`` flushes at end of output.

    Text that might be the start of a marker (``"<|tool_ca"``) is held back until it is resolved; whitespace at the
    end of content or arguments is held until more text shows whether it is interior. After ``finish``,
    ``content`` and ``tool_calls`` hold the whole result. ``dialect`` picks the markers (Kimi by default);
    ``id_base`` numbers the made-up ids of dialects whose calls carry none.
    """

    def __init__(self, dialect: ToolDialect = KIMI, id_base: int = 0) -> None:
        self.dialect = dialect
        self.id_base = id_base
        self._markers = dialect.markers
        self._max_marker = max(map(len, self._markers))
        self._buf = ""
        self._state = "content"  # content | section | call_id | name | args | skip
        self._pending_ws = ""
        self._started = False  # current arguments have emitted text
        self._strip_leading = False  # content right after a tool section: drop its leading whitespace
        self._id_buf = ""
        self._head = ""  # fenced dialects: start of the arguments, held until a ``` fence is ruled in or out
        self._fence_done = False
        self._args: list[str] = []
        self._call_id = ""
        self._call_name = ""
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
        elif self._state == "name":
            events += self._name_done(final=True)
        if self._state == "args":
            events += self._close_call()
        self._pending_ws = ""
        self._finished = True
        return events

    # -- internals -------------------------------------------------------------------------------------------------

    def _process(self, final: bool) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        while True:
            found = _find_marker(self._buf, self._markers, self.dialect.lead)
            if found is not None:
                idx, marker = found
                text, self._buf = self._buf[:idx], self._buf[idx + len(marker) :]
                events += self._text(text)
                events += self._marker(marker)
                continue
            hold = 0 if final else _held_prefix_len(self._buf, self._markers, self._max_marker)
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
        elif self._state == "name":
            self._id_buf += text
            return self._name_done(final=False)
        elif self._state == "args":
            return self._args_text(text)
        return []  # "section" (text between calls) and "skip" ignore text

    def _args_text(self, text: str) -> list[ToolEvent]:
        fenced = self.dialect.named_body
        if fenced and not self._started and not self._fence_done:
            head = (self._head + text).lstrip()
            if head.startswith("```"):
                m = _FENCE_RE.match(head)
                if m.end() == len(head):  # the language word may go on
                    self._head = head
                    return []
                text, self._fence_done = head[m.end() :], True
            elif head and "```".startswith(head):
                self._head = head
                return []
            else:
                text = head
                self._fence_done = bool(head)
            self._head = ""
        s = self._pending_ws + text
        if not self._started:
            s = s.lstrip()
        cut = _tail_start(s, fenced)
        body = s[:cut]
        self._pending_ws = s[cut:]
        if body:
            self._started = True
            self._args.append(body)
            return [ToolCallArgsDelta(len(self.tool_calls), body)]
        return []

    def _marker(self, marker: str) -> list[ToolEvent]:
        d = self.dialect
        events: list[ToolEvent] = []
        if self._state == "name" and marker in (d.call_end, d.section_end, d.call_begin):
            events += self._name_done(final=True)
        state = self._state
        if state == "args" and marker in (d.call_end, d.section_end, d.call_begin):
            events += self._close_call()
        if marker == d.section_begin:
            if state == "content":
                self._state = "section"
        elif marker == d.call_begin:
            self._state, self._id_buf = "call_id", ""
        elif marker == d.sep:
            if state == "call_id":
                if d.named_body:
                    self._state, self._id_buf = "name", ""
                else:
                    return events + self._open_call()
        elif marker == d.call_end:
            if state != "content":
                self._state = "section"
        elif marker == d.section_end:
            self._state = "content"
            self._strip_leading = self._strip_leading or state != "content"
        if state == "content" and self._state != "content":
            self._pending_ws = ""  # whitespace right before a tool section is not content
        return events

    def _name_done(self, final: bool) -> list[ToolEvent]:
        """Named-body dialects: the name ends at whitespace, a backtick or ``{``; the rest is arguments."""
        s = self._id_buf.lstrip()
        end = next((i for i, c in enumerate(s) if c.isspace() or c in "`{"), None)
        if end is None and not final:
            self._id_buf = s
            return []
        end = len(s) if end is None else end
        name, rest = s[:end], s[end:]
        self._id_buf = ""
        if not name:
            self._state = "skip"
            return []
        events = self._open_call(make_tool_call_id(name, self.id_base + len(self.tool_calls)), name)
        return events + (self._args_text(rest) if rest else [])

    def _open_call(self, call_id: str | None = None, name: str | None = None) -> list[ToolEvent]:
        if call_id is None:
            call_id = self._id_buf.strip()
            self._id_buf = ""
            if not call_id:
                self._state = "skip"
                return []
            name = tool_call_name(call_id)
        self._state, self._call_id, self._args, self._started, self._pending_ws = "args", call_id, [], False, ""
        self._call_name, self._head, self._fence_done = name, "", False
        return [ToolCallStart(len(self.tool_calls), call_id, name)]

    def _close_call(self) -> list[ToolEvent]:
        events: list[ToolEvent] = []
        if self.dialect.named_body:
            tail = self._pending_ws
            if tail.strip() and tail.strip().strip("`") == "" and "```" not in tail:
                body = tail.rstrip()  # stray backticks that are not a closing fence are argument text
                if not self._started:
                    body = body.lstrip()
                self._args.append(body)
                self._started = True
                events.append(ToolCallArgsDelta(len(self.tool_calls), body))
            if not self._started:
                self._args.append("{}")
                events.append(ToolCallArgsDelta(len(self.tool_calls), "{}"))
        self.tool_calls.append(ToolCall(self._call_id, self._call_name, "".join(self._args)))
        self._state, self._pending_ws, self._args = "section", "", []
        return events


def parse_tool_calls(text: str, dialect: ToolDialect = KIMI, id_base: int = 0) -> tuple[str | None, list[ToolCall]]:
    """Whole model output -> (content or None, tool calls). Same result as streaming the text in any pieces."""
    parser = ToolCallStreamParser(dialect, id_base)
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


def format_tool_calls(calls: Sequence[ToolCall | Mapping[str, Any]], start_index: int = 0,
                      dialect: ToolDialect = KIMI) -> str:
    """Tool calls -> native text of ``dialect`` (a full section). Accepts ToolCall objects or OpenAI-style dicts.

    Kimi: calls without an id get ``functions.NAME:IDX`` with IDX counted from ``start_index``. DeepSeek: ids are
    not part of the format; arguments go in a ```` ```json ```` fence. Non-string arguments are JSON-encoded.
    """
    d = dialect
    out = [d.section_begin]
    for i, call in enumerate(calls):
        call_id, name, args = _call_fields(call)
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        if d.named_body:
            out += [d.call_begin, "function", d.sep, name, "\n```json\n", args, "\n```", d.call_end]
        else:
            out += [d.call_begin, call_id or make_tool_call_id(name, start_index + i), d.sep, args, d.call_end]
    out.append(d.section_end)
    return "".join(out)
