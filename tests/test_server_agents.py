"""The server as agent clients drive it (issue 18): Claude Code-shaped Anthropic requests, keep-alive pings during a
long prefill, token counts past the context, marker tokens kept out of content, forced tool choices among several
tools on random weights, and the sampling parameters (logit_bias, penalties), all through the official SDKs (or raw
HTTP where the wire itself is checked) against the real uvicorn server on the tiny checkpoint.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import uvicorn

from k2local.engine import Engine, LoadOptions
from k2local.server.app import create_app
from k2local.tiny import default_tiny_path
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
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield Agents(app, f"http://127.0.0.1:{sock.getsockname()[1]}", script, model, engine)
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()


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
