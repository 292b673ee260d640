"""Lark grammars (llguidance's dialect) for what k2local constrains: JSON output and tool-call sections.

JSON is compact with Python's default separators (``", "``, ``": "``), as Kimi's chat template writes arguments, and
without free whitespace (a model that is noise would otherwise pad forever). A tool-call section follows the model's
dialect (:class:`k2local.chat.toolcalls.ToolDialect`): each call names a declared tool and its arguments satisfy that
tool's JSON schema. A forced choice's prefix is already in the prompt, so the grammar starts where it ends."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance

from k2local.chat.toolcalls import ToolDialect
from k2local.errors import K2Error

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(K2Error, ValueError):
    """A schema or grammar llguidance cannot compile (an unsupported JSON-schema keyword, a bad $ref, ...)."""


@dataclass(frozen=True)
class ToolSpec:
    """A declared tool: its name and its parameters' JSON schema."""

    name: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "object"})


def _json_rule(schema: dict[str, Any]) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    opts = {**JSON_STYLE, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps({**schema, "x-guidance": opts}, ensure_ascii=False)


def json_grammar(schema: dict[str, Any] | None) -> str:
    """Output that is one JSON value satisfying ``schema`` (None: any JSON object)."""
    return "start: " + _json_rule(schema if schema is not None else {"type": "object"}) + "\n"


def _lit(text: str, lt: llguidance.LLTokenizer, ids: dict[str, int]) -> str:
    """A marker as its special token (``<[id]>``) where the tokenizer has one, else as literal text."""
    i = ids.get(text)
    if i is not None and lt.is_special_token(i):
        return f"<[{i}]>"
    return json.dumps(text, ensure_ascii=False)


def tool_calls_grammar(dialect: ToolDialect, tools: Sequence[ToolSpec], lt: llguidance.LLTokenizer,
                       marker_ids: dict[str, int], forced: str | None = None, after_prefix: bool = True,
                       parallel: bool = True) -> str:
    """A tool-call section of ``dialect`` calling only ``tools`` with schema-valid arguments.

    ``after_prefix``: the prompt already ends with ``dialect.forced_prefix(forced)`` (up to the name when
    ``forced`` is None, up to the arguments otherwise); the grammar covers the rest of that first call and the
    section's end. ``parallel``: further calls may follow the first (each to any declared tool)."""
    if not tools:
        raise GrammarError("a tool-call grammar needs at least one tool")
    m = {k: _lit(v, lt, marker_ids) for k, v in (("section_begin", dialect.section_begin),
                                                   ("section_end", dialect.section_end),
                                                   ("call_begin", dialect.call_begin), ("sep", dialect.sep),
                                                   ("call_end", dialect.call_end))}
    rules = [f"args_{i}: {_json_rule(t.schema)}" for i, t in enumerate(tools)]
    index = {t.name: i for i, t in enumerate(tools)}

    def named(i: int) -> str:  # the call from its name on
        name = json.dumps(tools[i].name)
        if dialect.named_body:
            return f'{name} "\\n```json\\n" args_{i} "\\n```" {m["call_end"]}'
        return f'{name} ":" IDX {m["sep"]} args_{i} {m["call_end"]}'

    def args_on(i: int) -> str:  # the call from its arguments on
        return f'args_{i} "\\n```" {m["call_end"]}' if dialect.named_body else f'args_{i} {m["call_end"]}'

    head = f'"function" {m["sep"]}' if dialect.named_body else '"functions."'
    rules.append("call_named: " + " | ".join(f"({named(i)})" for i in range(len(tools))))
    rules.append(f"call: {m['call_begin']} {head} call_named")
    if not after_prefix:
        first = f"{m['section_begin']} call"
    elif forced is None:
        first = "call_named"
    else:
        if forced not in index:
            raise GrammarError(f"tool {forced!r} is not among the tools")
        first = args_on(index[forced])
    more = "call*" if parallel else ""
    start = f"start: {first} {more} {m['section_end']}"
    return "\n".join([start, *rules, "IDX: /[0-9]{1,4}/", ""])
