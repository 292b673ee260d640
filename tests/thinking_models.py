"""A thinking model for tests: the tiny checkpoint with a thinking chat template."""
from __future__ import annotations

from pathlib import Path

from k2local.tiny import default_tiny_path

# K2.5-style: earlier turns' reasoning_content rendered in <think>...</think>, the generation prompt opens <think>
# unless `thinking` is false; `mood` shows that any template kwarg arrives.
K25_TEMPLATE = r"""{%- for m in messages -%}
{%- if m['role'] == 'assistant' -%}
<|im_assistant|>assistant<|im_middle|>
{%- if m.get('reasoning_content') -%}<think>{{ m['reasoning_content'] }}</think>{%- else -%}<think></think>{%- endif -%}
{{- m['content'] or '' -}}
{%- if m.get('tool_calls') -%}<|tool_calls_section_begin|>
{%- for tc in m['tool_calls'] -%}<|tool_call_begin|>{{ tc['id'] }}<|tool_call_argument_begin|>
{{- tc['function']['arguments'] }}<|tool_call_end|>{%- endfor -%}<|tool_calls_section_end|>
{%- endif -%}<|im_end|>
{%- elif m['role'] == 'tool' -%}
<|im_system|>tool<|im_middle|>## Return of {{ m['tool_call_id'] }}
{{ m['content'] }}<|im_end|>
{%- else -%}
<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>
{%- endif -%}
{%- endfor -%}
{%- if mood is defined -%}[mood={{ mood }}]{%- endif -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>
{%- if thinking is defined and not thinking -%}<think></think>{%- else -%}<think>{%- endif -%}
{%- endif -%}"""


def thinking_checkpoint(dst: Path, template: str = K25_TEMPLATE) -> Path:
    """The tiny checkpoint's files linked into dst, with `template` as its chat template."""
    src = default_tiny_path()
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "chat_template.jinja":
            (dst / f.name).symlink_to(f)
    (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
    return dst
