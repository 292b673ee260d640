"""Chat templates: k2local's Kimi K2 template (v3 semantics), the real 2025-07-15 template, loading rules, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jinja2
import pytest

from k2local.chat.template import KIMI_K2_TEMPLATE, ChatTemplate, ChatTemplateError


def _kimi_dir() -> Path | None:
    env = os.environ.get("K2_SHARED")
    candidates = [Path(env), Path(env) / "kimi_k2"] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "kimi_k2")
    return next((c for c in candidates if (c / "tokenizer_config.json").is_file()), None)


KIMI_DIR = _kimi_dir()
needs_kimi = pytest.mark.skipif(KIMI_DIR is None, reason="Kimi K2 tokenizer files (../shared/kimi_k2) not present")

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather information. Call this tool when the user needs to get weather information",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string", "description": "City name"}}},
    },
}]
WEATHER_CALL = {"id": "functions.get_weather:0", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}

# FACTS.md §3.3: the v3 example rendered from the HF chat_template.jinja.
V3_EXAMPLE = (
    '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather","description":"Get '
    'weather information. Call this tool when the user needs to get weather information","parameters":{"type":"obj'
    'ect","required":["city"],"properties":{"city":{"type":"string","description":"City name"}}}}}]<|im_end|>'
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "<|im_user|>user<|im_middle|>What's the weather like in Beijing today? Use the tool to check.<|im_end|>"
    "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
    '<|tool_call_argument_begin|>{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
    "<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
    '{"weather": "Sunny"}<|im_end|><|im_assistant|>assistant<|im_middle|>'
)


def v3_messages() -> list[dict]:
    return [
        {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
         "content": '{"weather": "Sunny"}'},
    ]


# -- k2local's template ------------------------------------------------------------------------------------------------


def test_kimi_template_reproduces_v3_example() -> None:
    assert ChatTemplate.from_string(KIMI_K2_TEMPLATE).render(v3_messages(), tools=TOOLS) == V3_EXAMPLE


def test_kimi_template_matches_transformers() -> None:
    """HF transformers' own renderer gives the same text (so the tiny checkpoint works with HF too)."""
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = utils.render_jinja_template([v3_messages()], tools=TOOLS, chat_template=KIMI_K2_TEMPLATE,
                                              add_generation_prompt=True)
    assert rendered[0] == V3_EXAMPLE


def test_kimi_template_details() -> None:
    t = ChatTemplate.from_string(KIMI_K2_TEMPLATE)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "name": "alice",
         "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"function": {"name": "a", "arguments": {"x": 1, "s": "é"}}},
            {"function": {"name": "b", "arguments": "{}"}},
        ]},
        {"role": "tool", "content": "r0"},
        {"role": "tool", "tool_call_id": "functions.b:1", "content": "r1"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "a", "arguments": "{}"}}]},
    ]
    out = t.render(msgs, add_generation_prompt=False)
    assert out == (
        "<|im_system|>system<|im_middle|>Be brief.<|im_end|>"
        "<|im_user|>alice<|im_middle|>Hi there<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>Checking.<|tool_calls_section_begin|>"
        '<|tool_call_begin|>functions.a:0<|tool_call_argument_begin|>{"x": 1, "s": "é"}<|tool_call_end|>'
        "<|tool_call_begin|>functions.b:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.a:0\nr0<|im_end|>"
        "<|im_system|>tool<|im_middle|>## Return of functions.b:1\nr1<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|>"
        "<|tool_call_begin|>functions.a:2<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|><|im_end|>"
    )
    assert t.render([]) == ("<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI."
                            "<|im_end|><|im_assistant|>assistant<|im_middle|>")


def test_non_text_content_is_rejected() -> None:
    t = ChatTemplate.from_string(KIMI_K2_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="image_url"):
        t.render([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ChatTemplateError, match="role"):
        t.render([{"content": "no role"}])


# -- the real Kimi K2 template (2025-07-15, in tokenizer_config.json) ----------------------------------------


def _conversation() -> list[dict]:
    return [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Weather in Beijing? 天气"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather",
         "content": '{"weather": "Sunny"}'},
    ]


@needs_kimi
def test_real_template_equals_direct_jinja_render() -> None:
    cfg = json.loads((KIMI_DIR / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, **kw: json.dumps(v, ensure_ascii=False, **kw)
    direct = env.from_string(cfg["chat_template"]).render(
        messages=_conversation(), tools=TOOLS, add_generation_prompt=True, bos_token="[BOS]", eos_token="[EOS]"
    )
    ours = ChatTemplate.from_dir(KIMI_DIR).render(_conversation(), tools=TOOLS)
    assert ours == direct
    # The 2025-07-15 quirks survive: JSON-encoded string arguments and a literal backslash-n in tool results.
    assert '<|tool_call_argument_begin|>"{\\"city\\": \\"Beijing\\"}"<|tool_call_end|>' in ours
    assert '## Return of functions.get_weather:0\\n{"weather": "Sunny"}' in ours
    assert ours.endswith("<|im_assistant|>assistant<|im_middle|>")


@needs_kimi
def test_chat_template_jinja_file_wins(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_bytes((KIMI_DIR / "tokenizer_config.json").read_bytes())
    from_config = ChatTemplate.from_dir(tmp_path).render(v3_messages(), tools=TOOLS)
    assert from_config != V3_EXAMPLE
    (tmp_path / "chat_template.jinja").write_text(KIMI_K2_TEMPLATE)
    assert ChatTemplate.from_dir(tmp_path).render(v3_messages(), tools=TOOLS) == V3_EXAMPLE


# -- loading rules and the environment ----------------------------------------------------------------------


def test_named_template_list(tmp_path: Path) -> None:
    cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": [
        {"name": "default", "template": "D{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"},
        {"name": "tool_use", "template": "T{{ tools | length }}"},
        {"name": "rag", "template": "R"},
    ]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [{"role": "user", "content": "x"}]
    assert ChatTemplate.from_dir(tmp_path).render(msgs) == "D<s>x</s>"
    assert ChatTemplate.from_dir(tmp_path).render(msgs, tools=TOOLS) == "T1"
    assert ChatTemplate.from_dir(tmp_path, name="rag").render(msgs, tools=TOOLS) == "R"
    with pytest.raises(ChatTemplateError, match="nope"):
        ChatTemplate.from_dir(tmp_path, name="nope")


def test_environment_filters_and_tags() -> None:
    src = ("{{ x | tojson }}|{{ x | tojson(indent=1) }}|{{ x | tojson(separators=(',', ':')) }}|"
           "{% generation %}g{% endgeneration %}{% for i in range(3) %}{% if i == 1 %}{% break %}{% endif %}{{ i }}"
           "{% endfor %}|{{ bos_token }}{{ extra }}")
    out = ChatTemplate.from_string(src, bos_token="<B>").render([], x={"a": "<é>", "b": [1]}, extra="!")
    assert out == '{"a": "<é>", "b": [1]}|{\n "a": "<é>",\n "b": [\n  1\n ]\n}|{"a":"<é>","b":[1]}|g0|<B>!'


def test_template_errors(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="line 2"):
        ChatTemplate.from_string("ok\n{% if %}")
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        ChatTemplate.from_string("{{ raise_exception('only user and assistant') }}").render([])
    with pytest.raises(ChatTemplateError, match="rendering failed|TypeError"):
        ChatTemplate.from_string("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "a"}])
    with pytest.raises(ChatTemplateError, match="unsafe|Security"):
        ChatTemplate.from_string("{{ messages.append(1) }}").render([])
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatTemplate.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{bad json")
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        ChatTemplate.from_dir(tmp_path)
    assert issubclass(ChatTemplateError, ValueError)
