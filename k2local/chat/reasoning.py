"""Split a thinking model's output into reasoning and content (Kimi K2-Thinking / K2.5, DeepSeek-R1 style tags).

Semantics follow vLLM's ``kimi_k2`` reasoning parser, on decoded text::

    <think>The user wants the weather. I'll call the tool.</think>Let me check.<|tool_calls_section_begin|>...

- The output is *in reasoning* from its start when ``start_in_reasoning`` is true (the rendered prompt already
  opened ``<think>``, see :func:`prompt_opens_reasoning`); a ``<think>`` the model writes anyway is dropped.
- Otherwise (thinking disabled, or a template that lets the model open the tag itself, or a model that never
  thinks) the output is content, unless it begins, after optional whitespace, with ``<think>``: then that
  whitespace and the tag are dropped and reasoning starts.
- Reasoning ends at the first ``</think>`` (dropped) or at the first tool-call section marker
  (``<|tool_calls_section_begin|>`` by default), which stays at the start of the content so that the tool-call
  parser sees it. A ``<think>`` inside reasoning is dropped, so no think tag reaches the reasoning text.
- After reasoning has ended (or when it never started) the rest of the output is content, verbatim: that is the
  text to hand on to :class:`k2local.chat.toolcalls.ToolCallStreamParser`. Output that ends while still in reasoning
  (a length cut) is all reasoning and has empty content.

:func:`split` parses a whole output; :class:`ReasoningStreamParser` parses text deltas cut anywhere (``"</th"`` +
``"ink>"``) and emits :class:`ReasoningDelta` / :class:`~k2local.chat.toolcalls.ContentDelta` events whose
concatenations equal :func:`split`'s result. Tags are matched as text, so the detokenizer must keep ``<think>``,
``</think>`` and the tool-call markers in its output (not skip them as special tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from k2local.chat.toolcalls import SECTION_BEGIN, ContentDelta

__all__ = [
    "THINK_END",
    "THINK_START",
    "ContentDelta",
    "ReasoningDelta",
    "ReasoningEvent",
    "ReasoningStreamParser",
    "prompt_opens_reasoning",
    "split",
    "template_thinks",
]

THINK_START = "<think>"
THINK_END = "</think>"
_DEFAULT_TOOL_MARKERS: tuple[str, ...] = (SECTION_BEGIN,)


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's reasoning (OpenAI ``reasoning_content``, Anthropic ``thinking``)."""

    text: str


ReasoningEvent = Union[ReasoningDelta, ContentDelta]
"""What :class:`ReasoningStreamParser` emits; :class:`ContentDelta` is the tool-call module's plain-text event."""


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when a rendered prompt ends (trailing whitespace aside) with an opened ``<think>``: the model's output
    then starts inside its reasoning. Use it as ``start_in_reasoning``; a prompt that ends with the bare assistant
    header, or with ``<think></think>`` (thinking disabled), gives False. A prompt that prefills part of the
    reasoning itself (continuing an assistant turn) must be judged by the caller."""
    return prompt.rstrip().endswith(THINK_START)


def template_thinks(template: object) -> bool:
    """True for a thinking model's chat template (a :class:`~k2local.chat.template.ChatTemplate`, or anything with
    ``source`` / ``tool_use_source`` strings): one that writes ``<think>`` or ``</think>`` (K2-Thinking, K2.5,
    DeepSeek-R1). Such a model's output is parsed for reasoning even when the prompt does not open it."""
    sources = (getattr(template, "source", None), getattr(template, "tool_use_source", None))
    return any(isinstance(s, str) and (THINK_START in s or THINK_END in s) for s in sources)


def _check_markers(tool_markers: Sequence[str]) -> tuple[str, ...]:
    markers = tuple(tool_markers)
    if not all(isinstance(m, str) and m for m in markers):
        raise ValueError("tool_markers must be non-empty strings")
    return markers


def split(
    text: str, start_in_reasoning: bool = False, tool_markers: Sequence[str] = _DEFAULT_TOOL_MARKERS
) -> tuple[str, str]:
    """Split a whole output into ``(reasoning, content)``; either may be empty (see the module docstring)."""
    markers = _check_markers(tool_markers)
    if not start_in_reasoning:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            return "", text
        text = stripped[len(THINK_START):]
    ends = [(i, m) for m in (THINK_END, *markers) if (i := text.find(m)) >= 0]
    if not ends:
        return text.replace(THINK_START, ""), ""
    i, marker = min(ends)
    reasoning = text[:i].replace(THINK_START, "")
    return reasoning, text[i + len(THINK_END):] if marker == THINK_END else text[i:]


class ReasoningStreamParser:
    """Incremental :func:`split`: :meth:`feed` text deltas as they are decoded, then call :meth:`finish` once.

    Text that could be the start of a tag (``"</th"``) is held back until the next delta decides it; everything
    after the reasoning has ended passes through at once, unheld, as :class:`ContentDelta` events.
    """

    _DETECT, _REASONING, _CONTENT = "detect", "reasoning", "content"

    def __init__(self, start_in_reasoning: bool = False, tool_markers: Sequence[str] = _DEFAULT_TOOL_MARKERS) -> None:
        self._tool_markers = _check_markers(tool_markers)
        self._markers = (THINK_START, THINK_END, *self._tool_markers)
        self._lead_chars = frozenset(m[0] for m in self._markers)
        self._phase = self._REASONING if start_in_reasoning else self._DETECT
        self._buf = ""
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while the output is (so far) reasoning."""
        return self._phase == self._REASONING

    @property
    def reasoning_ended(self) -> bool:
        """True once the output has gone on to content (or was found to have no reasoning)."""
        return self._phase == self._CONTENT

    def feed(self, text: str) -> list[ReasoningEvent]:
        """Consume one text delta; returns the events it completes (possibly none)."""
        if self._finished:
            raise RuntimeError("ReasoningStreamParser.feed after finish")
        self._buf += text
        return self._run(final=False)

    def finish(self) -> list[ReasoningEvent]:
        """End of output: flush held text (a partial tag at the very end is kept as text)."""
        if self._finished:
            return []
        self._finished = True
        return self._run(final=True)

    def _run(self, final: bool) -> list[ReasoningEvent]:
        events: list[ReasoningEvent] = []
        if self._phase == self._DETECT:
            stripped = self._buf.lstrip()
            if stripped.startswith(THINK_START):
                self._phase, self._buf = self._REASONING, stripped[len(THINK_START):]
            elif not final and THINK_START.startswith(stripped):
                return events  # only whitespace, or a prefix of "<think>", so far
            else:
                self._phase = self._CONTENT
        if self._phase == self._REASONING:
            self._reasoning(events, final)
        if self._phase == self._CONTENT and self._buf:
            events.append(ContentDelta(self._buf))
            self._buf = ""
        return events

    def _reasoning(self, events: list[ReasoningEvent], final: bool) -> None:
        pieces: list[str] = []
        while True:
            found = [(i, m) for m in self._markers if (i := self._buf.find(m)) >= 0]
            if not found:
                keep = 0 if final else self._held_len()
                pieces.append(self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            i, marker = min(found)
            pieces.append(self._buf[:i])
            if marker == THINK_START:
                self._buf = self._buf[i + len(marker):]
                continue
            self._buf = self._buf[i + len(marker):] if marker == THINK_END else self._buf[i:]
            self._phase = self._CONTENT
            break
        text = "".join(pieces)
        if text:
            events.append(ReasoningDelta(text))

    def _held_len(self) -> int:
        """Length of the longest tail of the buffer that is a proper prefix of a marker."""
        buf = self._buf
        longest = max(len(m) for m in self._markers) - 1
        for j in range(max(0, len(buf) - longest), len(buf)):
            if buf[j] in self._lead_chars and any(m.startswith(buf[j:]) for m in self._markers):
                return len(buf) - j
        return 0
