"""Request bodies of the OpenAI and Anthropic APIs -> validated sampling parameters and run plans; API errors."""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import JSONResponse

from k2local.sampler import MAX_TOP_LOGPROBS, SamplingParams
from k2local.chat.toolcalls import (
    KIMI,
    ToolDialect,
    count_tool_calls,
    make_tool_call_id,
)

DEFAULT_TEMPERATURE = 0.6  # Moonshot's recommendation for Kimi K2 Instruct
MAX_STOP_STRINGS = 16
_TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


# ---------------------------------------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as OpenAI's (or Anthropic's) error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


class ContextLengthError(APIError):
    """A prompt that does not fit the context window (OpenAI's wording; Anthropic's endpoint rewords it)."""

    def __init__(self, prompt_tokens: int, limit: int, param: str):
        super().__init__(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                              f"{prompt_tokens} prompt tokens. Please reduce the length of the {param}.",
                         param=param, code="context_length_exceeded")
        self.prompt_tokens, self.limit = prompt_tokens, limit


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    500: "api_error", 503: "overloaded_error"}


def error_response(err: APIError, anthropic: bool) -> JSONResponse:
    if anthropic:
        kind = ANTHROPIC_TYPES.get(err.status, "invalid_request_error" if err.status < 500 else "api_error")
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": err.message}}
    else:
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


def bad_param(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


# ------------------------------------------------------------------------------------------- parameter parsing

def _field(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    """body[key] checked against kinds (None when absent or null); bools never count as numbers."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds:
        raise bad_param(key, f"'{key}' must be {what}, got {json.dumps(v)}")
    if not isinstance(v, kinds):
        raise bad_param(key, f"'{key}' must be {what}, got {type(v).__name__}")
    return v


def _number(body: dict, key: str, default: float | None, lo: float, hi: float, lo_open: bool = False
            ) -> float | None:
    v = _field(body, key, (int, float), "a number")
    if v is None:
        return default
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        raise bad_param(key, f"'{key}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v}")
    return float(v)


def integer_param(body: dict, key: str, default: int | None, lo: int | None = None) -> int | None:
    v = _field(body, key, (int,), "an integer")
    if v is None:
        return default
    if lo is not None and v < lo:
        raise bad_param(key, f"'{key}' must be >= {lo}, got {v}")
    return v


def flag(body: dict, key: str) -> bool:
    return bool(_field(body, key, (bool,), "a boolean"))


def stop_strings(body: dict, key: str) -> list[str]:
    v = body.get(key)
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_param(key, f"'{key}' must be a non-empty string or a list of non-empty strings")
    if len(items) > MAX_STOP_STRINGS:
        raise bad_param(key, f"'{key}' may hold at most {MAX_STOP_STRINGS} strings")
    return items


def want_usage(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad_param("stream_options", "'stream_options' must be an object")
    return stream and flag(opts, "include_usage")


MAX_CHOICES = 16


def choice_count(body: dict) -> int:
    """``n``: how many choices to generate for the prompt (1..16)."""
    n = integer_param(body, "n", 1, lo=1)
    assert n is not None
    if n > MAX_CHOICES:
        raise bad_param("n", f"'n' must be at most {MAX_CHOICES}, got {n}")
    return n


def chat_logprobs(body: dict) -> int | None:
    """Chat ``logprobs`` (bool) + ``top_logprobs`` (0..20, needs logprobs): None when off, else the top count."""
    top = integer_param(body, "top_logprobs", None, lo=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad_param("top_logprobs", f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    if not flag(body, "logprobs"):
        if top:
            raise bad_param("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        return None
    return top or 0


def completion_logprobs(body: dict) -> int | None:
    """Completions ``logprobs`` (an integer 0..20: the top alternatives per token): None when absent."""
    top = integer_param(body, "logprobs", None, lo=0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise bad_param("logprobs", f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    return top


def sampling_params(body: dict, default_max: int | None, temperature_scale: float = 1.0,
              temperature_default: float = DEFAULT_TEMPERATURE, temperature_max: float = 2.0,
              max_keys: Sequence[str] = ("max_completion_tokens", "max_tokens")) -> SamplingParams:
    """SamplingParams from the request; no max_tokens (and no default_max) means 'to the end of the context'
    (``to_context_end``: the planner fills in the room the prompt leaves)."""
    t = _number(body, "temperature", None, 0.0, temperature_max)
    temperature = temperature_default if t is None else t * temperature_scale
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = integer_param(body, "top_k", 0, lo=-1)
    seed = integer_param(body, "seed", None)
    max_tokens = None
    for key in max_keys:
        max_tokens = integer_param(body, key, None, lo=1)
        if max_tokens is not None:
            break
    p = SamplingParams(temperature=temperature, top_p=top_p or 1.0, top_k=max(top_k or 0, 0),
                       max_tokens=max_tokens or default_max or 1, seed=seed,
                       to_context_end=max_tokens is None and default_max is None,
                       logit_bias=_logit_bias(body),
                       presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0) or 0.0,
                       frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0) or 0.0)
    if flag(body, "ignore_eos"):  # vLLM extension: generate through end-of-turn tokens
        p.stop_ids = frozenset()
    try:
        p.validate()
    except ValueError as e:
        raise bad_param(None, str(e)) from None
    return p


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's ``logit_bias``: {"token id": bias in [-100, 100]} (ids are checked against the vocabulary when the
    request is planned, :func:`check_logit_bias`)."""
    raw = body.get("logit_bias")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise bad_param("logit_bias", "'logit_bias' must be an object mapping token ids to biases")
    out: dict[int, float] = {}
    for k, v in raw.items():
        try:
            tid = int(k)
        except ValueError:
            raise bad_param("logit_bias", f"logit_bias keys must be token ids, got {k!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad_param("logit_bias", f"logit_bias[{k}] must be a number in [-100, 100], got {json.dumps(v)}")
        out[tid] = float(v)
    return out


def check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    bad = [i for i in params.logit_bias if not 0 <= i < vocab_size]
    if bad:
        raise bad_param("logit_bias", f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {vocab_size})")


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        raise bad_param("model", "you must provide a model parameter")
    if not isinstance(model, str):
        raise bad_param("model", "'model' must be a string")
    if model != model_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{model_name}`.",
                       param="model", code="model_not_found")


def check_unsupported(body: dict) -> None:
    if body.get("suffix"):
        raise bad_param("suffix", "'suffix' is not supported by k2local")
    if body.get("best_of") not in (None, 1):
        raise bad_param("best_of", "'best_of' must be 1")


# ---------------------------------------------------------------------------------------------- chat requests

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def chat_messages(raw: Any) -> list[dict]:
    """Validate OpenAI messages; 'developer' becomes 'system', dict tool-call arguments become JSON text, calls
    without an id get Kimi's functions.NAME:IDX (IDX counted over the conversation)."""
    if not isinstance(raw, list) or not raw:
        raise bad_param("messages", "'messages' must be a non-empty list")
    out: list[dict] = []
    n_calls = 0
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_param("messages", f"{where} must be an object")
        role = m.get("role")
        if role not in _ROLES:
            raise bad_param("messages", f"{where}: role must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise bad_param("messages", f"{where}: content must be a string, a list of content parts, or null")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = "system" if role == "developer" else role
        if role == "assistant":
            _assistant_reasoning(msg, where)
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            msg["tool_calls"] = _assistant_tool_calls(calls, where, n_calls)
            n_calls += len(calls)
        elif content is None and role != "assistant":
            raise bad_param("messages", f"{where}: a {role} message needs content")
        if role == "assistant" and content is None and not calls:
            msg["content"] = ""
        out.append(msg)
    return out


def _assistant_reasoning(msg: dict, where: str) -> None:
    """An earlier answer's reasoning, as the client sends it back: ``reasoning_content`` (or vLLM's newer
    ``reasoning``), kept on the message as ``reasoning_content`` for the template (K2-Thinking reads it)."""
    if "reasoning_content" not in msg and "reasoning" in msg:
        msg["reasoning_content"] = msg.pop("reasoning")
    r = msg.get("reasoning_content")
    if r is not None and not isinstance(r, str):
        raise bad_param("messages", f"{where}: reasoning_content must be a string")


RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")


def template_kwargs(body: dict) -> dict[str, Any]:
    """``chat_template_kwargs`` (vLLM / SGLang extra body, e.g. ``{"thinking": false}``): extra variables for the
    checkpoint's chat template."""
    kw = body.get("chat_template_kwargs")
    if kw is None:
        return {}
    if not isinstance(kw, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kw):
        raise bad_param("chat_template_kwargs", "'chat_template_kwargs' must be an object whose keys are names")
    clash = [k for k in kw if k in RESERVED_TEMPLATE_KWARGS]
    if clash:
        raise bad_param("chat_template_kwargs", f"chat_template_kwargs may not set {', '.join(clash)}")
    return dict(kw)


def thinking_disabled(kwargs: dict[str, Any]) -> bool:
    """True when the template kwargs turn thinking off (``thinking`` / ``enable_thinking`` false): the output is
    then passed through as content, unparsed (vLLM's ``kimi_k2`` reasoning parser does the same)."""
    return any(kwargs.get(k) is not None and not kwargs[k] for k in ("thinking", "enable_thinking"))


def _assistant_tool_calls(calls: Any, where: str, first_index: int) -> list[dict]:
    if not isinstance(calls, list):
        raise bad_param("messages", f"{where}.tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_param("messages", f"{where}.tool_calls[{j}] needs function.name")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        call_id = c.get("id") or make_tool_call_id(fn["name"], first_index + j)
        out.append({"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_tools(raw: Any) -> list[dict] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise bad_param("tools", "'tools' must be a list")
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_param("tools", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
            raise bad_param("tools", f"tools[{i}].function.name must match [A-Za-z0-9_.-]{{1,64}}, got {name!r}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad_param("tools", f"tools[{i}].function.parameters must be a JSON schema object")
    return raw or None


def parse_tool_choice(raw: Any, tools: list[dict] | None) -> str:
    """'auto' | 'none' | 'required' | 'fn:NAME'."""
    names = [t["function"]["name"] for t in tools or []]
    if raw is None:
        return "auto" if tools else "none"
    if raw in ("auto", "none", "required"):
        if raw == "required" and not tools:
            raise bad_param("tool_choice", "tool_choice 'required' needs 'tools'")
        return raw
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_param("tool_choice", "tool_choice must be 'auto', 'none', 'required' or "
                                  "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if fn["name"] not in names:
        raise bad_param("tool_choice", f"tool_choice names {fn['name']!r}, which is not among the tools")
    return "fn:" + fn["name"]


@dataclass
class ToolMode:
    """How to treat tool calls in one request's output."""

    parse: bool = False
    prefix: str = ""  # forced start of the assistant turn (fed to the parser as if the model wrote it)
    id_base: int | None = None  # forced choice: ids are rewritten to functions.NAME:(id_base + i)
    call_base: int = 0  # tool calls earlier in the conversation: numbers the ids of dialects without ids (DeepSeek)
    raw: bool = False  # a raw completion: the model's text verbatim, markers included (nothing parsed or hidden)
    choices: tuple[str, ...] = ()  # 'required' among several tools: the texts after `prefix`, one per tool name


def tool_mode(choice: str, tools: list[dict] | None, messages: list[dict], dialect: ToolDialect | None = None
              ) -> ToolMode:
    """The request's tool handling; ``dialect`` (Kimi when None) shapes the forced-choice prefix."""
    d = dialect or KIMI
    if choice == "none" or not tools:
        return ToolMode()
    base = count_tool_calls(messages)
    if choice == "auto":
        return ToolMode(parse=True, call_base=base)
    names = [t["function"]["name"] for t in tools]
    name = choice[3:] if choice.startswith("fn:") else (names[0] if len(names) == 1 else None)
    if name is None:  # 'required' with several tools: the model picks the name (after "functions." for Kimi),
        # held to the declared names and their schemas by the call grammar (k2local.server.constraints)
        head = d.forced_prefix(None)
        ends = tuple(d.forced_prefix(n, make_tool_call_id(n, base))[len(head):] for n in dict.fromkeys(names))
        return ToolMode(True, head, base, base, choices=ends)
    return ToolMode(True, d.forced_prefix(name, make_tool_call_id(name, base)), base, base)


@dataclass
class Plan:
    """One request, ready to run."""

    prompt: list[int]
    params: SamplingParams
    stops: list[str]
    tools: ToolMode
    reasoning: bool = False  # parse reasoning out of the output (a thinking model, thinking not turned off)
    start_in_reasoning: bool = False  # the prompt opened <think>: the output starts inside the reasoning


class ChatPlanner(Protocol):
    """What an endpoint module needs from the server (k2local.server.app.Server): the served model's name and the chat
    planner (messages -> a validated Plan)."""

    model_name: str

    def chat_plan(self, messages: list[dict], tools: list[dict] | None, choice: str, params: SamplingParams,
                  stops: list[str], template_kwargs: dict[str, Any] | None = None, *,
                  check_context: bool = True, output_schema: dict[str, Any] | None = None,
                  schema_param: str = "response_format", parallel: bool = True) -> Plan: ...
