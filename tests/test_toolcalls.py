"""Kimi K2 and DeepSeek-V3 tool calls: batch parsing, streaming (any chunking gives the batch result), formatting."""

from __future__ import annotations

import random

import pytest

from k2local.chat.toolcalls import (
    DEEPSEEK,
    KIMI,
    ContentDelta,
    ToolCall,
    ToolCallArgsDelta,
    ToolCallStart,
    ToolCallStreamParser,
    ToolEvent,
    count_tool_calls,
    format_tool_calls,
    parse_tool_calls,
    tool_call_name,
    tool_dialect,
)

# FACTS.md §4: two parallel calls (the turn's <|im_end|> is a stop token, so it is not in the text).
PARALLEL = (
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Beijing"}<|tool_call_end|><|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>'
    '{"city": "Shanghai"}<|tool_call_end|><|tool_calls_section_end|>'
)
BEIJING = ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}')
SHANGHAI = ToolCall("functions.get_weather:1", "get_weather", '{"city": "Shanghai"}')

CASES: list[tuple[str, str | None, list[ToolCall]]] = [
    (PARALLEL, None, [BEIJING, SHANGHAI]),
    ("Let me check the weather.\n" + PARALLEL, "Let me check the weather.", [BEIJING, SHANGHAI]),
    ("Just text, no tools.\n\n", "Just text, no tools.\n\n", []),
    ("  leading space kept", "  leading space kept", []),
    ("", None, []),
    # Tolerance: whitespace and newlines around ids and arguments.
    (
        "<|tool_calls_section_begin|>\n<|tool_call_begin|> functions.get_weather:0 \n<|tool_call_argument_begin|>"
        '\n  {"city": "Beijing"}  \n<|tool_call_end|>\n<|tool_calls_section_end|>',
        None,
        [BEIJING],
    ),
    # Missing section end at EOS; missing final call end at EOS.
    (PARALLEL.removesuffix("<|tool_calls_section_end|>"), None, [BEIJING, SHANGHAI]),
    (PARALLEL.removesuffix("<|tool_call_end|><|tool_calls_section_end|>"), None, [BEIJING, SHANGHAI]),
    # Missing section begin, dotted names, ids without the functions. prefix or index.
    (
        "Sure.<|tool_call_begin|>functions.mcp.search:7<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_call_begin|>lookup<|tool_call_argument_begin|>[1]",
        "Sure.",
        [ToolCall("functions.mcp.search:7", "mcp.search", "{}"), ToolCall("lookup", "lookup", "[1]")],
    ),
    # A call with no argument marker is dropped; an unterminated one at EOS too.
    (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.broken:0<|tool_call_end|>"
        '<|tool_call_begin|>functions.ok:1<|tool_call_argument_begin|>{"a": "<|x|> <b>"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.cut:2",
        None,
        [ToolCall("functions.ok:1", "ok", '{"a": "<|x|> <b>"}')],
    ),
    # Text after the section is content too; a genuine "<|tool_ca" at the very end is text.
    ("A" + PARALLEL + "\nB <|tool_ca", "AB <|tool_ca", [BEIJING, SHANGHAI]),
    ("x < y and a<|b|>c", "x < y and a<|b|>c", []),
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text: str, content: str | None, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text) == (content, calls)


def _stream(pieces: list[str]) -> tuple[list[ToolEvent], ToolCallStreamParser]:
    parser = ToolCallStreamParser()
    events: list[ToolEvent] = []
    for p in pieces:
        events += parser.feed(p)
    events += parser.finish()
    return events, parser


def _replay(events: list[ToolEvent]) -> tuple[str | None, list[ToolCall]]:
    """Rebuild (content, calls) from events the way an OpenAI streaming client would."""
    content, starts, args = "", [], {}
    for e in events:
        if isinstance(e, ContentDelta):
            assert e.text
            content += e.text
        elif isinstance(e, ToolCallStart):
            assert e.index == len(starts)
            starts.append(e)
            args[e.index] = ""
        else:
            assert isinstance(e, ToolCallArgsDelta) and e.index == len(starts) - 1 and e.text
            args[e.index] += e.text
    return content or None, [ToolCall(s.id, s.name, args[s.index]) for s in starts]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_stream_one_char_equals_batch(text: str, content: str | None, calls: list[ToolCall]) -> None:
    events, parser = _stream(list(text))
    batch = parse_tool_calls(text)
    assert _replay(events) == batch == (parser.content, parser.tool_calls)


def _random_pieces(text: str, rng: random.Random, most: int = 30) -> list[str]:
    """text cut at 1..most random places (fewer for a short text)."""
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, most))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("seed", range(20))
def test_stream_random_chunks_equals_batch(seed: int) -> None:
    text = "Let me look that up. 我来查一下。\n" + PARALLEL
    events, parser = _stream(_random_pieces(text, random.Random(seed)))
    assert _replay(events) == parse_tool_calls(text) == ("Let me look that up. 我来查一下。", [BEIJING, SHANGHAI])


def test_stream_never_leaks_marker_text() -> None:
    events, _ = _stream(list("Hello" + PARALLEL))
    contents = [e.text for e in events if isinstance(e, ContentDelta)]
    assert "".join(contents) == "Hello"
    assert not any("<" in c or "|" in c for c in contents)
    first_start = next(i for i, e in enumerate(events) if isinstance(e, ToolCallStart))
    assert events[first_start] == ToolCallStart(0, "functions.get_weather:0", "get_weather")
    assert all(isinstance(e, ContentDelta) for e in events[:first_start])


def test_stream_emits_early() -> None:
    parser = ToolCallStreamParser()
    assert parser.feed("Hi there") == [ContentDelta("Hi there")]
    assert parser.feed(" <|tool_") == []  # whitespace and a possible marker are held back
    assert parser.feed("x|> ok") == [ContentDelta(" <|tool_x|> ok")]
    assert parser.feed("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0") == []
    assert parser.feed("<|tool_call_argument_begin|>{\"a\"") == [ToolCallStart(0, "functions.f:0", "f"),
                                                                 ToolCallArgsDelta(0, '{"a"')]
    assert parser.feed(": 1}") == [ToolCallArgsDelta(0, ": 1}")]
    assert parser.finish() == []
    assert parser.tool_calls == [ToolCall("functions.f:0", "f", '{"a": 1}')]
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_format_round_trip() -> None:
    assert format_tool_calls([BEIJING, SHANGHAI]) == PARALLEL
    assert parse_tool_calls(format_tool_calls([BEIJING, SHANGHAI])) == (None, [BEIJING, SHANGHAI])
    openai_style = [{"type": "function", "function": {"name": "f", "arguments": {"q": "é"}}},
                    {"id": "functions.g:9", "function": {"name": "g", "arguments": "{}"}}]
    text = format_tool_calls(openai_style, start_index=3)
    expected = [ToolCall("functions.f:3", "f", '{"q": "é"}'), ToolCall("functions.g:9", "g", "{}")]
    assert parse_tool_calls(text)[1] == expected
    assert BEIJING.to_openai() == {"id": "functions.get_weather:0", "type": "function",
                                   "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}


def test_helpers() -> None:
    assert tool_call_name("functions.get_weather:12") == "get_weather"
    assert tool_call_name(" get_weather ") == "get_weather"
    assert tool_call_name("functions.a.b:0") == "a.b"
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{}, {}]},
            {"role": "tool", "content": "r"}, {"role": "assistant", "content": "y", "tool_calls": None},
            {"role": "assistant", "tool_calls": [{}]}]
    assert count_tool_calls(msgs) == 3


# ------------------------------------------------------------------------------------------ DeepSeek-V3 dialect

DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL, DS_SEP, DS_CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"


def _ds_call(name: str, args: str, fence: bool = True) -> str:
    body = f"```json\n{args}\n```" if fence else args
    return f"{DS_CALL}function{DS_SEP}{name}\n{body}{DS_CALL_END}"


DS_PARALLEL = DS_BEGIN + _ds_call("get_weather", '{"city": "Beijing"}') + _ds_call(
    "get_weather", '{"city": "Shanghai"}') + DS_END

DS_CASES: list[tuple[str, str | None, list[ToolCall]]] = [
    (DS_PARALLEL, None, [BEIJING, SHANGHAI]),
    ("Let me check the weather.\n" + DS_PARALLEL, "Let me check the weather.", [BEIJING, SHANGHAI]),
    ("Plain text <｜tool▁ca", "Plain text <｜tool▁ca", []),
    ("Kimi markers are text here: <|tool_call_begin|>", "Kimi markers are text here: <|tool_call_begin|>", []),
    # k2local's tiny template writes bare JSON (no fence); whitespace around the pieces is tolerated.
    (DS_BEGIN + _ds_call("get_weather", '{"city": "Beijing"}', fence=False) + DS_END, None, [BEIJING]),
    ((f"{DS_BEGIN}\n{DS_CALL} function {DS_SEP} get_weather \n\n```json\n  {{\"city\": \"Beijing\"}} \n```\n"
      f"{DS_CALL_END}\n{DS_END}"), None, [BEIJING]),
    # Missing section end / final call end / closing fence at end of output.
    (DS_PARALLEL.removesuffix(DS_END), None, [BEIJING, SHANGHAI]),
    (DS_PARALLEL.removesuffix(DS_CALL_END + DS_END), None, [BEIJING, SHANGHAI]),
    (DS_PARALLEL.removesuffix("\n```" + DS_CALL_END + DS_END), None, [BEIJING, SHANGHAI]),
    # Malformed JSON is passed through as written (clients see the raw text, as with Kimi).
    (DS_BEGIN + _ds_call("f", '{"a": 1,,') + DS_END, None, [ToolCall("functions.f:0", "f", '{"a": 1,,')]),
    # A call without a separator or a name is dropped; a name without arguments gets {}; backticks inside JSON.
    (f"{DS_BEGIN}{DS_CALL}function get_weather{DS_CALL_END}{DS_CALL}function{DS_SEP}\n{DS_CALL_END}"
     f"{DS_CALL}function{DS_SEP}get_time{DS_CALL_END}" + _ds_call("run", '{"code": "```x```"}') + DS_END + "\nDone.",
     "Done.", [ToolCall("functions.get_time:0", "get_time", "{}"),
               ToolCall("functions.run:1", "run", '{"code": "```x```"}')]),
]


def _stream_ds(pieces: list[str]) -> tuple[list[ToolEvent], ToolCallStreamParser]:
    parser = ToolCallStreamParser(DEEPSEEK)
    events: list[ToolEvent] = []
    for p in pieces:
        events += parser.feed(p)
    events += parser.finish()
    return events, parser


@pytest.mark.parametrize("text,content,calls", DS_CASES)
def test_deepseek_parse_and_stream_by_char(text: str, content: str | None, calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text, DEEPSEEK) == (content, calls)
    events, parser = _stream_ds(list(text))
    assert _replay(events) == (content, calls) == (parser.content, parser.tool_calls)


@pytest.mark.parametrize("seed", range(20))
def test_deepseek_stream_random_chunks(seed: int) -> None:
    rng = random.Random(seed)
    text = "Let me look that up. 我来查一下。\n" + DS_PARALLEL
    events, _ = _stream_ds(_random_pieces(text, rng))
    expected = ("Let me look that up. 我来查一下。", [BEIJING, SHANGHAI])
    assert _replay(events) == parse_tool_calls(text, DEEPSEEK) == expected
    for case_text, content, calls in DS_CASES:  # every case, in random chunks
        assert _replay(_stream_ds(_random_pieces(case_text, rng, 20))[0]) == (content, calls)


def test_deepseek_stream_never_leaks_markers_or_fences() -> None:
    events, _ = _stream_ds(list("Hello" + DS_PARALLEL))
    contents = [e.text for e in events if isinstance(e, ContentDelta)]
    assert contents and "".join(contents) == "Hello" and not any("<" in c or "｜" in c for c in contents)
    args = [e.text for e in events if isinstance(e, ToolCallArgsDelta)]
    assert not any("`" in a or "json" in a or "｜" in a for a in args)
    assert [e for e in events if isinstance(e, ToolCallStart)] == [
        ToolCallStart(0, "functions.get_weather:0", "get_weather"), ToolCallStart(1, "functions.get_weather:1",
                                                                                  "get_weather")]


def test_deepseek_ids_and_format_round_trip() -> None:
    _, calls = parse_tool_calls(DS_PARALLEL, DEEPSEEK, id_base=3)
    assert [c.id for c in calls] == ["functions.get_weather:3", "functions.get_weather:4"]
    assert format_tool_calls([BEIJING, SHANGHAI], dialect=DEEPSEEK) == DS_PARALLEL
    assert parse_tool_calls(format_tool_calls([{"function": {"name": "f", "arguments": {"q": "é"}}}],
                                              dialect=DEEPSEEK), DEEPSEEK) == (
        None, [ToolCall("functions.f:0", "f", '{"q": "é"}')])
    # forced-choice prefixes end where the model continues
    assert DEEPSEEK.forced_prefix("f") == f"{DS_BEGIN}{DS_CALL}function{DS_SEP}f\n```json\n"
    assert DEEPSEEK.forced_prefix(None) == f"{DS_BEGIN}{DS_CALL}function{DS_SEP}"
    p = ToolCallStreamParser(DEEPSEEK)
    p.feed(DEEPSEEK.forced_prefix("f") + '{"x": 1}\n```' + DS_CALL_END)
    p.finish()
    assert p.tool_calls == [ToolCall("functions.f:0", "f", '{"x": 1}')]
    assert KIMI.forced_prefix("f", "functions.f:2") == (
        "<|tool_calls_section_begin|><|tool_call_begin|>functions.f:2<|tool_call_argument_begin|>")


def test_dialect_picked_from_tokenizer(tiny_k2, tiny_ds) -> None:
    from k2local.tokenizer.tiktoken_bpe import load_tokenizer

    assert tool_dialect(load_tokenizer(tiny_ds)) is DEEPSEEK
    assert tool_dialect(load_tokenizer(tiny_k2)) is KIMI
    assert tool_dialect(None, "deepseek_v3") is DEEPSEEK and tool_dialect() is KIMI
