"""Thinking models through the real server: reasoning parsed out of the output (OpenAI ``reasoning_content``,
Anthropic ``thinking`` blocks), ``chat_template_kwargs`` reaching the template, earlier turns' reasoning handed back.

The tiny checkpoint is served with a thinking chat template (its files linked, ``chat_template.jinja`` replaced):
a K2.5-style one of our own that opens ``<think>`` in the generation prompt unless ``thinking`` is false, and the
real Kimi-K2-Thinking template from ../shared/kimi_k2 (the model writes ``<think>`` itself). The model's output
is scripted through the server's token-source seam; each scripted text is tokenized in pieces cut at random
points (``<think>`` is plain text for the tiny tokenizer, so tags arrive split across tokens), and must come out
the same whatever the cuts.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from k2local.chat.reasoning import THINK_END, THINK_START
from k2local.chat.toolcalls import SECTION_BEGIN
from k2local.tiny import default_tiny_path
from tests.conftest import shared_kimi_dir
from tests.thinking_models import K25_TEMPLATE, thinking_checkpoint
from tests.test_server import KEY, WEATHER, Script, Served, _serve, collect_stream

anthropic = pytest.importorskip("anthropic")

CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        "{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>")
SPECIAL_RE = re.compile(r"(<\|[a-z_]+\|>)")


class CutScript(Script):
    """The seam's script, tokenizing each output in pieces cut at random points (never inside a special token)."""

    seed = 0

    def __call__(self, ids: list[int]) -> list[int] | None:
        text = self.tok.decode(ids)
        self.prompts.append(text)
        tags = re.findall(r"\[\[(\w+)\]\]", text)
        if not tags or tags[-1] not in self.outputs:
            return None
        rng = random.Random(self.seed)
        out: list[int] = []
        for part in SPECIAL_RE.split(self.outputs[tags[-1]]):
            if SPECIAL_RE.fullmatch(part):
                out += self.tok.encode(part, allow_special=True)
                continue
            cuts = sorted(rng.sample(range(1, len(part)), min(len(part) - 1, rng.randint(0, 6)))) if part else []
            for a, b in zip([0, *cuts], [*cuts, len(part)]):
                out += self.tok.encode(part[a:b])
        return out


def _serve_with(path: Path, model: str) -> Iterator[Served]:
    gen = _serve(path, model)
    s = next(gen)
    script = CutScript(s.script.tok)
    s.app.state.k2.worker.token_source = script
    s.script = script
    try:
        yield s
    finally:
        next(gen, None)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _serve_with(thinking_checkpoint(tmp_path_factory.mktemp("k25") / "ckpt", K25_TEMPLATE),
                           "kimi-k25-tiny")


KIMI_DIR = shared_kimi_dir()
THINKING_JINJA = KIMI_DIR / "Kimi-K2-Thinking.jinja" if KIMI_DIR else None


@pytest.fixture(scope="module")
def k2_thinking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if THINKING_JINJA is None or not THINKING_JINJA.is_file():
        pytest.skip("../shared/kimi_k2/Kimi-K2-Thinking.jinja not present")
    path = thinking_checkpoint(tmp_path_factory.mktemp("k2t") / "ckpt", THINKING_JINJA.read_text(encoding="utf-8"))
    yield from _serve_with(path, "kimi-k2-thinking-tiny")


def collect_reasoning(stream) -> tuple[str, str, dict[int, dict], str | None]:
    """(reasoning, content, calls, finish) of a chat stream; reasoning deltas must all come before the rest."""
    chunks = list(stream)
    reasoning = ""
    seen_other = False
    for ch in chunks:
        for c in ch.choices:
            r = (c.delta.model_extra or {}).get("reasoning_content")
            if r:
                assert not seen_other, "reasoning after content or a tool call"
                reasoning += r
            if c.delta.content or c.delta.tool_calls:
                seen_other = True
    content, calls, finish, _ = collect_stream(iter(chunks))
    return reasoning, content, calls, finish


def _no_tags(*texts: str | None) -> None:
    for t in texts:
        assert not t or (THINK_START not in t and THINK_END not in t), t


# --------------------------------------------------------------------------------------------------- OpenAI

CASES = [  # scripted output (the prompt opened <think>), reasoning, content, whether a Paris call follows
    ("I should greet.</think>Hello there!<|im_end|>", "I should greet.", "Hello there!", False),
    ("<think>Greet again.</think>\n\nHi!<|im_end|>", "Greet again.", "\n\nHi!", False),  # a repeated <think>
    ("Need the weather." + CALL, "Need the weather.", None, True),  # the tool section ends the reasoning
    ("Plan: call.</think>Let me check." + CALL, "Plan: call.", "Let me check.", True),
    ("Just <b>thinking</b> < > </thin k> aloud</think>Done.<|im_end|>",
     "Just <b>thinking</b> < > </thin k> aloud", "Done.", False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_reasoning_content_at_random_cut_points(thinker: Served, case: int) -> None:
    out, want_r, want_c, called = CASES[case]
    thinker.script.outputs["t"] = out
    tools = [WEATHER] if called else openai.NOT_GIVEN
    msgs = [{"role": "user", "content": "Hi [[t]]"}]
    for seed in range(3):
        thinker.script.seed = seed * 7 + case
        r = thinker.chat(msgs, tools=tools, max_tokens=200)
        m = r.choices[0].message
        assert thinker.script.last_prompt_with("t").endswith("<|im_middle|><think>")
        assert m.model_extra["reasoning_content"] == want_r
        assert m.content == want_c
        _no_tags(m.content, want_r)
        reasoning, content, calls, finish = collect_reasoning(thinker.chat(msgs, tools=tools, max_tokens=200,
                                                                           stream=True))
        assert reasoning == want_r and content == (want_c or "")
        if called:
            assert r.choices[0].finish_reason == finish == "tool_calls"
            assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
            assert calls[0]["id"] == "functions.get_weather:0" and json.loads(calls[0]["arguments"]) == {
                "city": "Paris"}
        else:
            assert r.choices[0].finish_reason == finish == "stop" and not m.tool_calls and not calls


def test_openai_stream_accumulator_keeps_reasoning(thinker: Served) -> None:
    thinker.script.outputs["acc"] = "Plan: call.</think>Let me check." + CALL
    with thinker.client.chat.completions.stream(model=thinker.model, max_tokens=200, tools=[WEATHER],
                                                messages=[{"role": "user", "content": "x [[acc]]"}]) as s:
        final = s.get_final_completion()
    m = final.choices[0].message
    assert m.model_extra["reasoning_content"] == "Plan: call." and m.content == "Let me check."
    assert m.tool_calls[0].function.name == "get_weather"


def test_length_cut_inside_reasoning_is_all_reasoning(thinker: Served) -> None:
    thinker.script.outputs["long"] = "a b c d e f g h i j k l m n o p</think>never reached<|im_end|>"
    r = thinker.chat([{"role": "user", "content": "x [[long]]"}], max_tokens=5)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "length" and m.content == ""
    assert m.model_extra["reasoning_content"] and "never" not in m.model_extra["reasoning_content"]


def test_stop_strings_apply_to_the_generated_text_reasoning_included(thinker: Served) -> None:
    thinker.script.outputs["stopr"] = "think STOP more</think>answer STOP tail<|im_end|>"
    r = thinker.chat([{"role": "user", "content": "x [[stopr]]"}], max_tokens=100, stop=["STOP"])
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and m.model_extra["reasoning_content"] == "think " and m.content == ""
    r = thinker.chat([{"role": "user", "content": "x [[stopr]]"}], max_tokens=100, stop=["answer"])
    assert r.choices[0].message.model_extra["reasoning_content"] == "think STOP more"
    assert r.choices[0].message.content == ""


def test_chat_template_kwargs_reach_the_template(thinker: Served) -> None:
    thinker.script.outputs["kw"] = "<think>x</think>y<|im_end|>"
    msgs = [{"role": "user", "content": "Hi [[kw]]"}]
    r = thinker.chat(msgs, max_tokens=50, extra_body={"chat_template_kwargs": {"mood": "sunny"}})
    assert "[mood=sunny]<|im_assistant|>assistant<|im_middle|><think>" in thinker.script.last_prompt_with("kw")
    assert r.choices[0].message.model_extra["reasoning_content"] == "x"
    # thinking off: the template closes <think> at once and the output is passed through as content (vLLM)
    r = thinker.chat(msgs, max_tokens=50, extra_body={"chat_template_kwargs": {"thinking": False}})
    assert thinker.script.last_prompt_with("kw").endswith("<|im_middle|><think></think>")
    assert r.choices[0].message.content == "<think>x</think>y"
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    content, _, _, _ = collect_stream(thinker.chat(msgs, max_tokens=50, stream=True,
                                                   extra_body={"chat_template_kwargs": {"thinking": False}}))
    assert content == "<think>x</think>y"
    for bad in ([1], {"messages": []}, {"not a name": 1}, "thinking"):
        resp = thinker.post("/v1/chat/completions", {"model": thinker.model, "messages": msgs,
                                                     "chat_template_kwargs": bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "chat_template_kwargs", resp.text


def test_reasoning_content_round_trips_into_the_template(thinker: Served) -> None:
    thinker.script.outputs["r1"] = "Paris, so call.</think>Let me check." + CALL
    thinker.script.outputs["r2"] = "Got 21C.</think>It is 21°C.<|im_end|>"
    msgs: list = [{"role": "user", "content": "Paris? [[r1]]"}]
    r1 = thinker.chat(msgs, tools=[WEATHER], max_tokens=200)
    msgs.append(r1.choices[0].message.model_dump(exclude_none=True))  # reasoning_content included, as clients do
    msgs.append({"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "21C [[r2]]"})
    r2 = thinker.chat(msgs, tools=[WEATHER], max_tokens=200)
    seen = thinker.script.last_prompt_with("r2")
    assert ("<|im_assistant|>assistant<|im_middle|><think>Paris, so call.</think>Let me check."
            "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0") in seen
    assert r2.choices[0].message.model_extra["reasoning_content"] == "Got 21C."
    # vLLM's newer name for the field is accepted too; a non-string is refused
    msgs[1] = {k: v for k, v in msgs[1].items() if k != "reasoning_content"} | {"reasoning": "Renamed."}
    thinker.chat(msgs, tools=[WEATHER], max_tokens=5)
    assert "<think>Renamed.</think>Let me check." in thinker.script.prompts[-1]
    msgs[1]["reasoning"] = 5
    with pytest.raises(openai.BadRequestError):
        thinker.chat(msgs, tools=[WEATHER], max_tokens=5)


def test_forced_tool_choice_skips_reasoning(thinker: Served) -> None:
    thinker.script.outputs["forced"] = "{\"city\": \"Rome\"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>"
    r = thinker.chat([{"role": "user", "content": "Rome [[forced]]"}], tools=[WEATHER], max_tokens=50,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert thinker.script.last_prompt_with("forced").endswith("<|tool_call_argument_begin|>")
    m = r.choices[0].message
    assert "reasoning_content" not in (m.model_extra or {})
    assert (m.tool_calls[0].function.name, json.loads(m.tool_calls[0].function.arguments)) == (
        "get_weather", {"city": "Rome"})


def test_completions_are_not_parsed(thinker: Served) -> None:
    thinker.script.outputs["raw"] = "<think>x</think>y<|im_end|>"
    r = thinker.client.completions.create(model=thinker.model, prompt="q [[raw]]", max_tokens=50)
    assert r.choices[0].text == "<think>x</think>y"


# ------------------------------------------------------------------------------------------------ Anthropic

def _anthropic(s: Served):
    return anthropic.Anthropic(base_url=s.url, api_key=KEY, max_retries=0, timeout=60)


ATOOLS = [{"name": "get_weather", "description": "weather", "input_schema": WEATHER["function"]["parameters"]}]


def test_anthropic_thinking_blocks(thinker: Served) -> None:
    client = _anthropic(thinker)
    thinker.script.outputs["ath"] = "Paris, so call.</think>Let me check." + CALL
    msgs = [{"role": "user", "content": "Paris? [[ath]]"}]
    for seed in range(3):
        thinker.script.seed = seed
        msg = client.messages.create(model=thinker.model, max_tokens=200, tools=ATOOLS, messages=msgs)
        assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
        assert msg.content[0].thinking == "Paris, so call." and msg.content[0].signature == ""
        assert msg.content[1].text == "Let me check." and msg.content[2].input == {"city": "Paris"}
        assert msg.stop_reason == "tool_use"
        with client.messages.stream(model=thinker.model, max_tokens=200, tools=ATOOLS, messages=msgs) as st:
            kinds = [e.type for e in st]
            final = st.get_final_message()
        assert "thinking" in kinds  # the SDK's own thinking events
        assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
        assert final.content[0].thinking == "Paris, so call." and final.content[1].text == "Let me check."
        assert final.content[2].input == {"city": "Paris"} and final.stop_reason == "tool_use"

    # the thinking block sent back reaches the template as the turn's reasoning_content
    thinker.script.outputs["aback"] = "Sunny.</think>It is sunny.<|im_end|>"
    history = msgs + [{"role": "assistant", "content": [b.model_dump() for b in final.content]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": final.content[2].id,
                                                    "content": "21C [[aback]]"}]}]
    again = client.messages.create(model=thinker.model, max_tokens=200, tools=ATOOLS, messages=history)
    assert "<think>Paris, so call.</think>Let me check.<|tool_calls_section_begin|>" in \
        thinker.script.last_prompt_with("aback")
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in again.content] == [
        ("thinking", "Sunny."), ("text", "It is sunny.")]
    assert again.stop_reason == "end_turn"

    # thinking disabled: the template's `thinking` is false, output passed through
    thinker.script.outputs["aoff"] = "plain<|im_end|>"
    off = client.messages.create(model=thinker.model, max_tokens=50, thinking={"type": "disabled"},
                                 messages=[{"role": "user", "content": "hi [[aoff]]"}])
    assert thinker.script.last_prompt_with("aoff").endswith("<think></think>")
    assert [b.type for b in off.content] == ["text"] and off.content[0].text == "plain"
    on = client.messages.create(model=thinker.model, max_tokens=50,
                                thinking={"type": "enabled", "budget_tokens": 1024},
                                messages=[{"role": "user", "content": "hi [[aoff]]"}])
    assert thinker.script.last_prompt_with("aoff").endswith("<think>")
    assert [b.type for b in on.content] == ["thinking", "text"] and on.content[0].thinking == "plain"
    bad = thinker.post("/v1/messages", {"model": thinker.model, "max_tokens": 5, "thinking": {"type": "maybe"},
                                        "messages": [{"role": "user", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["type"] == "error"


def test_anthropic_raw_stream_events(thinker: Served) -> None:
    thinker.script.outputs["araw"] = "Hmm.</think>Hi.<|im_end|>"
    body = {"model": thinker.model, "max_tokens": 50, "stream": True,
            "messages": [{"role": "user", "content": "x [[araw]]"}]}
    with httpx.stream("POST", thinker.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [e["content_block"] for e in starts] == [{"type": "thinking", "thinking": "", "signature": ""},
                                                    {"type": "text", "text": ""}]
    assert [e["index"] for e in starts] == [0, 1]
    deltas = [e for e in events if e["type"] == "content_block_delta"]
    assert {e["delta"]["type"] for e in deltas if e["index"] == 0} == {"thinking_delta"}
    assert "".join(e["delta"]["thinking"] for e in deltas if e["index"] == 0) == "Hmm."
    assert "".join(e["delta"]["text"] for e in deltas if e["index"] == 1) == "Hi."
    stops = [e["index"] for e in events if e["type"] == "content_block_stop"]
    assert stops == [0, 1]


# --------------------------------------------------------------------------------- the real K2-Thinking template

def test_k2_thinking_template_served(k2_thinking: Served) -> None:
    """K2-Thinking's template does not open <think>: the model writes it (or answers without reasoning)."""
    s = k2_thinking
    s.script.outputs["k1"] = "<think>Paris: call the tool.</think>Checking." + CALL
    s.script.outputs["k2"] = "<think>Sunny it is.</think>It is sunny in Paris.<|im_end|>"
    msgs: list = [{"role": "user", "content": "Weather in Paris? [[k1]]"}]
    for seed in range(3):
        s.script.seed = seed
        reasoning, content, calls, finish = collect_reasoning(s.chat(msgs, tools=[WEATHER], max_tokens=200,
                                                                     stream=True))
        assert (reasoning, content, finish) == ("Paris: call the tool.", "Checking.", "tool_calls")
        assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert s.script.last_prompt_with("k1").endswith("<|im_assistant|>assistant<|im_middle|>")
    r1 = s.chat(msgs, tools=[WEATHER], max_tokens=200)
    assert r1.choices[0].message.model_extra["reasoning_content"] == "Paris: call the tool."
    msgs.append(r1.choices[0].message.model_dump(exclude_none=True))
    msgs.append({"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "Sunny [[k2]]"})
    r2 = s.chat(msgs, tools=[WEATHER], max_tokens=200)
    seen = s.script.last_prompt_with("k2")
    assert "<think>Paris: call the tool.</think>Checking.<|tool_calls_section_begin|>" in seen  # open loop: kept
    m2 = r2.choices[0].message
    assert (m2.model_extra["reasoning_content"], m2.content) == ("Sunny it is.", "It is sunny in Paris.")
    # the finished loop's reasoning is dropped by the template on the next user turn
    msgs += [m2.model_dump(exclude_none=True), {"role": "user", "content": "Thanks [[k3]]"}]
    s.script.outputs["k3"] = "You're welcome.<|im_end|>"  # no <think>: content, exactly
    r3 = s.chat(msgs, tools=[WEATHER], max_tokens=50)
    assert "Paris: call the tool." not in s.script.last_prompt_with("k3")
    assert r3.choices[0].message.content == "You're welcome."
    assert "reasoning_content" not in (r3.choices[0].message.model_extra or {})


# -------------------------------------------------------------------------------------------- the output path

def test_output_without_reasoning_is_verbatim_and_think_ids_are_kept() -> None:
    from k2local.server.requests import ToolMode
    from k2local.server.worker import Output, _marker_ids
    from k2local.chat.toolcalls import KIMI
    from k2local.tokenizer.tiktoken_bpe import load_tokenizer

    tok = load_tokenizer(default_tiny_path())
    events: list = []
    out = Output(tok, [], ToolMode(), events.append)
    for t in tok.encode("<think>x</think>y"):
        out.on_token(t)
    out.close()
    assert "".join(out.content) == "<think>x</think>y" and not out.reasoning

    class Special:  # a tokenizer whose <think> / </think> are special (skipped when decoding)
        skip_ids = frozenset({1, 2, 9})

        @staticmethod
        def token_to_id(t: str) -> int | None:
            return {THINK_START: 1, THINK_END: 2, SECTION_BEGIN: 9}.get(t)

    assert _marker_ids(Special(), KIMI) == {1, 2, 9}
