"""The server as agent clients drive it (issue 18): Claude Code-shaped Anthropic requests, keep-alive pings during a
long prefill, token counts past the context, marker tokens kept out of content, forced tool choices among several
tools on random weights, and the sampling parameters (logit_bias, penalties), all through the official SDKs (or raw
HTTP where the wire itself is checked) against the real uvicorn server on the tiny checkpoint.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from k2local.engine import Engine, LoadOptions
from k2local.server.app import create_app
from k2local.tiny import default_tiny_path
from tests.server_harness import serving
from tests.test_server import CALL_TEXT, CLOCK, KEY, WEATHER, Script

CONTEXT = 4096
PING = 0.05  # seconds without output before an Anthropic stream pings (5 s in a real server)


class Agents:
    def __init__(self, app, url: str, script: Script, model: str, engine: Engine) -> None:
        self.app, self.url, self.script, self.model, self.engine = app, url, script, model, engine
        self.openai = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        self.anthropic = anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=120)

    @property
    def worker(self):
        return self.app.state.k2.worker

    def post(self, path: str, body: object) -> httpx.Response:
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"x-api-key": KEY}, timeout=120)


def _serve(path: Path, model: str, context: int) -> Iterator[Agents]:
    engine = Engine.load(path, LoadOptions(max_context=context))
    script = Script(engine.tokenizer)
    app = create_app(engine, model, api_key=KEY, ping_interval=PING, _token_source=script)
    with serving(app) as url:
        yield Agents(app, url, script, model, engine)


@pytest.fixture(scope="module")
def s() -> Iterator[Agents]:
    yield from _serve(default_tiny_path(), "kimi-k2-tiny", CONTEXT)


def _anthropic_tool(t: dict, **extra) -> dict:
    fn = t["function"]
    return {"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"], **extra}


def _many_tools(n: int) -> list[dict]:
    """Claude Code-like tool list: many tools with schemas, cache_control on the last one."""
    tools = [{"name": f"Tool{i}", "description": f"Does thing {i}",
              "input_schema": {"type": "object", "properties": {"path": {"type": "string"}},
                               "required": ["path"]}} for i in range(n)]
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    return tools


# ------------------------------------------------------------------------------------ Claude Code's requests

def test_claude_code_shaped_request(s: Agents) -> None:
    s.script.outputs["cc"] = "Done.<|im_end|>"
    eph = {"type": "ephemeral"}
    r = s.anthropic.messages.create(
        model=s.model, max_tokens=64, tools=_many_tools(12),
        system=[{"type": "text", "text": "You are Claude Code.", "cache_control": eph},
                {"type": "text", "text": " Be terse."}],
        metadata={"user_id": "u1"},
        messages=[{"role": "system", "content": "Folded system note A."},
                  {"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
                                               {"type": "text", "text": "hi [[cc]]", "cache_control": eph}]},
                  {"role": "system", "content": [{"type": "text", "text": "Folded note B.", "cache_control": eph}]}])
    assert r.content[0].text == "Done." and r.stop_reason == "end_turn"
    prompt = s.script.last_prompt_with("cc")
    a, b, c = (prompt.index(t) for t in ("You are Claude Code. Be terse.", "Folded system note A.", "Folded note B."))
    assert a < b < c < prompt.index("hi [[cc]]")
    assert "Tool11" in prompt


def test_prompt_past_the_context_in_anthropic_words(s: Agents) -> None:
    long = "word " * (CONTEXT + 100)
    with pytest.raises(anthropic.BadRequestError) as e:
        s.anthropic.messages.create(model=s.model, max_tokens=10, tools=_many_tools(3),
                                    messages=[{"role": "user", "content": long}])
    err = e.value.body["error"]
    assert err["type"] == "invalid_request_error"
    n = s.anthropic.messages.count_tokens(model=s.model, tools=_many_tools(3),
                                          messages=[{"role": "user", "content": long}]).input_tokens
    assert n > CONTEXT
    assert err["message"] == f"prompt is too long: {n} tokens > {CONTEXT} maximum"
    # OpenAI's endpoint keeps OpenAI's wording and code
    with pytest.raises(openai.BadRequestError) as oe:
        s.openai.chat.completions.create(model=s.model, max_tokens=4, messages=[{"role": "user", "content": long}])
    assert oe.value.code == "context_length_exceeded" and "maximum context length is" in oe.value.message


def test_count_tokens_any_length(s: Agents) -> None:
    short = s.anthropic.messages.count_tokens(model=s.model, messages=[{"role": "user", "content": "hello"}])
    big = s.anthropic.messages.count_tokens(model=s.model, messages=[{"role": "user", "content": "word " * 5000}])
    assert 0 < short.input_tokens < 50 and big.input_tokens > 10000 > CONTEXT


def test_ping_events_during_a_long_prefill(s: Agents) -> None:
    s.script.outputs["slow"] = "Hi.<|im_end|>"
    body = {"model": s.model, "max_tokens": 20, "stream": True,
            "messages": [{"role": "user", "content": "word " * (CONTEXT // 3) + "[[slow]]"}]}
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()
    with httpx.stream("POST", s.url + "/v1/messages", json=body, headers={"x-api-key": KEY}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                seen.append((time.monotonic() - t0, line[7:]))
    names = [n for _, n in seen]
    assert names[0] == "message_start" and names[1] == "ping" and names[-1] == "message_stop"
    first = names.index("content_block_start")
    prefill_s = seen[first][0] - seen[0][0]
    pings = names[:first].count("ping")
    # pings keep coming while the prompt is prefilled: at least one per PING seconds (less one for scheduling)
    assert pings >= 1 + int(prefill_s / PING) // 2, (pings, prefill_s)
    events = s.worker.finished[-1].result
    assert events.prompt_tokens > CONTEXT // 2  # two tokens a word


def test_context_window_reported_to_clients(s: Agents) -> None:
    [m] = s.openai.models.list().data
    assert m.id == s.model and m.model_extra["context_length"] == CONTEXT == m.model_extra["max_model_len"]
    [am] = s.anthropic.models.list().data
    assert am.id == s.model and am.type == "model"
    assert s.anthropic.models.retrieve(s.model).display_name == s.model


def test_serve_context_defaults_to_what_memory_allows() -> None:
    from k2local.placement import fitting_context, kv_bytes_per_token
    from k2local.weights.hf_checkpoint import open_checkpoint
    from offload.planner import GiB, Hardware

    src = open_checkpoint(default_tiny_path())
    cpu = torch_device()
    opts = LoadOptions()
    roomy = fitting_context(src, opts, cpu, _f32(), Hardware(64 * GiB, 32 * GiB, cpus=2))
    assert roomy == src.config.max_position_embeddings  # the model's own limit when memory is plentiful
    per_tok = kv_bytes_per_token(src.config, 4)
    tight = fitting_context(src, opts, cpu, _f32(), Hardware(64 * GiB, 4 * GiB, cpus=2))
    assert tight < roomy and tight * per_tok <= 4 * GiB // 4
    eng = Engine.load(default_tiny_path(), LoadOptions(context_from_memory=True))
    assert eng.max_context > 8192  # not the fixed default
    assert Engine.load(default_tiny_path(), LoadOptions(max_context=300, context_from_memory=True)).max_context == 300


def torch_device():
    import torch

    return torch.device("cpu")


def _f32():
    import torch

    return torch.float32


# ------------------------------------------------------------------------------------ markers out of content

def test_no_marker_leaks_without_tools(s: Agents) -> None:
    s.script.outputs["leak"] = CALL_TEXT
    s.script.outputs["stray"] = "A<|tool_call_argument_begin|>B<|tool_call_end|> C<|im_end|>"
    msgs = [{"role": "user", "content": "hi [[leak]]"}]
    r = s.openai.chat.completions.create(model=s.model, messages=msgs, max_tokens=100)
    assert r.choices[0].message.content == "Let me check." and not r.choices[0].message.tool_calls
    streamed = "".join(c.choices[0].delta.content or "" for c in s.openai.chat.completions.create(
        model=s.model, messages=msgs, max_tokens=100, stream=True) if c.choices)
    assert streamed == "Let me check."
    a = s.anthropic.messages.create(model=s.model, max_tokens=100, messages=msgs)
    assert [b.type for b in a.content] == ["text"] and a.content[0].text == "Let me check."
    r = s.openai.chat.completions.create(model=s.model, max_tokens=100,
                                         messages=[{"role": "user", "content": "hi [[stray]]"}])
    assert "<|" not in r.choices[0].message.content and r.choices[0].message.content.startswith("A")
    # raw completions are the model's text verbatim, markers included
    raw = s.openai.completions.create(model=s.model, max_tokens=100, prompt="x [[leak]]").choices[0].text
    assert raw == CALL_TEXT.removesuffix("<|im_end|>")


def test_stop_strings_never_match_inside_markers(s: Agents) -> None:
    s.script.outputs["stopmark"] = CALL_TEXT
    for stop in (["tool_call"], ["<|"], ["section"]):
        r = s.openai.chat.completions.create(model=s.model, max_tokens=100, tools=[WEATHER], stop=stop,
                                             messages=[{"role": "user", "content": "w? [[stopmark]]"}])
        m = r.choices[0].message
        assert m.content == "Let me check." and r.choices[0].finish_reason == "tool_calls", stop
        assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    # in the visible text they still cut
    r = s.openai.chat.completions.create(model=s.model, max_tokens=100, tools=[WEATHER], stop=["check"],
                                         messages=[{"role": "user", "content": "w? [[stopmark]]"}])
    assert r.choices[0].message.content == "Let me " and not r.choices[0].message.tool_calls


# -------------------------------------------------------------------------------- forced tool choice, many tools

A_TOOLS = [_anthropic_tool(WEATHER), _anthropic_tool(CLOCK)]


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_required_and_any_always_call_a_declared_tool(s: Agents, seed: int) -> None:
    """On random weights (nothing scripted) the answer still is a call to one of the declared tools."""
    r = s.openai.chat.completions.create(model=s.model, max_tokens=12, seed=seed, temperature=1.0,
                                         tools=[WEATHER, CLOCK], tool_choice="required",
                                         messages=[{"role": "user", "content": "do something"}])
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    a = s.anthropic.messages.create(model=s.model, max_tokens=12, tools=A_TOOLS, tool_choice={"type": "any"},
                                    messages=[{"role": "user", "content": f"go {seed}"}])
    uses = [b for b in a.content if b.type == "tool_use"]
    assert uses and uses[0].name in ("get_weather", "get_time") and isinstance(uses[0].input, dict)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_forced_tool_streamed_partial_json_accumulates(s: Agents, choice: dict) -> None:
    """The SDK's stream accumulator parses the concatenated partial_json: it must be JSON, random weights or not."""
    for seed in range(3):
        with s.anthropic.messages.stream(model=s.model, max_tokens=16, tools=A_TOOLS, tool_choice=choice,
                                         messages=[{"role": "user", "content": f"call {seed}"}]) as st:
            final = st.get_final_message()
        uses = [b for b in final.content if b.type == "tool_use"]
        assert uses and uses[0].name in ("get_weather", "get_time") and isinstance(uses[0].input, dict)
    s.script.outputs["pj"] = '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    with s.anthropic.messages.stream(model=s.model, max_tokens=100, tools=A_TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "Paris [[pj]]"}]) as st:
        final = st.get_final_message()
    assert final.content[-1].input == {"city": "Paris"} and final.stop_reason == "tool_use"


# ------------------------------------------------------------------------------------------ sampling parameters

def _ids(s: Agents, text: str) -> list[int]:
    return s.engine.tokenizer.encode(text)


def test_logit_bias_makes_the_token_come(s: Agents) -> None:
    [tok] = _ids(s, "Z")
    r = s.openai.chat.completions.create(model=s.model, max_tokens=6, temperature=1.0, seed=5,
                                         logit_bias={str(tok): 100}, messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Z" * 6
    gen = s.worker.finished[-1]
    assert gen.params.logit_bias == {tok: 100.0} and set(gen.result.tokens) == {tok}
    # -100 bans it, even for greedy decoding
    first = s.openai.chat.completions.create(model=s.model, max_tokens=1, temperature=0,
                                             messages=[{"role": "user", "content": "hi"}])
    top = s.worker.finished[-1].result.tokens[0]
    s.openai.chat.completions.create(model=s.model, max_tokens=1, temperature=0, logit_bias={str(top): -100},
                                     messages=[{"role": "user", "content": "hi"}])
    assert s.worker.finished[-1].result.tokens[0] != top and first.choices[0].message.content is not None
    for bad in ({"x": 1}, {str(tok): 101}, {"99999999": 1}):
        with pytest.raises(openai.BadRequestError) as e:
            s.openai.chat.completions.create(model=s.model, max_tokens=1, logit_bias=bad,
                                             messages=[{"role": "user", "content": "hi"}])
        assert e.value.param == "logit_bias"


def test_penalties_change_the_output(s: Agents) -> None:
    msgs = [{"role": "user", "content": "repeat"}]

    def tokens(**kw) -> list[int]:
        s.openai.chat.completions.create(model=s.model, max_tokens=24, temperature=0, messages=msgs,
                                         extra_body={"ignore_eos": True}, **kw)
        return s.worker.finished[-1].result.tokens

    plain = tokens()
    assert len(set(plain)) < len(plain)  # greedy decoding on random weights repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        pen = tokens(**kw)
        assert pen != plain and len(set(pen)) > len(set(plain)), kw
    with pytest.raises(openai.BadRequestError) as e:
        tokens(presence_penalty=3)
    assert e.value.param == "presence_penalty"


def test_out_of_range_sampling_options_are_refused_clearly(s: Agents) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    for kw, param in (({"n": 17}, "n"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                      ({"top_logprobs": 2}, "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as e:
            s.openai.chat.completions.create(model=s.model, max_tokens=1, messages=msgs, **kw)
        assert e.value.param == param and e.value.status_code == 400


def test_deeply_nested_json_is_a_400(s: Agents) -> None:
    deep = '{"model": "x", "messages": ' + "[" * 200_000 + "]" * 200_000 + "}"
    for path in ("/v1/chat/completions", "/v1/messages"):
        r = s.post(path, deep)
        assert r.status_code == 400, r.text
    assert "nested" in s.post("/v1/chat/completions", deep).json()["error"]["message"]
