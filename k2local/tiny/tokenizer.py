"""Small, deterministic tokenizers for the project's tiny test checkpoints.

``write_tiny_tokenizer(out_dir)`` (Kimi K2, Moonlight) learns byte-level BPE merges from a built-in English text (all
256 single bytes first, then merges by frequency), writes them as a tiktoken ranks file, and writes a
``tokenizer_config.json`` whose special tokens have Kimi K2's names at Kimi's offsets from ``n_base``, plus k2local's
Kimi chat template.

``write_tiny_deepseek_tokenizer(out_dir)`` (DeepSeek-V3) writes DeepSeek-V3's layout instead: a Hugging Face
``tokenizer.json`` (byte-level BPE vocab + merges learnt with DeepSeek-V3's pre-tokenizer, its added tokens) and a
``tokenizer_config.json`` with a short DeepSeek-V3-style chat template of k2local's own.
"""

from __future__ import annotations

import base64
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from k2local.chat.template import KIMI_K2_TEMPLATE
from k2local.tokenizer.hf import deepseek_v3_pre_tokenizer, deepseek_v3_pre_tokenizer_json
from k2local.tokenizer.tiktoken_bpe import KIMI_SPECIAL_OFFSETS
from k2local.tokenizer.common import bytes_to_gpt2

__all__ = ["DEEPSEEK_TINY_TEMPLATE", "TINY_N_BASE", "TinyVocab", "train_bpe", "write_tiny_deepseek_tokenizer",
           "write_tiny_tokenizer"]

TINY_N_BASE = 1024
"""Target number of base tokens (256 bytes + merges); vocab size is n_base + 256."""

# Pre-tokenizer for training only: an ASCII approximation of Kimi's pattern (the runtime uses Kimi's real one).
_PRETOKENIZE = re.compile(
    r"[^\r\nA-Za-z0-9]?[A-Za-z]+(?:'s|'t|'re|'ve|'m|'ll|'d)?|[0-9]{1,3}| ?[^\sA-Za-z0-9]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """\
system\nYou are a helpful assistant.\nuser\nHello! What is the weather like today?
assistant\nHello! Let me check the weather for you.\ntool\nThe weather is sunny.
system\nYou are Kimi.\nuser\nHello there!\nassistant\nHello! Sure, I can help.\ntool\nDone.
user\nThanks!\nassistant\nYou are welcome! Sure.\nuser\nYou are great.\nassistant\nThank you!
Hello! How are you today? I am fine, thank you. What can I do for you?
You are Kimi, an AI assistant created by Moonshot AI. You are a helpful assistant.
The user asks a question and the assistant answers it. The system message tells the assistant how to behave.
The quick brown fox jumps over the lazy dog. The dog was not amused, but the fox did not care at all.
What's the weather like in Beijing today? Use the tool to check. The weather in Beijing is sunny and warm.
What's the weather in Shanghai? It is cloudy in Shanghai, with a little rain in the evening.
Call the get_weather function with the city name. The function returns the weather for that city.
{"city": "Beijing"} {"city": "Shanghai"} {"weather": "Sunny"} {"weather": "Cloudy"} {"temperature": 25}
{"type": "function", "function": {"name": "get_weather", "description": "Get weather information",
"parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
Please write a short story about a small robot who wants to learn how to paint pictures of the sea.
Once upon a time there was a little robot. Every day it looked at the sea and wished it could paint.
One morning the robot found a box of old brushes and some paint. It started to paint the waves, the sky,
the boats and the birds. At first the pictures were not very good, but the robot kept trying.
After many days of work, the robot made a beautiful painting, and all the people in the town came to see it.
The end. Thank you for reading this story. I hope you liked it and that it made you smile.
Can you explain how a computer works? A computer has a processor, memory and storage. The processor runs
programs, which are lists of instructions. Memory holds the data that the programs are working with right now,
and storage keeps files when the power is off. People use computers to write, to talk, to learn and to play.
Python is a programming language. Here is a function: def add(a, b): return a + b. It adds two numbers.
for i in range(10): print(i) # This prints the numbers from 0 to 9, one number on each line.
import json; data = json.loads(text); print(data["name"]) # Read JSON text and print the name field.
Numbers: 1, 2, 3, 10, 42, 100, 2024, 12345. One plus one is two. Two times three is six. Ten minus four is six.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of China is Beijing.
Water boils at one hundred degrees Celsius. The sun is a star, and the earth moves around the sun once a year.
Good morning! Good evening! Good night! Have a nice day. See you later. Goodbye, and thanks for the help.
I think that this is a good idea. Let me think about it for a moment. Yes, I agree with you.
Sorry, I do not know the answer to that question. Could you tell me more about what you need?
Here is a list of things to do: buy milk, read a book, call a friend, clean the house, and go for a walk.
The model reads the prompt, predicts the next token, and repeats until it writes an end of turn token.
A language model is trained on a lot of text. It learns which words often come after other words.
Tools let the assistant do things in the world, like search the web, run code, or get the weather.
When the assistant wants to use a tool, it writes a tool call with the name of the tool and its arguments.
The result of the tool comes back in a new message, and then the assistant writes the final answer.
There are seven days in a week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.
There are four seasons: spring, summer, autumn and winter. In summer it is hot, and in winter it is cold.
Red, green, blue, yellow, black and white are colors. The sky is blue and the grass is green.
My name is Kimi. Your name is user. Their names are Alice and Bob. Where do you live? I live in a city.
This is a test. This is only a test. If this were a real answer, it would be much more useful.
"""


def train_bpe(text: str, n_merges: int) -> list[bytes]:
    """Learn up to ``n_merges`` new tokens by byte-level BPE over ``text``; ties break on the smallest pair.

    Returns the new tokens in rank order (deterministic). Stops early when no pair is left.
    """
    return _learn_bpe(_PRETOKENIZE.findall(text), n_merges)[0]


def _learn_bpe(pieces: list[str], n_merges: int) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """BPE over pre-tokenized ``pieces``: (up to ``n_merges`` new tokens, every merge applied, in order).

    A merge whose result is already a token (another pair made the same bytes) is listed but adds no token.
    """
    words = Counter(tuple(bytes([b]) for b in w.encode("utf-8")) for w in pieces)
    seqs = [list(w) for w in words]
    freqs = list(words.values())
    pairs: Counter[tuple[bytes, bytes]] = Counter()
    where: defaultdict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freqs[i]
            where[pair].add(i)
    known = {bytes([b]) for b in range(256)}
    new: list[bytes] = []
    merges: list[tuple[bytes, bytes]] = []
    while len(new) < n_merges:
        live = [(count, pair) for pair, count in pairs.items() if count > 0]
        if not live:
            break
        best_count = max(c for c, _ in live)
        a, b = min(p for c, p in live if c == best_count)
        merges.append((a, b))
        merged = a + b
        if merged not in known:
            known.add(merged)
            new.append(merged)
        for i in sorted(where.pop((a, b), ())):
            seq, f = seqs[i], freqs[i]
            for pair in zip(seq, seq[1:]):
                pairs[pair] -= f
            out: list[bytes] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for pair in zip(out, out[1:]):
                pairs[pair] += f
                where[pair].add(i)
        pairs.pop((a, b), None)
    return new, merges


def write_tiny_tokenizer(out_dir: Path) -> int:
    """Write ``tiktoken.model``, ``tokenizer_config.json`` and ``chat_template.jinja`` into ``out_dir``.

    Returns n_base (vocab size = n_base + 256). The output is deterministic.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + train_bpe(_CORPUS, TINY_N_BASE - 256)
    n_base = len(tokens)
    lines = [f"{base64.b64encode(t).decode('ascii')} {rank}\n" for rank, t in enumerate(tokens)]
    (out_dir / "tiktoken.model").write_text("".join(lines), encoding="ascii")

    added = {
        str(n_base + offset): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for name, (offset, special) in sorted(KIMI_SPECIAL_OFFSETS.items(), key=lambda kv: kv[1][0])
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": [
            "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
            "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>",
        ],
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "TikTokenTokenizer",
        "chat_template": KIMI_K2_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(KIMI_K2_TEMPLATE, encoding="utf-8")
    return n_base


# ----------------------------------------------------------------------------------------------------------------------
# DeepSeek-V3 layout (tokenizer.json)

DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
"""DeepSeek-V3's ids 0, 1, 2 (in the BPE vocabulary and added as special tokens)."""

DEEPSEEK_ADDED: tuple[tuple[str, bool], ...] = (
    ("<think>", False), ("</think>", False),  # R1-style reasoning markers: added but not special
    ("<｜fim▁hole｜>", True), ("<｜fim▁begin｜>", True), ("<｜fim▁end｜>", True),
    ("<｜User｜>", True), ("<｜Assistant｜>", True), ("<|EOT|>", True),
    ("<｜tool▁calls▁begin｜>", True), ("<｜tool▁calls▁end｜>", True),
    ("<｜tool▁call▁begin｜>", True), ("<｜tool▁call▁end｜>", True),
    ("<｜tool▁outputs▁begin｜>", True), ("<｜tool▁outputs▁end｜>", True),
    ("<｜tool▁output▁begin｜>", True), ("<｜tool▁output▁end｜>", True), ("<｜tool▁sep｜>", True),
)
"""Added tokens after the BPE vocabulary, in id order, with their HF ``special`` flag (DeepSeek-V3's names)."""

DEEPSEEK_TINY_TEMPLATE = r"""{#- k2local's tiny DeepSeek-V3-style chat template. -#}
{%- set ns = namespace(system='', outputs_open=false) -%}
{%- for m in messages if m['role'] == 'system' -%}
  {%- set ns.system = ns.system + (m['content'] or '') -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- if tools -%}
  {{- '\n\nTools you can call:' -}}
  {%- for t in tools -%}{{- '\n' + (t | tojson) -}}{%- endfor -%}
{%- endif -%}
{%- for m in messages if m['role'] != 'system' -%}
  {%- if ns.outputs_open and m['role'] != 'tool' -%}
    {{- '<｜tool▁outputs▁end｜>' -}}
    {%- set ns.outputs_open = false -%}
  {%- endif -%}
  {%- if m['role'] == 'user' -%}
    {{- '<｜User｜>' + (m['content'] or '') -}}
  {%- elif m['role'] == 'assistant' -%}
    {{- '<｜Assistant｜>' + (m['content'] or '') -}}
    {%- if m.get('tool_calls') -%}
      {{- '<｜tool▁calls▁begin｜>' -}}
      {%- for call in m['tool_calls'] -%}
        {%- set args = call['function']['arguments'] -%}
        {{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name'] + '\n' -}}
        {{- args if args is string else args | tojson -}}
        {{- '<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜>' -}}
    {%- endif -%}
    {{- eos_token -}}
  {%- elif m['role'] == 'tool' -%}
    {%- if not ns.outputs_open -%}
      {{- '<｜tool▁outputs▁begin｜>' -}}
      {%- set ns.outputs_open = true -%}
    {%- endif -%}
    {{- '<｜tool▁output▁begin｜>' + (m['content'] or '') + '<｜tool▁output▁end｜>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.outputs_open -%}
  {{- '<｜tool▁outputs▁end｜>' -}}
{%- endif -%}
{%- if add_generation_prompt -%}
  {{- '<｜Assistant｜>' -}}
{%- endif -%}
"""
"""k2local's own template in DeepSeek-V3's format: BOS and the system prompt, ``<｜User｜>`` / ``<｜Assistant｜>``
turns, each answer closed by EOS, tool calls and tool outputs in DeepSeek's tool tokens."""


class TinyVocab(NamedTuple):
    """What a tiny tokenizer writer reports: token count and the BOS / EOS ids."""

    size: int
    bos_id: int
    eos_id: int


def _added_entry(i: int, content: str, special: bool) -> dict[str, Any]:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def _config_token(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tiny_deepseek_tokenizer(out_dir: Path) -> TinyVocab:
    """Write DeepSeek-V3's tokenizer files (``tokenizer.json``, ``tokenizer_config.json``) into ``out_dir``.

    Layout as DeepSeek-V3: BOS / EOS / PAD at ids 0-2, the 256 byte tokens from id 3 in GPT-2 character order, the
    learnt merges' tokens, then the added tokens. Pre-tokenizer, BOS-adding post-processor and ByteLevel decoder as
    DeepSeek-V3's. Deterministic.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pieces = [_CORPUS[a:b] for _, (a, b) in deepseek_v3_pre_tokenizer().pre_tokenize_str(_CORPUS)]
    specials = [DEEPSEEK_BOS, DEEPSEEK_EOS, DEEPSEEK_PAD]
    new, merges = _learn_bpe(pieces, TINY_N_BASE - len(specials) - 256)
    byte_tokens = sorted(bytes_to_gpt2(bytes([b])) for b in range(256))
    vocab_list = specials + byte_tokens + [bytes_to_gpt2(t) for t in new]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    added = [_added_entry(i, t, True) for i, t in enumerate(specials)]
    added += [_added_entry(len(vocab) + k, t, special) for k, (t, special) in enumerate(DEEPSEEK_ADDED)]
    bos_ref = {"id": DEEPSEEK_BOS, "ids": [0], "tokens": [DEEPSEEK_BOS]}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": deepseek_v3_pre_tokenizer_json(),
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": DEEPSEEK_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": DEEPSEEK_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": DEEPSEEK_BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {DEEPSEEK_BOS: bos_ref},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [[bytes_to_gpt2(a), bytes_to_gpt2(b)] for a, b in merges],
        },
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _config_token(DEEPSEEK_BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": _config_token(DEEPSEEK_EOS),
        "legacy": True,
        "model_max_length": 131072,
        "pad_token": _config_token(DEEPSEEK_EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "chat_template": DEEPSEEK_TINY_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    return TinyVocab(len(vocab) + len(DEEPSEEK_ADDED), 0, 1)
