"""Thinking models (issue 17): the reasoning parser (whole and streamed output) and the Kimi-K2-Thinking template."""

from __future__ import annotations

import copy
import json
import random

import jinja2
import jinja2.ext
import pytest

from k2local.chat.reasoning import (
    THINK_END,
    THINK_START,
    ContentDelta,
    ReasoningDelta,
    ReasoningStreamParser,
    prompt_opens_reasoning,
    split,
)
from k2local.chat.template import ChatTemplate, ChatTemplateError
from k2local.chat.toolcalls import (
    ARGUMENT_BEGIN,
    CALL_BEGIN,
    CALL_END,
    DEEPSEEK,
    SECTION_BEGIN,
    SECTION_END,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    parse_tool_calls,
)
from tests.conftest import shared_kimi_dir

SEEDS = [0, 1, 2, 3, 17]


def _call(name: str, idx: int, args: str) -> str:
    return f"{CALL_BEGIN}functions.{name}:{idx}{ARGUMENT_BEGIN}{args}{CALL_END}"


WEATHER = SECTION_BEGIN + _call("get_weather", 0, '{"city": "Beijing"}') + SECTION_END
TWO_CALLS = (SECTION_BEGIN + _call("get_weather", 0, '{"city": "Beijing"}')
             + _call("get_weather", 1, '{"city": "上海 <b>"}') + SECTION_END)
REASONING = "The user asks about weather.\nI should call get_weather: 1 < 2 and a/b > c. 天气 ok."

# (output, start_in_reasoning, expected reasoning, expected content)
CASES = [
    # the template opened <think>: reasoning from the first token, no <think> at start
    (f"{REASONING}{THINK_END}It is sunny.", True, REASONING, "It is sunny."),
    # the model opens the tag itself (K2-Thinking's template ends with the bare assistant header)
    (f"{THINK_START}{REASONING}{THINK_END}It is sunny.", False, REASONING, "It is sunny."),
    (f"{THINK_START}{REASONING}{THINK_END}It is sunny.", True, REASONING, "It is sunny."),
    (f"\n {THINK_START}{REASONING}{THINK_END}\n\nIt is sunny.", False, REASONING, "\n\nIt is sunny."),
    # a tool-call section ends the reasoning and stays at the start of the content (for the tool-call parser)
    (f"{REASONING}{WEATHER}", True, REASONING, WEATHER),
    (f"{THINK_START}{REASONING}{TWO_CALLS}", False, REASONING, TWO_CALLS),
    # tool call after the reasoning, with and without text between
    (f"{REASONING}{THINK_END}Let me check.{WEATHER}", True, REASONING, f"Let me check.{WEATHER}"),
    (f"{THINK_START}{REASONING}{THINK_END}{TWO_CALLS}", False, REASONING, TWO_CALLS),
    # empty reasoning
    (f"{THINK_START}{THINK_END}Hi.", False, "", "Hi."),
    (f"{THINK_END}Hi.", True, "", "Hi."),
    # no thinking: plain content passes through, tool calls included
    ("Hello there.", False, "", "Hello there."),
    (f"Let me check.{WEATHER}", False, "", f"Let me check.{WEATHER}"),
    (f"  <b>bold</b> <thinking> is not a tag", False, "", "  <b>bold</b> <thinking> is not a tag"),
    # output cut while reasoning (max_tokens): all reasoning
    (f"{REASONING}", True, REASONING, ""),
    (f"{THINK_START}{REASONING}", False, REASONING, ""),
    # a repeated <think> inside the reasoning is dropped
    (f"a{THINK_START}b{THINK_END}c", True, "ab", "c"),
    ("", True, "", ""),
    ("", False, "", ""),
    (THINK_START, False, "", ""),
    ("<thi", False, "", "<thi"),  # a partial tag at the very end stays text
    ("x</thi", True, "x</thi", ""),
]


def _cuts(text: str, rng: random.Random) -> list[str]:
    """Split text at random points: single characters, tags cut anywhere, and longer runs."""
    pieces: list[str] = []
    i = 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 4, 7, 12, 40])
        pieces.append(text[i:i + n])
        i += n
    if rng.random() < 0.3:
        pieces.insert(rng.randrange(len(pieces) + 1), "")  # empty deltas happen (a token that decodes to nothing)
    return pieces


def _stream(pieces: list[str], start_in_reasoning: bool, **kw) -> tuple[list, str, str]:
    parser = ReasoningStreamParser(start_in_reasoning, **kw)
    events = [ev for p in pieces for ev in parser.feed(p)] + parser.finish()
    assert all(isinstance(ev, (ReasoningDelta, ContentDelta)) and ev.text for ev in events)
    reasoning = "".join(ev.text for ev in events if isinstance(ev, ReasoningDelta))
    content = "".join(ev.text for ev in events if isinstance(ev, ContentDelta))
    return events, reasoning, content


@pytest.mark.parametrize("text,start,reasoning,content", CASES)
def test_split(text: str, start: bool, reasoning: str, content: str) -> None:
    assert split(text, start_in_reasoning=start) == (reasoning, content)
    assert not any(tag in part for tag in (THINK_START, THINK_END) for part in (reasoning, content))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("text,start,reasoning,content", CASES)
def test_stream_random_cuts(seed: int, text: str, start: bool, reasoning: str, content: str) -> None:
    rng = random.Random(seed * 1000 + len(text))
    for _ in range(20):
        events, r, c = _stream(_cuts(text, rng), start)
        assert (r, c) == (reasoning, content)
        # all reasoning comes before any content
        kinds = [isinstance(ev, ContentDelta) for ev in events]
        assert kinds == sorted(kinds)


def test_stream_every_single_cut_point() -> None:
    """Each case cut in two at every position (each tag split at each of its characters)."""
    for text, start, reasoning, content in CASES:
        for i in range(len(text) + 1):
            assert _stream([text[:i], text[i:]], start)[1:] == (reasoning, content), (text, i)


_FRAGMENTS = ["a", "b", " ", "\n", "<", ">", "/", "|", "think", THINK_START, THINK_END, "<th", "</th", "ink>",
              "<|", SECTION_BEGIN, "<|tool_calls", SECTION_END, CALL_BEGIN, "é", "天", "\t"]


@pytest.mark.parametrize("seed", SEEDS)
def test_stream_equals_split_on_random_text(seed: int) -> None:
    """Arbitrary (also malformed) text: the streamed events always concatenate to split()'s result."""
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice(_FRAGMENTS) for _ in range(rng.randrange(0, 30)))
        start = rng.random() < 0.5
        assert _stream(_cuts(text, rng), start)[1:] == split(text, start), (text, start)


def _tool_results(pieces: list[str]) -> tuple[str, list[ToolCall]]:
    """Reasoning parser in front of the tool-call parser, the way the server's output path chains them."""
    reasoning_parser = ReasoningStreamParser(start_in_reasoning=True)
    tool_parser = ToolCallStreamParser()
    reasoning: list[str] = []
    starts: list[ToolCallStart] = []
    args: dict[int, list[str]] = {}

    def tool_events(evs) -> None:
        for ev in evs:
            if isinstance(ev, ToolCallStart):
                starts.append(ev)
            elif isinstance(ev, ToolCallArgsDelta):
                args.setdefault(ev.index, []).append(ev.text)

    def route(evs) -> None:
        for ev in evs:
            if isinstance(ev, ReasoningDelta):
                reasoning.append(ev.text)
            else:
                tool_events(tool_parser.feed(ev.text))

    for p in pieces:
        route(reasoning_parser.feed(p))
    route(reasoning_parser.finish())
    tool_events(tool_parser.finish())
    calls = [ToolCall(s.id, s.name, "".join(args.get(s.index, []))) for s in starts]
    assert calls == tool_parser.tool_calls
    return "".join(reasoning), calls


@pytest.mark.parametrize("seed", SEEDS)
def test_chained_with_tool_call_parser(seed: int) -> None:
    rng = random.Random(seed)
    expected = [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}'),
                ToolCall("functions.get_weather:1", "get_weather", '{"city": "上海 <b>"}')]
    for text in (f"{REASONING}{TWO_CALLS}", f"{THINK_START}{REASONING}{THINK_END}Checking.{TWO_CALLS}"):
        _, content = split(text, True)
        assert parse_tool_calls(content)[1] == expected
        for _ in range(20):
            assert _tool_results(_cuts(text, rng)) == (REASONING, expected)


def test_other_tool_markers() -> None:
    """The tool-section marker is the dialect's (DeepSeek-V3's here)."""
    text = f"r{DEEPSEEK.section_begin}x{SECTION_BEGIN}"
    assert split(text, True, tool_markers=(DEEPSEEK.section_begin,)) == ("r", text[1:])
    assert split(text, True) == (f"r{DEEPSEEK.section_begin}x", SECTION_BEGIN)
    assert _stream(list(text), True, tool_markers=(DEEPSEEK.section_begin,))[1:] == ("r", text[1:])
    with pytest.raises(ValueError):
        ReasoningStreamParser(tool_markers=("",))


def test_parser_state_and_holding() -> None:
    p = ReasoningStreamParser(start_in_reasoning=False)
    assert not p.in_reasoning and not p.reasoning_ended
    assert p.feed("  <th") == []  # could still be "<think>"
    assert p.feed("ink>Hmm</th") == [ReasoningDelta("Hmm")]  # "</th" held
    assert p.in_reasoning
    assert p.feed("ink>") == []
    assert p.reasoning_ended
    assert p.feed("Hi") == [ContentDelta("Hi")]
    assert p.feed("</think>") == [ContentDelta("</think>")]  # after the reasoning: verbatim (vLLM semantics)
    assert p.finish() == [] and p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("x")
    q = ReasoningStreamParser()
    assert q.feed("Hello") == [ContentDelta("Hello")] and q.reasoning_ended


def test_prompt_opens_reasoning() -> None:
    head = "<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>"
    assert prompt_opens_reasoning(head + "<think>")
    assert prompt_opens_reasoning(head + "<think>\n")
    assert not prompt_opens_reasoning(head)
    assert not prompt_opens_reasoning(head + "<think></think>")
    assert not prompt_opens_reasoning("")


# -- the Kimi-K2-Thinking chat template ---------------------------------------------------------------------------

KIMI_DIR = shared_kimi_dir()
THINKING_TEMPLATE = KIMI_DIR / "Kimi-K2-Thinking.jinja" if KIMI_DIR else None
needs_thinking_template = pytest.mark.skipif(THINKING_TEMPLATE is None or not THINKING_TEMPLATE.is_file(),
                                             reason="../shared/kimi_k2/Kimi-K2-Thinking.jinja not present")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city (<b>bold</b> & ünïcode)",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]


def _call_dict(idx: int, city: str, as_object: bool = False) -> dict:
    args = {"city": city} if as_object else json.dumps({"city": city}, ensure_ascii=False)
    return {"id": f"functions.get_weather:{idx}", "type": "function",
            "function": {"name": "get_weather", "arguments": args}}


def thinking_conversation() -> list[dict]:
    """Two tool loops; the first is finished (its reasoning is dropped), the second is still open (kept)."""
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "Weather in Beijing and Shanghai?"},
        {"role": "assistant", "content": "", "reasoning_content": "Two cities: two calls.",
         "tool_calls": [_call_dict(0, "Beijing"), _call_dict(1, "上海")]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather", "content": "Rain"},
        {"role": "assistant", "content": "Beijing is sunny, Shanghai rainy.", "reasoning_content": "Both back."},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "Tokyo?"}]},
        {"role": "assistant", "content": "Checking Tokyo.", "reasoning_content": "One more call.",
         "tool_calls": [_call_dict(2, "Tokyo", as_object=True)]},
        {"role": "tool", "tool_call_id": "functions.get_weather:2", "name": "get_weather", "content": "Cloudy"},
    ]


def _plain_jinja_render(source: str, messages: list[dict], **kw) -> str:
    """The same template through plain (unsandboxed) jinja2, with transformers-style settings and tojson."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda v, **k: json.dumps(v, ensure_ascii=False, **k)
    return env.from_string(source).render(messages=copy.deepcopy(messages), bos_token="", eos_token="", **kw)


@needs_thinking_template
def test_thinking_template_equals_plain_jinja() -> None:
    source = THINKING_TEMPLATE.read_text(encoding="utf-8")
    messages = thinking_conversation()
    before = copy.deepcopy(messages)
    ours = ChatTemplate.from_string(source).render(messages, tools=TOOLS)
    assert messages == before  # the template's list mutations never reach the caller's data
    assert ours == _plain_jinja_render(source, messages, tools=TOOLS, add_generation_prompt=True)
    # What the template is expected to do with the conversation (FACTS.md 9.4):
    assert ours.startswith('<|im_system|>tool_declare<|im_middle|>[{"type": "function"')
    assert "(<b>bold</b> & ünïcode)" in ours
    assert "Two cities" not in ours and "Both back" not in ours  # finished loop: reasoning dropped
    assert "<|im_middle|><think></think>Beijing is sunny, Shanghai rainy.<|im_end|>" in ours
    assert "<think>One more call.</think>Checking Tokyo.<|tool_calls_section_begin|>" in ours  # open loop: kept
    assert '<|tool_call_argument_begin|>{"city": "Tokyo"}<|tool_call_end|>' in ours  # dict arguments: tojson
    for i, result in enumerate(["Sunny", "Rain", "Cloudy"]):
        assert f"## Return of functions.get_weather:{i}\n{result}<|im_end|>" in ours  # ids queued and popped
    assert "<|im_user|>user<|im_middle|>And Tokyo?<|im_end|>" in ours
    assert ours.endswith("<|im_assistant|>assistant<|im_middle|>")
    assert not prompt_opens_reasoning(ours)  # this template lets the model write <think> itself
    # the template reads no `thinking` variable, so the kwarg changes nothing
    assert ChatTemplate.from_string(source).render(messages, tools=TOOLS, thinking=False) == ours


@needs_thinking_template
def test_thinking_template_equals_transformers_with_a_mutable_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' renderer (its filters, globals and message handling) with its ImmutableSandboxedEnvironment
    swapped for jinja2's SandboxedEnvironment: transformers itself refuses this template (FACTS.md 9.4)."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(utils, "ImmutableSandboxedEnvironment") or not hasattr(utils, "_compile_jinja_template"):
        pytest.skip("transformers' chat-template internals differ from the ones this test patches")
    from jinja2.sandbox import SandboxedEnvironment

    source = THINKING_TEMPLATE.read_text(encoding="utf-8")
    messages = thinking_conversation()
    utils._compile_jinja_template.cache_clear()
    monkeypatch.setattr(utils, "ImmutableSandboxedEnvironment", SandboxedEnvironment)
    try:
        rendered, _ = utils.render_jinja_template([messages], tools=TOOLS, chat_template=source,
                                                  add_generation_prompt=True)
    finally:
        utils._compile_jinja_template.cache_clear()
    assert ChatTemplate.from_string(source).render(messages, tools=TOOLS) == rendered[0]


@needs_thinking_template
def test_thinking_template_from_checkpoint_dir(tmp_path) -> None:
    (tmp_path / "tokenizer_config.json").write_bytes((KIMI_DIR / "tokenizer_config.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_bytes(THINKING_TEMPLATE.read_bytes())
    source = THINKING_TEMPLATE.read_text(encoding="utf-8")
    msgs = thinking_conversation()[:6] + [{"role": "user", "content": "Thanks"}]
    assert ChatTemplate.from_dir(tmp_path).render(msgs) == _plain_jinja_render(
        source, msgs, add_generation_prompt=True, tools=None)


K25_STYLE = (  # a K2.5-style generation prompt that reads the `thinking` kwarg
    "{%- for m in messages -%}<|im_user|>user<|im_middle|>{{ m['content'] }}<|im_end|>{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- if thinking is defined and not thinking -%}<think></think>{%- else -%}<think>{%- endif -%}{%- endif -%}"
)


def test_template_kwargs_reach_the_template() -> None:
    t = ChatTemplate.from_string(K25_STYLE)
    msgs = [{"role": "user", "content": "hi"}]
    thinking_prompt, instant_prompt = t.render(msgs), t.render(msgs, thinking=False)
    assert thinking_prompt.endswith("<|im_middle|><think>") and prompt_opens_reasoning(thinking_prompt)
    assert instant_prompt.endswith("<think></think>") and not prompt_opens_reasoning(instant_prompt)
    assert t.render(msgs, thinking=True) == thinking_prompt


def test_template_may_mutate_its_own_data_only() -> None:
    render = lambda src, **kw: ChatTemplate.from_string(src).render(  # noqa: E731
        [{"role": "user", "content": "x", "tags": ["a"]}], tools=TOOLS, **kw)
    assert render("{% set ns = namespace(ids=[]) %}{% set _ = ns.ids.append(1) %}{% set _ = ns.ids.append(2) %}"
                  "{{ ns.ids.pop(0) }}{{ ns.ids }}") == "1[2]"
    assert render("{% set d = {} %}{% set _ = d.update({'k': 1}) %}{{ d }}") == "{'k': 1}"
    assert render("{% set l = messages | list %}{% set _ = l.pop() %}{{ l | length }}{{ messages | length }}") == "01"
    for src, kw in [("{{ messages.append(1) }}", {}), ("{{ messages[0].update({'role': 'x'}) }}", {}),
                    ("{{ messages[0]['tags'].pop() }}", {}), ("{{ tools.clear() }}", {}),
                    ("{{ opts.setdefault('a', 1) }}", {"opts": {"b": [1]}}),
                    ("{{ opts['b'].append(2) }}", {"opts": {"b": [1]}}),
                    ("{{ messages.__class__.__mro__ }}", {}), ("{{ ''.__class__.__subclasses__() }}", {})]:
        with pytest.raises(ChatTemplateError, match="unsafe|Security"):
            render(src, **kw)
