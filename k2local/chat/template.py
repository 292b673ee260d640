"""Render a checkpoint's Jinja chat template the way HF transformers does, plus k2local's own Kimi K2 template.

The environment matches ``transformers``' ``apply_chat_template``: a sandboxed environment with
``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, a no-op ``{% generation %}`` tag, a ``tojson``
filter that does not escape HTML or non-ASCII and accepts ``indent``/``separators``/``sort_keys``, and the globals
``raise_exception`` and ``strftime_now``. Unlike transformers' ImmutableSandboxedEnvironment it lets a template
mutate the lists and dicts it creates itself (the Kimi-K2-Thinking template calls ``ids.append`` / ``ids.pop(0)``
on a namespace list, which llama.cpp renders); the data passed in (messages, tools, kwargs) is a read-only copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import SandboxedEnvironment, modifies_known_mutable

from k2local.errors import K2Error

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "KIMI_K2_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "make_environment",
    "normalize_messages",
]

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

KIMI_K2_TEMPLATE = """\
{#- k2local's Kimi K2 Instruct chat template (current "v3" behaviour). -#}
{%- macro render_content(message) -%}
  {%- set content = message.get('content') -%}
  {%- if content is string -%}
    {{- content -}}
  {%- elif content is not none -%}
    {%- for part in content -%}
      {%- if part is string -%}
        {{- part -}}
      {%- elif part.get('type', 'text') == 'text' -%}
        {{- part.get('text') or '' -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(n_calls=0, call_ids=[], n_results=0) -%}
{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>
{%- endif -%}
{%- if not messages or messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>""" + DEFAULT_SYSTEM_PROMPT + """<|im_end|>
{%- endif -%}
{%- for message in messages -%}
  {%- set role = message['role'] -%}
  {%- if role == 'user' -%}
    <|im_user|>
  {%- elif role == 'assistant' -%}
    <|im_assistant|>
  {%- else -%}
    <|im_system|>
  {%- endif -%}
  {{- message.get('name') or role }}<|im_middle|>
  {%- if role == 'assistant' and message.get('tool_calls') -%}
    {{- render_content(message) -}}
    <|tool_calls_section_begin|>
    {%- for call in message['tool_calls'] -%}
      {%- set function = call['function'] -%}
      {%- set call_id = call.get('id') or ('functions.' ~ function['name'] ~ ':' ~ ns.n_calls) -%}
      {%- set ns.n_calls = ns.n_calls + 1 -%}
      {%- set ns.call_ids = ns.call_ids + [call_id] -%}
      <|tool_call_begin|>{{ call_id }}<|tool_call_argument_begin|>
      {%- if function['arguments'] is string -%}
        {{- function['arguments'] -}}
      {%- else -%}
        {{- function['arguments'] | tojson -}}
      {%- endif -%}
      <|tool_call_end|>
    {%- endfor -%}
    <|tool_calls_section_end|>
  {%- elif role == 'tool' -%}
    {%- set result_id = message.get('tool_call_id') -%}
    {%- if not result_id and ns.n_results < ns.call_ids | length -%}
      {%- set result_id = ns.call_ids[ns.n_results] -%}
    {%- endif -%}
    {%- set ns.n_results = ns.n_results + 1 -%}
    ## Return of {{ result_id or '' }}{{ '\\n' }}{{ render_content(message) }}
  {%- else -%}
    {{- render_content(message) -}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
{%- endif -%}
"""
"""k2local's own Kimi K2 template: tools declared as compact JSON, default system prompt, ``name``-aware role
headers, tool calls with their ids (or ``functions.NAME:N`` counted over the conversation) and raw string
arguments, tool results as ``## Return of {id}\\n{content}``."""


class ChatTemplateError(K2Error, ValueError):
    """The chat template is missing, does not compile, fails to render, or the messages are malformed."""


class _RaisedByTemplate(jinja2.TemplateError):
    pass


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    if separators is not None:
        separators = tuple(separators)  # type: ignore[assignment]
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _InputList(list):  # type: ignore[type-arg]
    """A list passed into a template: read like a list, refused mutation by :class:`_TemplateSandbox`."""


class _InputDict(dict):  # type: ignore[type-arg]
    """A dict passed into a template: read like a dict, refused mutation by :class:`_TemplateSandbox`."""


def _template_data(value: Any) -> Any:
    """A deep copy of template inputs whose lists and dicts the template may read but not mutate."""
    if isinstance(value, Mapping):
        return _InputDict((k, _template_data(v)) for k, v in value.items())
    if isinstance(value, list):
        return _InputList(_template_data(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_template_data(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(value)
    return value


class _TemplateSandbox(SandboxedEnvironment):
    """Jinja's sandbox (no private attributes, no unsafe callables) that refuses mutating the inputs (as
    ImmutableSandboxedEnvironment refuses mutating anything) but allows it on the template's own lists and dicts."""

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, (_InputList, _InputDict)) and modifies_known_mutable(obj, attr):
            return False
        return super().is_safe_attribute(obj, attr, value)


def make_environment() -> SandboxedEnvironment:
    """A sandboxed Jinja environment configured like HF transformers' chat-template renderer.

    Pass inputs through ``_template_data`` (as :meth:`ChatTemplate.render` does) to keep them read-only."""
    env = _TemplateSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _content_text(content: Any, where: str) -> str | None:
    """OpenAI content (string, None, or list of parts) -> string; text parts are concatenated."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise ChatTemplateError(f"{where}: content must be a string, null or a list of parts")
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(f"{where}: unsupported content part {kind!r} (only text parts are supported)")
    return "".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copy messages as plain dicts with string (or None) content; check each has a role."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            raise ChatTemplateError(f"messages[{i}]: expected an object with a string 'role'")
        m = dict(msg)
        if "content" in m:
            m["content"] = _content_text(m["content"], f"messages[{i}]")
        out.append(m)
    return out


class ChatTemplate:
    """A compiled chat template. Build with :meth:`from_dir` or :meth:`from_string`."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        special_tokens: Mapping[str, Any] | None = None,
        tool_use_source: str | None = None,
        origin: str = "<string>",
    ) -> None:
        self.source = source
        self.tool_use_source = tool_use_source
        self.origin = origin
        self.special_tokens: dict[str, Any] = {**(special_tokens or {}), "bos_token": bos_token, "eos_token": eos_token}
        env = make_environment()
        self._template = self._compile(env, source, origin)
        self._tool_use = self._compile(env, tool_use_source, f"{origin} (tool_use)") if tool_use_source else None

    @staticmethod
    def _compile(env: SandboxedEnvironment, source: str, origin: str) -> jinja2.Template:
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin}: chat template is empty or not a string")
        try:
            return env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: template syntax error at line {e.lineno}: {e.message}") from e

    @classmethod
    def from_string(cls, src: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        """Compile a template string."""
        return cls(src, bos_token=bos_token, eos_token=eos_token)

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> ChatTemplate:
        """Load a checkpoint's template; ``chat_template.jinja`` wins over ``chat_template`` in tokenizer_config.json.

        A list of named templates in the config selects ``name`` (default: "default"); a "tool_use" entry is used
        when tools are given and no explicit name was asked for.
        """
        path = Path(path)
        cfg_path = path / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ChatTemplateError(f"{cfg_path}: not valid JSON: {e}") from None
            if not isinstance(cfg, dict):
                raise ChatTemplateError(f"{cfg_path}: expected a JSON object")
        special = {k: _token_content(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        extra = {k: v for k, v in special.items() if k not in ("bos_token", "eos_token")}
        if isinstance(cfg.get("additional_special_tokens"), list):
            extra["additional_special_tokens"] = [_token_content(t) for t in cfg["additional_special_tokens"]]
        common = dict(bos_token=special["bos_token"], eos_token=special["eos_token"], special_tokens=extra)

        jinja_path = path / "chat_template.jinja"
        if jinja_path.is_file():
            try:
                src = jinja_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"{jinja_path}: cannot read: {e}") from None
            return cls(src, origin=str(jinja_path), **common)

        raw = cfg.get("chat_template")
        if raw is None:
            raise ChatTemplateError(f"{path}: no chat_template.jinja and no chat_template in tokenizer_config.json")
        if isinstance(raw, str):
            return cls(raw, origin=f"{cfg_path} chat_template", **common)
        if isinstance(raw, list):
            named: dict[str, str] = {}
            for entry in raw:
                if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)):
                    raise ChatTemplateError(f"{cfg_path}: chat_template list entries need 'name' and 'template'")
                named[entry["name"]] = entry.get("template")  # type: ignore[assignment]
            want = name or "default"
            if want not in named:
                raise ChatTemplateError(f"{cfg_path}: no chat template named {want!r} (have {sorted(named)})")
            tool_use = named.get("tool_use") if name is None and want != "tool_use" else None
            return cls(named[want], tool_use_source=tool_use, origin=f"{cfg_path} chat_template[{want}]", **common)
        raise ChatTemplateError(f"{cfg_path}: chat_template must be a string or a list of named templates")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kw: Any,
    ) -> str:
        """Render a conversation; extra keyword arguments become template variables."""
        msgs = normalize_messages(messages)
        template = self._tool_use if (tools and self._tool_use is not None) else self._template
        context = {**self.special_tokens, **kw, "messages": msgs, "tools": tools,
                   "add_generation_prompt": add_generation_prompt}
        try:
            return template.render(**_template_data(context))
        except _RaisedByTemplate as e:
            raise ChatTemplateError(f"{self.origin}: template raised: {e.message}") from e
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.origin}: {type(e).__name__}: {e}") from e
        except Exception as e:  # runtime errors inside the template (TypeError, KeyError, ...)
            raise ChatTemplateError(f"{self.origin}: rendering failed: {type(e).__name__}: {e}") from e


def _token_content(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""
