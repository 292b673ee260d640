"""Request options that constrain the output -> compiled grammars: forced tool calls (tool_choice required / any /
a named tool), ``response_format`` (chat) and ``text.format`` (responses). A schema llguidance cannot compile is a
400 naming the request field."""
from __future__ import annotations

from typing import Any

from k2local.chat.toolcalls import ToolDialect
from k2local.grammar import Grammar, GrammarError, ToolSpec, json_grammar, tool_calls_grammar
from k2local.grammar.vocab import ll_tokenizer
from k2local.server.requests import ToolMode, bad_param
from k2local.tokenizer.common import TextTokenizer

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _schema(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return dict(ANY_OBJECT)
    if not isinstance(raw, dict):
        raise bad_param(where.split(".")[0], f"'{where}' must be a JSON schema object")
    return raw


def response_format_schema(body: dict) -> dict[str, Any] | None:
    """OpenAI chat ``response_format``: None for text (or absent), else the JSON schema the output must satisfy."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("name"), str):
            raise bad_param("response_format", "response_format json_schema needs 'json_schema': {\"name\": ..., "
                                               "\"schema\": {...}}")
        return _schema(js.get("schema"), "response_format.json_schema.schema")
    raise bad_param("response_format", "response_format type must be 'text', 'json_object' or 'json_schema'")


def text_format_schema(body: dict) -> dict[str, Any] | None:
    """OpenAI Responses ``text.format``: None for text (or absent), else the JSON schema the output must satisfy."""
    text = body.get("text")
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
        raise bad_param("text.format", "'text' must be {\"format\": {\"type\": ...}}")
    kind = (fmt or {"type": "text"}).get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return dict(ANY_OBJECT)
    if kind == "json_schema":
        return _schema(fmt.get("schema"), "text.format.schema")
    raise bad_param("text.format", "text.format type must be 'text', 'json_object' or 'json_schema'")


def output_grammar(tokenizer: TextTokenizer, schema: dict[str, Any], param: str) -> Grammar:
    try:
        return Grammar(tokenizer, json_grammar(schema))
    except GrammarError as e:
        raise bad_param(param, f"{param}: unsupported JSON schema: {e}") from None


def tool_grammar(tokenizer: TextTokenizer, dialect: ToolDialect, mode: ToolMode, tools: list[dict],
                 forced: str | None, parallel: bool) -> Grammar:
    """The rest of a forced tool-call section after ``mode.prefix``: a declared tool (``forced``, or any of them),
    arguments valid for its schema, then (``parallel``) more calls, then the section's end."""
    specs = [ToolSpec(t["function"]["name"], _schema(t["function"].get("parameters"), "tools.parameters"))
             for t in tools]
    ids = {m: i for m in dialect.markers if (i := tokenizer.token_to_id(m)) is not None}
    try:
        lark = tool_calls_grammar(dialect, specs, ll_tokenizer(tokenizer), ids, forced=forced,
                                  parallel=parallel and forced is None)
        return Grammar(tokenizer, lark)
    except GrammarError as e:
        for i, spec in enumerate(specs):  # name the tool whose schema fails
            try:
                Grammar(tokenizer, json_grammar(spec.schema))
            except GrammarError as one:
                raise bad_param("tools", f"tools[{i}] ({spec.name}): unsupported parameters schema: {one}") from None
        raise bad_param("tools", f"tools: cannot build the tool-call grammar: {e}") from None
