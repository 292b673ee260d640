"""HTTP server: the real uvicorn server on a free loopback port, driven by the official openai client.

The tiny checkpoint has random weights, so tests that need specific output (tool calls, stop strings, UTF-8) use
the server's token-source seam: the "model" emits the token ids of a given native Kimi text, which then goes
through the same detokenize -> stop -> tool-call parser path as sampled tokens. Other tests use real sampling.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import openai
import pytest

from k2local.engine import Engine, LoadOptions
from k2local.sampler import SamplingParams
from k2local.server.app import create_app
from k2local.tiny import default_tiny_path
from tests.server_harness import serving

KEY = "sk-test-key"
CONTEXT = 512
REPO = Path(__file__).resolve().parents[1]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}}}

CALL_TEXT = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             "<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
TWO_CALLS = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
             "{\"city\": \"Beijing\"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1"
             "<|tool_call_argument_begin|>{\"city\": \"Shanghai\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")


class Script:
    """Token source for the seam: the last `[[tag]]` in the prompt picks the native text the model 'emits'."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.outputs: dict[str, str] = {}
        self.prompts: list[str] = []

    def __call__(self, ids: list[int]) -> list[int] | None:
        text = self.tok.decode(ids)
        self.prompts.append(text)
        tags = re.findall(r"\[\[(\w+)\]\]", text)
        if tags and tags[-1] in self.outputs:
            return self.tok.encode(self.outputs[tags[-1]], allow_special=True)
        return None

    def last_prompt_with(self, tag: str) -> str:
        return next(p for p in reversed(self.prompts) if f"[[{tag}]]" in p)


class Served:
    def __init__(self, app, url: str, script: Script, model: str) -> None:
        self.app, self.url, self.script, self.model = app, url, script, model
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    @property
    def worker(self):
        return self.app.state.k2.worker

    def post(self, path: str, body: object, key: str | None = KEY, timeout: object = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout)

    def chat(self, messages: list[dict], **kw):
        kw.setdefault("max_tokens", 8)
        return self.client.chat.completions.create(model=self.model, messages=messages, **kw)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    yield from _serve(default_tiny_path(), "kimi-k2-tiny")


def _serve(path: Path, model: str) -> Iterator[Served]:
    engine = Engine.load(path, LoadOptions(max_context=CONTEXT))
    script = Script(engine.tokenizer)
    app = create_app(engine, model, api_key=KEY, _token_source=script)
    with serving(app) as url:
        yield Served(app, url, script, model)


def wait_for(pred: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def collect_stream(stream) -> tuple[str, dict[int, dict], str | None, object]:
    """Accumulate chat chunks: (content, tool calls by index, finish_reason, usage)."""
    content, calls, finish, usage = "", {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    c["id"] = tc.id
                if tc.function and tc.function.name:
                    c["name"] = tc.function.name
                if tc.function and tc.function.arguments:
                    c["arguments"] += tc.function.arguments
            finish = choice.finish_reason or finish
    return content, calls, finish, usage


# ------------------------------------------------------------------------------------------------ basics

def test_health_models_and_plain_chat(served: Served) -> None:
    health = httpx.get(served.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == served.model
    assert [m.id for m in served.client.models.list().data] == [served.model]
    assert served.client.models.retrieve(served.model).id == served.model

    r = served.chat([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "!"}]}],
                    max_tokens=5, temperature=0, seed=1)
    assert r.object == "chat.completion" and r.model == served.model
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str) and not c.message.tool_calls
    assert c.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "Be brief.<|im_end|><|im_user|>user<|im_middle|>Hello!" in served.script.prompts[-1]
    # greedy decoding is deterministic across requests (and across cache reuse)
    again = served.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
                        max_tokens=5, temperature=0)
    assert again.choices[0].message.content == c.message.content
    assert served.worker.finished[-1].params.temperature == 0.0


def test_default_temperature_and_max_tokens_aliases(served: Served) -> None:
    served.chat([{"role": "user", "content": "hi"}], max_tokens=None, max_completion_tokens=3)
    rec = served.worker.finished[-1]
    assert rec.params.temperature == 0.6 and rec.params.max_tokens == 3 and len(rec.result.tokens) <= 3
    served.chat([{"role": "developer", "content": "dev rules"}, {"role": "user", "content": "hi"}],
                max_tokens=2, top_p=0.5)
    assert served.worker.finished[-1].params.top_p == 0.5
    assert "<|im_system|>system<|im_middle|>dev rules" in served.script.prompts[-1]


def test_streaming_chat_with_usage(served: Served) -> None:
    stream = served.chat([{"role": "user", "content": "Count"}], max_tokens=6, temperature=0, stream=True,
                         stream_options={"include_usage": True})
    content, calls, finish, usage = collect_stream(stream)
    assert not calls and finish in ("stop", "length")
    assert usage is not None and 1 <= usage.completion_tokens <= 6
    plain = served.chat([{"role": "user", "content": "Count"}], max_tokens=6, temperature=0)
    assert content == plain.choices[0].message.content  # same tokens, same text, streamed or not


def test_stream_without_usage_and_utf8_across_tokens(served: Served) -> None:
    served.script.outputs["utf8"] = "It is 21°C in 北京 😀 today.<|im_end|>"
    stream = served.chat([{"role": "user", "content": "Weather? [[utf8]]"}], max_tokens=100, stream=True)
    chunks = list(stream)
    assert all(ch.usage is None for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "It is 21°C in 北京 😀 today."
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_prefix_cache_reused_across_requests(served: Served) -> None:
    conv = [{"role": "system", "content": "You answer about cats."}, {"role": "user", "content": "Tell me a fact."}]
    r1 = served.chat(conv, max_tokens=4, temperature=0)
    other = served.chat([{"role": "user", "content": "An unrelated conversation about dogs."}], max_tokens=4)
    assert other.usage.prompt_tokens_details.cached_tokens < r1.usage.prompt_tokens
    conv += [{"role": "assistant", "content": r1.choices[0].message.content},
             {"role": "user", "content": "And another one?"}]
    r2 = served.chat(conv, max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens


def test_shared_system_prompt_is_copied_between_conversations(served: Served) -> None:
    system = {"role": "system", "content": "You are a meticulous assistant who double-checks facts. " * 6}
    q1, q2 = {"role": "user", "content": "first question"}, {"role": "user", "content": "second, other question"}
    a = served.chat([system, q1], max_tokens=3, temperature=0)
    b = served.chat([system, q2], max_tokens=3, temperature=0)
    assert b.usage.prompt_tokens_details.cached_tokens >= 40  # the shared system prompt was not recomputed
    more = {"role": "user", "content": "more"}
    a2 = served.chat([system, q1, {"role": "assistant", "content": a.choices[0].message.content}, more],
                     max_tokens=2, temperature=0)
    b2 = served.chat([system, q2, {"role": "assistant", "content": b.choices[0].message.content}, more],
                     max_tokens=2, temperature=0)
    assert a2.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens  # both conversations stay cached
    assert b2.usage.prompt_tokens_details.cached_tokens >= b.usage.prompt_tokens
    # a copied cache decodes exactly like a fresh one (the worker is idle now, so the model is free)
    engine = served.app.state.k2.backend
    fresh = engine.new_generator().generate(engine.chat_ids([system, q2]), SamplingParams(temperature=0, max_tokens=3),
                                            engine.stop_ids)
    assert engine.tokenizer.decode(fresh.tokens, skip_special_tokens=True) == b.choices[0].message.content


def test_stop_strings(served: Served) -> None:
    served.script.outputs["stops"] = "alpha beta STOP gamma<|im_end|>"
    msgs = [{"role": "user", "content": "go [[stops]]"}]
    r = served.chat(msgs, max_tokens=50, stop=["STOP", "zeta"])
    assert r.choices[0].message.content == "alpha beta " and r.choices[0].finish_reason == "stop"
    content, _, finish, _ = collect_stream(served.chat(msgs, max_tokens=50, stop="ta ST", stream=True))
    assert content == "alpha be" and finish == "stop"
    r = served.chat(msgs, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


# -------------------------------------------------------------------------------------------- tool calls

class RoundTrip(NamedTuple):
    r1: Any  # the response with the tool call
    r2: Any  # the answer after the tool result
    messages: list  # the conversation so far (user, assistant call, tool result)
    first_prompt: str  # what the model saw for each turn
    seen: str


def _weather_round_trip(s: Served, call_text: str, answer_text: str) -> RoundTrip:
    """A tool round trip in the model's own format: the model answers "Let me check." and calls get_weather(Paris)
    (call_text), gets the result, then answers (answer_text). Checks what the client sees; returns the responses,
    the conversation and the prompts of the two turns for the format's own checks."""
    s.script.outputs["call"] = call_text
    s.script.outputs["answer"] = answer_text
    messages: list = [{"role": "user", "content": "What's the weather in Paris? [[call]]"}]
    r1 = s.chat(messages, tools=[WEATHER], max_tokens=100)
    c = r1.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
    [call] = c.message.tool_calls
    assert call.id == "functions.get_weather:0" and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    messages.append(c.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temp_c": 21, "tag": "[[answer]]"})})
    r2 = s.chat(messages, tools=[WEATHER], max_tokens=100)
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    assert r2.choices[0].message.content == "It is 21°C in Paris."
    return RoundTrip(r1, r2, messages, s.script.last_prompt_with("call"), s.script.last_prompt_with("answer"))


def test_tool_call_round_trip(served: Served) -> None:
    r1, r2, _, first_prompt, seen = _weather_round_trip(served, CALL_TEXT, "It is 21°C in Paris.<|im_end|>")
    assert "<|im_system|>tool_declare<|im_middle|>" in first_prompt and "get_weather" in first_prompt
    assert ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            "{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>") in seen
    assert "functions.get_weather:0" in seen.split("<|tool_calls_section_end|>")[1]  # the result names the call
    assert "\"temp_c\": 21" in seen
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens  # conversation prefix reused


def _two_calls_streamed(s: Served, two_calls: str, content: str) -> None:
    """The model's output two_calls (content, then get_weather for Beijing and Shanghai in the model's format)
    streamed: the content and two calls with numbered ids arrive as deltas."""
    s.script.outputs["two"] = two_calls
    stream = s.chat([{"role": "user", "content": "Beijing and Shanghai [[two]]"}], tools=[WEATHER],
                    max_tokens=200, stream=True, stream_options={"include_usage": True})
    got, calls, finish, usage = collect_stream(stream)
    assert got == content and finish == "tool_calls" and usage.completion_tokens > 0
    assert [calls[i]["id"] for i in (0, 1)] == ["functions.get_weather:0", "functions.get_weather:1"]
    assert {calls[i]["name"] for i in (0, 1)} == {"get_weather"}
    assert [json.loads(calls[i]["arguments"]) for i in (0, 1)] == [{"city": "Beijing"}, {"city": "Shanghai"}]


def test_tool_calls_streamed_as_deltas(served: Served) -> None:
    _two_calls_streamed(served, TWO_CALLS, "")
    # the openai package's own stream accumulator agrees
    with served.client.chat.completions.stream(model=served.model, max_tokens=200, tools=[WEATHER],
                                               messages=[{"role": "user", "content": "again [[two]]"}]) as s:
        final = s.get_final_completion()
    assert [tc.id for tc in final.choices[0].message.tool_calls] == ["functions.get_weather:0",
                                                                     "functions.get_weather:1"]


def test_forced_tool_choice_named_and_required(served: Served) -> None:
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "functions.get_weather:0", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
               {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "21C"}]
    served.script.outputs["named"] = "{\"city\": \"Rome\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
    msgs = history + [{"role": "user", "content": "And Rome? [[named]]"}]
    r = served.chat(msgs, tools=[WEATHER, CLOCK], max_tokens=50,
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert served.script.last_prompt_with("named").endswith(
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>"
        "functions.get_weather:1<|tool_call_argument_begin|>")  # IDX = tool calls so far in the conversation
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "functions.get_weather:1", "get_weather", {"city": "Rome"})

    served.script.outputs["req"] = "get_time:7<|tool_call_argument_begin|>{}<|tool_call_end|><|im_end|>"
    r = served.chat([{"role": "user", "content": "time? [[req]]"}], tools=[WEATHER, CLOCK], max_tokens=50,
                    tool_choice="required")
    assert served.script.last_prompt_with("req").endswith("<|tool_call_begin|>functions.")
    [call] = r.choices[0].message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("functions.get_time:0", "get_time", "{}")

    content, calls, finish, _ = collect_stream(served.chat(msgs, tools=[WEATHER], max_tokens=50, stream=True,
                                                           tool_choice="required"))
    assert finish == "tool_calls" and calls[0]["id"] == "functions.get_weather:1"
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome"}


# DeepSeek-V3: the tiny deepseek_v3 checkpoint (tokenizer.json, DeepSeek's tool tokens, flagged special) is served
# with DeepSeek's tool-call dialect, picked from its tokenizer.
DS_BEGIN, DS_END, DS_EOS = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜end▁of▁sentence｜>"
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
PARIS = '{"city": "Paris"}'


def _ds_call(name: str, args: str) -> str:
    return f"{DS_CALL}function{DS_SEP}{name}\n```json\n{args}\n```{DS_CALL_END}"


@pytest.fixture(scope="module")
def served_ds(tiny_ds: Path) -> Iterator[Served]:
    yield from _serve(tiny_ds, "deepseek-v3-tiny")


def test_deepseek_tool_call_round_trip(served_ds: Served) -> None:
    s = served_ds
    _, _, messages, first_prompt, seen = _weather_round_trip(
        s, "Let me check." + DS_BEGIN + _ds_call("get_weather", PARIS) + DS_END + DS_EOS,
        f"It is 21°C in Paris.{DS_EOS}")
    assert "get_weather" in first_prompt
    # the checkpoint's own template rendered the call and its result
    assert (f"<｜Assistant｜>Let me check.{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n"
            f"{{\"city\": \"Paris\"}}{DS_CALL_END}{DS_END}{DS_EOS}<｜tool▁outputs▁begin｜>") in seen
    assert "\"temp_c\": 21" in seen.split("<｜tool▁outputs▁begin｜>")[1]
    # the next call in the conversation is numbered after the first
    s.script.outputs["again"] = DS_BEGIN + _ds_call("get_weather", "{}") + DS_END + DS_EOS
    messages.append({"role": "user", "content": "and now? [[again]]"})
    assert s.chat(messages, tools=[WEATHER], max_tokens=100).choices[0].message.tool_calls[0].id == (
        "functions.get_weather:1")


def test_deepseek_tool_calls_streamed_as_deltas(served_ds: Served) -> None:
    s = served_ds
    _two_calls_streamed(s, "Checking both." + DS_BEGIN + _ds_call("get_weather", '{"city": "Beijing"}')
                        + _ds_call("get_weather", '{"city": "Shanghai"}') + DS_END + DS_EOS, "Checking both.")
    with s.client.chat.completions.stream(model=s.model, max_tokens=200, tools=[WEATHER],
                                          messages=[{"role": "user", "content": "again [[two]]"}]) as st:
        final = st.get_final_completion()
    m = final.choices[0].message
    assert m.content == "Checking both." and final.choices[0].finish_reason == "tool_calls"
    assert [json.loads(tc.function.arguments)["city"] for tc in m.tool_calls] == ["Beijing", "Shanghai"]
    # without tools nothing is parsed: the markers stay in the text, as with Kimi
    s.script.outputs["notools"] = s.script.outputs["two"]
    r = s.chat([{"role": "user", "content": "hi [[notools]]"}], max_tokens=200)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert DS_BEGIN in r.choices[0].message.content


def test_deepseek_forced_tool_choice_served(served_ds: Served) -> None:
    """A named or required tool_choice on a DeepSeek model starts the answer inside DeepSeek's own call markers."""
    s = served_ds
    s.script.outputs["dsnamed"] = f'{PARIS}\n```{DS_CALL_END}{DS_END}{DS_EOS}'
    r = s.chat([{"role": "user", "content": "Paris? [[dsnamed]]"}], tools=[WEATHER, CLOCK], max_tokens=50,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert s.script.last_prompt_with("dsnamed").endswith(f"{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n```json\n")
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    s.script.outputs["dsreq"] = f"get_time\n```json\n{{}}\n```{DS_CALL_END}{DS_END}{DS_EOS}"
    content, calls, finish, _ = collect_stream(s.chat([{"role": "user", "content": "time? [[dsreq]]"}],
                                                      tools=[WEATHER, CLOCK], max_tokens=50, stream=True,
                                                      tool_choice="required"))
    assert s.script.last_prompt_with("dsreq").endswith(f"{DS_BEGIN}{DS_CALL}function{DS_SEP}")
    assert finish == "tool_calls" and calls[0]["name"] == "get_time" and json.loads(calls[0]["arguments"]) == {}


def test_deepseek_forced_tool_choice_prefix() -> None:
    from k2local.server.requests import tool_mode
    from k2local.chat.toolcalls import DEEPSEEK

    history = [{"role": "assistant", "tool_calls": [{}]}]
    named = tool_mode("fn:get_weather", [WEATHER], history, DEEPSEEK)
    assert named.prefix == f"{DS_BEGIN}{DS_CALL}function{DS_SEP}get_weather\n```json\n" and named.id_base == 1
    assert tool_mode("required", [WEATHER, CLOCK], [], DEEPSEEK).prefix == f"{DS_BEGIN}{DS_CALL}function{DS_SEP}"
    assert tool_mode("auto", [WEATHER], history, DEEPSEEK).call_base == 1


def test_tool_choice_none_hides_tools_and_parses_nothing(served: Served) -> None:
    served.script.outputs["nonetool"] = "plain answer<|im_end|>"
    r = served.chat([{"role": "user", "content": "hi [[nonetool]]"}], tools=[WEATHER], tool_choice="none")
    assert "tool_declare" not in served.script.last_prompt_with("nonetool")
    assert r.choices[0].message.content == "plain answer" and not r.choices[0].message.tool_calls
    served.script.outputs["notools"] = CALL_TEXT  # no tools in the request: markers are not parsed
    r = served.chat([{"role": "user", "content": "hi [[notools]]"}], max_tokens=100)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls


# ------------------------------------------------------------------------------------------- completions

def test_completions(served: Served) -> None:
    r = served.client.completions.create(model=served.model, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 4
    parts = list(served.client.completions.create(model=served.model, prompt="Once upon a time", max_tokens=4,
                                                  temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
    assert parts[-1].usage.completion_tokens == r.usage.completion_tokens
    # the tool guide's manual flow: a rendered prompt in, raw tool-call markers out
    served.script.outputs["raw"] = CALL_TEXT
    r = served.client.completions.create(model=served.model, max_tokens=100,
                                         prompt="<|im_user|>user<|im_middle|>weather [[raw]]<|im_end|>"
                                                "<|im_assistant|>assistant<|im_middle|>")
    assert r.choices[0].text == CALL_TEXT.removesuffix("<|im_end|>")
    r = served.client.completions.create(model=served.model, prompt="Hello", max_tokens=1, echo=True)
    assert r.choices[0].text.startswith("Hello")
    assert served.client.completions.create(model=served.model, prompt=[[5, 6, 7]], max_tokens=1).usage.prompt_tokens == 3


# ---------------------------------------------------------------------------------------------- Anthropic

def test_anthropic_messages_with_tools(served: Served) -> None:
    served.script.outputs["acall"] = CALL_TEXT
    served.script.outputs["aanswer"] = "Sunny.<|im_end|>"
    tools = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER["function"]["parameters"]}]
    body = {"model": served.model, "max_tokens": 100, "system": "Be helpful.", "tools": tools, "temperature": 0.5,
            "messages": [{"role": "user", "content": "Weather in Paris? [[acall]]"}]}
    r = served.post("/v1/messages", body)
    assert r.status_code == 200, r.text
    msg = r.json()
    assert served.worker.finished[-1].params.temperature == pytest.approx(0.3)  # x0.6, as Moonshot maps it
    assert msg["type"] == "message" and msg["stop_reason"] == "tool_use"
    assert msg["content"][0] == {"type": "text", "text": "Let me check."}
    assert msg["content"][1] == {"type": "tool_use", "id": "functions.get_weather:0", "name": "get_weather",
                                 "input": {"city": "Paris"}}
    body["messages"] += [{"role": "assistant", "content": msg["content"]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                                       "content": "21C [[aanswer]]"}]}]
    del body["temperature"]
    r = served.post("/v1/messages", body)
    assert r.json()["content"] == [{"type": "text", "text": "Sunny."}] and r.json()["stop_reason"] == "end_turn"
    assert served.worker.finished[-1].params.temperature == pytest.approx(0.6)  # default 1.0 x 0.6
    assert "## Return of functions.get_weather:0" in served.script.last_prompt_with("aanswer")

    body["stream"] = True
    body["messages"] = body["messages"][:1]
    with httpx.stream("POST", served.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"] and starts[1]["id"] == "functions.get_weather:0"
    args = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
                   and e["delta"]["type"] == "input_json_delta")
    assert json.loads(args) == {"city": "Paris"}

    bad = served.post("/v1/messages", {"model": served.model, "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error" and "max_tokens" in bad.json()["error"]["message"]


# ------------------------------------------------------------------------------- concurrency, disconnects

def test_concurrent_requests_each_get_their_own_answer(served: Served) -> None:
    for i in range(6):
        served.script.outputs[f"conc{i}"] = f"answer number {i}<|im_end|>"

    def one(i: int) -> str:
        msgs = [{"role": "user", "content": f"question [[conc{i}]]"}]
        if i % 2:
            return collect_stream(served.chat(msgs, max_tokens=50, stream=True))[0]
        return served.chat(msgs, max_tokens=50).choices[0].message.content

    def sampled(_: int) -> int:
        return served.chat([{"role": "user", "content": "sampled"}], max_tokens=3).usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        scripted = pool.map(one, range(6))
        real = pool.map(sampled, range(2))
        assert list(scripted) == [f"answer number {i}" for i in range(6)]
        assert all(1 <= n <= 3 for n in real)


def _long_body(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "ramble"}], "ignore_eos": True,
            "temperature": 1.0, **kw}


def _quiet(served: Served) -> int:
    """Wait until no request of an earlier test still runs (requests run side by side, so one could finish after
    this test's and be taken for it); the count of finished records then."""
    wait_for(lambda: not served.worker.active and served.worker.jobs.qsize() == 0, "earlier requests finished")
    return len(served.worker.finished)


def test_disconnect_mid_stream_stops_generation(served: Served) -> None:
    before = _quiet(served)
    body = _long_body(served.model)
    stream = served.client.chat.completions.create(model=body.pop("model"), messages=body.pop("messages"),
                                                   stream=True, extra_body=body)
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got >= 2:
            break
    stream.close()
    wait_for(lambda: len(served.worker.finished) > before, "the streamed request finished")
    rec = served.worker.finished[-1]
    assert rec.result.finish_reason == "cancelled"
    assert len(rec.result.tokens) < rec.params.max_tokens  # stopped well before the end of the context
    r = served.chat([{"role": "user", "content": "still alive?"}], max_tokens=2)  # the worker is free again
    assert r.usage.completion_tokens >= 1


def test_disconnect_while_waiting_non_streaming(served: Served) -> None:
    before = _quiet(served)
    with pytest.raises(httpx.ReadTimeout):
        served.post("/v1/chat/completions", _long_body(served.model), timeout=httpx.Timeout(60, read=0.5))
    wait_for(lambda: len(served.worker.finished) > before, "the abandoned request finished")
    rec = served.worker.finished[-1]
    assert rec.result.finish_reason == "cancelled" and len(rec.result.tokens) < rec.params.max_tokens


# ---------------------------------------------------------------------------------------------- errors

def _err(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    return err


def test_error_bad_json_and_bad_body(served: Served) -> None:
    assert _err(served.post("/v1/chat/completions", "{not json"), 400)["type"] == "invalid_request_error"
    _err(served.post("/v1/chat/completions", "[1, 2]"), 400)
    assert _err(served.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                400)["param"] == "model"
    _err(served.post("/v1/nothing-here", {}), 404)


def test_error_unknown_model(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        served.client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("nope")


def test_error_prompt_longer_than_context(served: Served) -> None:
    long = " ".join(f"w{i}" for i in range(CONTEXT))
    with pytest.raises(openai.BadRequestError) as e:
        served.chat([{"role": "user", "content": long}])
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    assert str(CONTEXT) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        served.chat([{"role": "user", "content": long}], stream=True)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=served.model, prompt=long)
    assert e.value.code == "context_length_exceeded"
    # a prompt that fits but leaves less room than max_tokens is generated up to the end of the context
    served.script.outputs["endless"] = "x " * CONTEXT
    r = served.chat([{"role": "user", "content": "hi [[endless]]"}], max_tokens=CONTEXT * 4)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == CONTEXT


@pytest.mark.parametrize("bad, param", [
    ({"temperature": 5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"seed": 1.5}, "seed"),
    ({"stop": [1, 2]}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
])
def test_error_bad_parameters(served: Served, bad: dict, param: str) -> None:
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **bad}
    err = _err(served.post("/v1/chat/completions", body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_error_bad_parameters_through_openai_client(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        served.chat([{"role": "user", "content": "hi"}], temperature=3.5)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model=served.model, prompt="", max_tokens=2)


def test_auth(served: Served) -> None:
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    body = {"model": served.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    _err(served.post("/v1/chat/completions", body, key=None), 401)
    _err(served.post("/v1/completions", {"model": served.model, "prompt": "x"}, key=None), 401)
    _err(served.post("/v1/chat/completions", "{bad json", key=None), 401)  # auth is checked first
    assert served.post("/v1/messages", body | {"max_tokens": 1}, key=None).json()["error"]["type"] == \
        "authentication_error"
    assert served.post("/v1/chat/completions", body).status_code == 200
    assert httpx.get(served.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_serve_defaults_to_tiny_with_notice() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "k2local.cli", "serve", "--port", "0", "--api-key", KEY,
                             "--served-model-name", "kimi-k2", "--max-context", "256", "--cpu-only",
                             "--log-level", "warning"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                break
        assert m, "".join(lines)
        assert "random weights" in "".join(lines).lower()
        url = f"http://127.0.0.1:{m.group(1)}"
        wait_for(lambda: _up(url), "the CLI server answers /health")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["kimi-k2"]
        r = client.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
