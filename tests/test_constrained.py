"""Constrained decoding through the official SDKs against the real server, on random weights (nothing scripted):
forced tool calls (OpenAI required / named, Anthropic any / tool, Responses named) always call a declared tool with
arguments valid for its schema, in Kimi's and DeepSeek's dialects; response_format json_schema / json_object and
text.format give valid JSON; n choices; logprobs in OpenAI's shapes (validated with the SDK's pydantic models).

The schemas bound every string, integer and array, so a valid call always fits the token budget even when the
model is noise (an unbounded string on random weights can run past any max_tokens)."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import jsonschema
import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from k2local.tiny import default_tiny_path
from tests.test_server import KEY
from tests.test_server_agents import CONTEXT, Agents, _serve

WEATHER_ARGS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["c", "f"]},
        "days": {"type": "integer", "minimum": 0, "maximum": 99},
        "hours": {"type": "array", "items": {"enum": [6, 12, 18]}, "maxItems": 2},
        "where": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}},
                  "required": ["zone"], "additionalProperties": False},
    },
    "required": ["city", "unit", "where"],
    "additionalProperties": False,
}
SEARCH_ARGS = {"type": "object", "properties": {"q": {"type": "string", "maxLength": 5},
                                                "top": {"type": "integer", "minimum": 1, "maximum": 9}},
               "required": ["q", "top"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER_ARGS}},
         {"type": "function", "function": {"name": "search", "description": "Search", "parameters": SEARCH_ARGS}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
A_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
            "input_schema": t["function"]["parameters"]} for t in TOOLS]
ANSWER = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 50,
                                                                              "minimum": 0},
                                           "tag": {"enum": ["a", "b"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "Use a tool, please."}]
BUDGET = 160  # tokens: more than the longest valid call of the schemas above


@pytest.fixture(scope="module")
def s() -> Iterator[Agents]:
    yield from _serve(default_tiny_path(), "kimi-k2-tiny", CONTEXT)


@pytest.fixture(scope="module")
def ds() -> Iterator[Agents]:
    yield from _serve(default_tiny_path("deepseek_v3"), "deepseek-tiny", CONTEXT)


def _valid_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls
    for c in calls:
        assert c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_is_always_a_valid_call(s: Agents, seed: int) -> None:
    r = s.openai.chat.completions.create(model=s.model, messages=MSGS, tools=TOOLS, tool_choice="required",
                                         seed=seed, temperature=1.0, max_tokens=BUDGET, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls"
    _valid_calls(r.choices[0].message.tool_calls)
    assert len(r.choices[0].message.tool_calls) == 1


def test_named_tool_choice_is_a_valid_call(s: Agents) -> None:
    r = s.openai.chat.completions.create(model=s.model, messages=MSGS, tools=TOOLS, seed=3, temperature=1.0,
                                         tool_choice={"type": "function", "function": {"name": "search"}},
                                         max_tokens=BUDGET)
    [call] = r.choices[0].message.tool_calls
    _valid_calls([call], ("search",))


def test_named_tool_streamed_through_the_openai_sdk(s: Agents) -> None:
    stream = s.openai.chat.completions.create(model=s.model, messages=MSGS, tools=TOOLS, seed=5, temperature=1.0,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                              max_tokens=BUDGET, stream=True)
    args = "".join(tc.function.arguments or "" for ch in stream for tc in (ch.choices[0].delta.tool_calls or [])
                   if ch.choices)
    jsonschema.validate(json.loads(args), WEATHER_ARGS)


@pytest.mark.parametrize("choice", [{"type": "any", "disable_parallel_tool_use": True},
                                    {"type": "tool", "name": "get_weather"}])
def test_anthropic_forced_tool_stream_accumulates_to_valid_input(s: Agents, choice: dict) -> None:
    with s.anthropic.messages.stream(model=s.model, max_tokens=BUDGET, tools=A_TOOLS, tool_choice=choice,
                                     messages=[{"role": "user", "content": "call"}]) as st:
        final = st.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert uses and final.stop_reason == "tool_use"
    for u in uses:
        jsonschema.validate(u.input, SCHEMAS[u.name])


def test_responses_named_tool_and_text_format(s: Agents) -> None:
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    r = s.openai.responses.create(model=s.model, input="go", tools=tools, temperature=1.0, max_output_tokens=BUDGET,
                                  tool_choice={"type": "function", "name": "search"})
    [call] = [o for o in r.output if o.type == "function_call"]
    assert call.name == "search"
    jsonschema.validate(json.loads(call.arguments), SEARCH_ARGS)
    r = s.openai.responses.create(model=s.model, input="answer", temperature=1.0, max_output_tokens=BUDGET,
                                  text={"format": {"type": "json_schema", "name": "answer", "schema": ANSWER,
                                                   "strict": True}})
    jsonschema.validate(json.loads(r.output_text), ANSWER)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("seed", [0])
def test_json_schema_response_format_validates(s: Agents, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    r = s.openai.chat.completions.create(model=s.model, messages=[{"role": "user", "content": "json"}], seed=seed,
                                         temperature=1.0, max_tokens=BUDGET, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), ANSWER)


def test_json_object_response_format_parses(s: Agents) -> None:
    # any object: its keys are free strings, which noise may not close within a budget; a logit_bias toward the
    # tokens that close strings and objects keeps it short (the grammar alone makes it JSON)
    tok = s.engine.tokenizer
    closing = {str(i): 6 for i in range(tok.vocab_size) if any(c in tok.decode([i]) for c in '"}')}
    r = s.openai.chat.completions.create(model=s.model, messages=[{"role": "user", "content": "json"}], seed=3,
                                         temperature=1.0, max_tokens=BUDGET, response_format={"type": "json_object"},
                                         logit_bias=closing)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_unsupported_schema_is_a_400_naming_the_field(s: Agents) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}
    with pytest.raises(openai.BadRequestError) as e:
        s.openai.chat.completions.create(model=s.model, messages=MSGS, max_tokens=4, response_format=bad)
    assert e.value.param == "response_format" and "not" in e.value.message
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                          "dependentSchemas": {"a": {}}}}}]
    with pytest.raises(openai.BadRequestError) as e:
        s.openai.chat.completions.create(model=s.model, messages=MSGS, max_tokens=4, tools=tools,
                                         tool_choice="required")
    assert e.value.param == "tools" and "dependentSchemas" in e.value.message


def test_deepseek_dialect_forced_calls_validate(ds: Agents) -> None:
    r = ds.openai.chat.completions.create(model=ds.model, messages=MSGS, tools=TOOLS, tool_choice="required",
                                          seed=0, temperature=1.0, max_tokens=BUDGET, parallel_tool_calls=False)
    _valid_calls(r.choices[0].message.tool_calls)
    r = ds.openai.chat.completions.create(model=ds.model, messages=MSGS, tools=TOOLS, seed=2, temperature=1.0,
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                          max_tokens=BUDGET)
    _valid_calls(r.choices[0].message.tool_calls, ("get_weather",))


# ------------------------------------------------------------------------------- grammars alone, logits as noise

@pytest.mark.parametrize("variant", ["kimi_k2", "deepseek_v3"])
def test_tool_grammar_random_walks_always_give_valid_calls(variant: str) -> None:
    """Pure noise for logits, many seeds, both dialects, every forced shape (name chosen, named, parallel calls):
    what the grammar lets through always parses to declared tools with schema-valid arguments."""
    from k2local.chat.toolcalls import parse_tool_calls, tool_dialect
    from k2local.server.constraints import tool_grammar
    from k2local.server.requests import tool_mode
    from k2local.tokenizer.tiktoken_bpe import load_tokenizer

    tok = load_tokenizer(default_tiny_path(variant))
    d = tool_dialect(tok)
    for choice, parallel in (("required", True), ("required", False), ("fn:get_weather", False)):
        mode = tool_mode(choice, TOOLS, [], d)
        forced = choice[3:] if choice.startswith("fn:") else None
        g = tool_grammar(tok, d, mode, TOOLS, forced, parallel)
        for seed in range(6):
            torch.manual_seed(seed)
            m, out = g.matcher(), []
            while not out or out[-1] not in tok.stop_ids:
                assert len(out) < 2000
                logits = m.mask(torch.randn(tok.vocab_size) * 4)
                out.append(int(torch.multinomial(logits.softmax(-1), 1)))
                m.advance(out[-1])
            content, calls = parse_tool_calls(mode.prefix + tok.decode(out[:-1]), d)
            assert not content and calls and (parallel or len(calls) == 1), (choice, seed)
            for c in calls:
                assert c.name == forced or (forced is None and c.name in SCHEMAS)
                jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])


# ------------------------------------------------------------------------------------------------ n, logprobs

LONG = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and a whale, in three parts."}]


def test_n_choices_share_the_prefill(s: Agents) -> None:
    r = s.openai.chat.completions.create(model=s.model, messages=LONG, n=3, max_tokens=6, temperature=1.0, seed=1,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    recs = list(s.worker.finished)[-3:]
    prompt = recs[0].result.prompt_tokens
    assert all(rec.result.cached_tokens >= prompt - 1 for rec in recs[1:])  # copied, not prefilled again
    texts = {c.message.content for c in r.choices}
    assert len(texts) > 1  # seeds differ per choice
    c = s.openai.completions.create(model=s.model, prompt="Once upon a time", n=3, max_tokens=4, seed=2)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2]


def test_n_choices_streamed(s: Agents) -> None:
    seen: dict[int, str] = {}
    finished = set()
    for ch in s.openai.chat.completions.create(model=s.model, messages=LONG, n=3, max_tokens=5, stream=True,
                                               temperature=1.0, extra_body={"ignore_eos": True}):
        for c in ch.choices:
            seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2} and set(seen) == {0, 1, 2}
    idx = {c.index for ch in s.openai.completions.create(model=s.model, prompt="Hi", n=2, max_tokens=3, stream=True)
           for c in ch.choices}
    assert idx == {0, 1}


def test_chat_logprobs_shapes(s: Agents) -> None:
    raw = s.post("/v1/chat/completions", {"model": s.model, "messages": LONG, "max_tokens": 5, "logprobs": True,
                                          "top_logprobs": 3, "ignore_eos": True}).json()
    r = ChatCompletion.model_validate(raw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    tok = s.engine.tokenizer  # the message drops the tokenizer's skip ids (<|im_end|>, [PAD] ...): so does the join
    skipped = {name for name, i in tok.special_tokens.items() if i in tok.skip_ids}
    text = b"".join(bytes(t.bytes) for t in content if t.token not in skipped)
    assert text.decode("utf-8", "replace") == r.choices[0].message.content
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)
    body = {"model": s.model, "messages": LONG, "max_tokens": 4, "stream": True, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, headers={"x-api-key": KEY},
                      timeout=120) as resp:
        lines = [ln[6:] for ln in resp.iter_lines() if ln.startswith("data: {")]
    chunks = [ChatCompletionChunk.model_validate(json.loads(ln)) for ln in lines]
    streamed = [t for ch in chunks for c in ch.choices if c.logprobs and c.logprobs.content
                for t in c.logprobs.content]
    assert len(streamed) == 4 and all(len(t.top_logprobs) == 2 for t in streamed)
    plain = s.openai.chat.completions.create(model=s.model, messages=LONG, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shapes(s: Agents) -> None:
    raw = s.post("/v1/completions", {"model": s.model, "prompt": "Once upon", "max_tokens": 4, "logprobs": 2,
                                     "ignore_eos": True}).json()
    c = Completion.model_validate(raw)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)
    streamed = s.openai.completions.create(model=s.model, prompt="Once upon", max_tokens=3, logprobs=1, stream=True,
                                           extra_body={"ignore_eos": True})
    toks = [t for ch in streamed for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert len(toks) == 3
    with pytest.raises(openai.BadRequestError) as e:
        s.openai.completions.create(model=s.model, prompt="x", max_tokens=1, logprobs=21)
    assert e.value.param == "logprobs"
