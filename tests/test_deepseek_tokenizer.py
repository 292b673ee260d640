"""DeepSeek-V3 style checkpoints (tokenizer.json, no tiktoken.model): tokenizer vs transformers, chat template vs
jinja2, stopping on EOS, and our GGUF's vocabulary vs the checkpoint and vs llama.cpp."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from k2local.chat.template import ChatTemplate
from k2local.weights.hf_checkpoint import open_checkpoint
from k2local.errors import CheckpointError
from k2local.tokenizer.hf import HFTokenizer, pre_tokenizer_name
from k2local.tiny.tokenizer import DEEPSEEK_ADDED, DEEPSEEK_TINY_TEMPLATE, write_tiny_deepseek_tokenizer
from k2local.tokenizer.tiktoken_bpe import TokenizerError, load_tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
STRINGS = [
    "Hello, world! The weather in Beijing is sunny.",
    "1234567 and 3.14159, 42nd, 1,000,000",
    "你好，世界！こんにちは、カタカナ。한국어",
    "emoji 😀🦙👍🏽 and ✅",
    "   leading spaces\n\n\n  trailing   \t\t \n",
    "a\r\nb\rc",
    "I've been 'told' he's THERE, 'RE you sure?",
    "ÀÉ ñ café naïve Ελληνικά русский",
    "def f(x):\n    return x**2  # ok",
    f"{BOS}sys<｜User｜>hi<｜Assistant｜><think>hmm</think>Hello!{EOS}",
    ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n{\"city\": \"Paris\"}"
     "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "<｜User｜ half a token <｜fim▁hole｜x<|EOT|>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What's the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "Sunny, 25C"},
    {"role": "tool", "content": "Humidity 40%"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def tok(tiny_ds: Path) -> HFTokenizer:
    t = load_tokenizer(tiny_ds)
    assert isinstance(t, HFTokenizer)
    return t


@pytest.fixture(scope="module")
def ds_engine(tiny_ds: Path):
    from k2local.engine import Engine, LoadOptions

    return Engine.load(tiny_ds, LoadOptions(device="cpu", max_context=128))


@pytest.fixture(scope="module")
def ds_gguf(tiny_ds: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from k2local.convert.to_gguf import convert

    return convert(tiny_ds, tmp_path_factory.mktemp("ds-gguf") / "tiny-ds-f32.gguf", "f32").paths[0]


# ---------------------------------------------------------------------------------------------- checkpoint layout
def test_tiny_deepseek_layout(tiny_ds: Path, tok: HFTokenizer, tmp_path: Path) -> None:
    names = {p.name for p in tiny_ds.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= names
    assert "tiktoken.model" not in names and "chat_template.jinja" not in names
    spec = json.loads((tiny_ds / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) >= 700
    assert pre_tokenizer_name(spec["pre_tokenizer"]) == "deepseek-v3" and spec["decoder"]["type"] == "ByteLevel"
    assert spec["model"]["vocab"]["!"] == 3 and spec["model"]["vocab"]["Ġ"] == 223  # DeepSeek-V3's byte ids
    cfg = json.loads((tiny_ds / "config.json").read_text())
    gen = json.loads((tiny_ds / "generation_config.json").read_text())
    tcfg = json.loads((tiny_ds / "tokenizer_config.json").read_text(encoding="utf-8"))
    n_tokens = len(spec["model"]["vocab"]) + len(DEEPSEEK_ADDED)
    assert cfg["model_type"] == "deepseek_v3" and cfg["vocab_size"] > n_tokens  # padded, as DeepSeek-V3's 129280
    assert (cfg["bos_token_id"], cfg["eos_token_id"], gen["eos_token_id"]) == (0, 1, 1)
    assert tcfg["bos_token"]["content"] == BOS and tcfg["eos_token"]["content"] == EOS
    assert tcfg["add_bos_token"] is True and tcfg["chat_template"] == DEEPSEEK_TINY_TEMPLATE
    assert tok.vocab_size == cfg["vocab_size"] and tok.is_unused(n_tokens) and not tok.is_unused(n_tokens - 1)
    write_tiny_deepseek_tokenizer(tmp_path)  # deterministic
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_ds / name).read_bytes()


# ------------------------------------------------------------------------------------------------------ tokenizer
def test_round_trip_and_special_tokens(tok: HFTokenizer) -> None:
    for s in STRINGS:
        ids = tok.encode(s)
        assert tok.decode(ids) == s and tok.decode_bytes(ids) == s.encode()
        plain = tok.encode(s, allow_special=False)
        assert tok.decode(plain) == s
        assert not set(plain) & tok.skip_ids  # special text stays text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (0, 1, 1, frozenset({1}))
    assert tok.add_bos_token and not tok.add_eos_token
    for name, special in DEEPSEEK_ADDED:
        i = tok.token_to_id(name)
        assert tok.encode(name) == [i] and tok.is_special(i) and (i in tok.skip_ids) == special
        assert tok.id_to_token(i) == name and tok.token_bytes(i) == name.encode()
    ids = tok.encode(STRINGS[9])
    assert ids[0] == 0 and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "syshi<think>hmm</think>Hello!"  # <think> is not special
    assert tok.token_to_id(" world") == tok.token_to_id("Ġworld") == tok.encode(" world")[0]
    pad = tok.vocab_size - 1
    assert tok.decode([pad]) == "" and tok.id_to_token(pad) == f"[PAD{pad}]"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError):
        tok.decode([-1])


def test_stream_decoder_multibyte(tok: HFTokenizer) -> None:
    text = "中文测试：你好，世界！Hello 😀 done<｜end▁of▁sentence｜>"
    ids = tok.encode(text)
    dec = tok.stream_decoder(skip_special_tokens=True)
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text.replace(EOS, "") and "" in pieces and not any("\ufffd" in p for p in pieces)


def test_stream_decoder_keeps_chosen_special_tokens(tok: HFTokenizer) -> None:
    """Skipping special tokens except those kept: DeepSeek-V3's tool-call markers are special, and the server's
    tool-call parser must see them while EOS is still dropped."""
    text = "<｜tool▁calls▁begin｜>x<｜tool▁calls▁end｜>" + EOS
    ids = tok.encode(text)
    marker = tok.token_to_id("<｜tool▁calls▁begin｜>")
    assert marker in tok.skip_ids and tok.eos_id in tok.skip_ids
    end = tok.token_to_id("<｜tool▁calls▁end｜>")
    dec = tok.stream_decoder(skip_special_tokens=True, keep={marker, end})
    assert "".join([dec.feed(i) for i in ids] + [dec.flush()]) == text.replace(EOS, "")
    plain = tok.stream_decoder(skip_special_tokens=True)
    assert "".join([plain.feed(i) for i in ids] + [plain.flush()]) == "x"


def test_ids_equal_transformers(tiny_ds: Path, tok: HFTokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tiny_ds))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_ds / "tokenizer.json"))
    assert len(auto) == len(fast) == tok.vocab_size - sum(tok.is_unused(i) for i in range(tok.vocab_size))
    assert auto.eos_token_id == tok.eos_id and auto.bos_token_id == tok.bos_id
    for s in STRINGS:
        ids = tok.encode(s)
        assert auto.encode(s, add_special_tokens=False) == fast.encode(s, add_special_tokens=False) == ids, s
        assert auto.encode(s) == [tok.bos_id] + ids  # DeepSeek-V3's tokenizer adds BOS; our encode leaves it out
        for skip in (False, True):
            assert auto.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


# -------------------------------------------------------------------------------------------------- chat template
def test_chat_template_matches_plain_jinja2_and_transformers(tiny_ds: Path, tok: HFTokenizer) -> None:
    jinja2 = pytest.importorskip("jinja2")
    tmpl = ChatTemplate.from_dir(tiny_ds)
    ours = tmpl.render(MESSAGES, add_generation_prompt=True)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    plain = env.from_string(DEEPSEEK_TINY_TEMPLATE).render(messages=MESSAGES, bos_token=BOS, eos_token=EOS,
                                                            add_generation_prompt=True, tools=None)
    assert ours == plain
    assert ours == (f"{BOS}You are helpful.<｜User｜>What's the weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜>"
                    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n{\"city\": \"Paris\"}<｜tool▁call▁end｜>"
                    f"<｜tool▁calls▁end｜>{EOS}<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>Sunny, 25C"
                    "<｜tool▁output▁end｜><｜tool▁output▁begin｜>Humidity 40%<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
                    f"<｜Assistant｜>It is sunny.{EOS}<｜User｜>Thanks!<｜Assistant｜>")
    ids = tok.encode(ours)
    assert ids[0] == tok.bos_id and ids[-1] == tok.token_to_id("<｜Assistant｜>")
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tiny_ds))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <now>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for kw in ({}, {"tools": tools}):
        want = auto.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, **kw)
        assert tmpl.render(MESSAGES, add_generation_prompt=True, **kw) == want


# ------------------------------------------------------------------------------------------------------ generation
def test_generation_stops_on_eos(ds_engine, monkeypatch: pytest.MonkeyPatch) -> None:
    from k2local.cli.chat_session import ChatSession
    from k2local.sampler import SamplingParams

    eng = ds_engine
    tok = eng.tokenizer
    assert isinstance(tok, HFTokenizer) and eng.stop_ids == {tok.eos_id}
    hello, world = tok.encode("Hello")[0], tok.encode(" world")[0]
    # The whole chat path: the sampler picks EOS (forced by the logits) and the session ends the turn there.
    forward_batch, calls = eng.model.forward_batch, []

    def scripted(seqs):  # the generator's one forward (continuous batching: a step of one sequence here)
        (out,) = [o.clone() for o in forward_batch(seqs)]
        out[..., (hello, world, tok.eos_id)[min(len(calls), 2)]] += 1e4
        calls.append(len(seqs[0].ids))
        return [out]

    monkeypatch.setattr(eng.model, "forward_batch", scripted)
    chat = ChatSession(eng, SamplingParams(temperature=0.0, max_tokens=20))
    turn = chat.ask("Say hello")
    assert turn.text == "Hello world" and turn.finish_reason == "stop"
    assert turn.result.tokens == [hello, world, tok.eos_id] and len(calls) == 3


# ------------------------------------------------------------------------------------------------------------ GGUF
def test_gguf_metadata_like_llama_cpp_converter(ds_gguf: Path, tiny_ds: Path, tok: HFTokenizer) -> None:
    m = open_checkpoint(ds_gguf).meta
    spec = json.loads((tiny_ds / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", "deepseek-v3")
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.vocab_size == m["deepseek2.vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())  # GPT-2 byte-level strings, as tokenizer.json has them
    special = {a["id"]: a["special"] for a in spec["added_tokens"]}
    for i, typ in enumerate(types):
        want = 5 if i >= len(vocab) else (1 if i not in special else (3 if special[i] else 4))
        assert typ == want, (i, tokens[i])
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]"
    assert m["tokenizer.ggml.merges"] == [" ".join(p) for p in spec["model"]["merges"]]
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert m["tokenizer.ggml.padding_token_id"] == 1 and "tokenizer.ggml.unknown_token_id" not in m
    assert m["tokenizer.ggml.add_bos_token"] is True and m["tokenizer.ggml.add_eos_token"] is False
    assert m["tokenizer.chat_template"] == DEEPSEEK_TINY_TEMPLATE


def test_gguf_tokenizer_round_trip(ds_gguf: Path, tiny_ds: Path, tok: HFTokenizer) -> None:
    src = open_checkpoint(ds_gguf)
    assert src.config.model_type == "deepseek_v3"
    g_tok, g_tmpl = src.tokenizer_and_template()
    assert isinstance(g_tok, HFTokenizer)
    for s in STRINGS:
        for allow in (True, False):
            assert g_tok.encode(s, allow_special=allow) == tok.encode(s, allow_special=allow), (s, allow)
        ids = tok.encode(s)
        for skip in (False, True):
            assert g_tok.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)
    assert (g_tok.vocab_size, g_tok.stop_ids, g_tok.bos_id, g_tok.eos_id, g_tok.pad_id, g_tok.add_bos_token) == \
        (tok.vocab_size, tok.stop_ids, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos_token)
    assert g_tok.skip_ids == tok.skip_ids
    ref = ChatTemplate.from_dir(tiny_ds)
    assert g_tmpl.render(MESSAGES) == ref.render(MESSAGES)


def test_llama_cpp_tokenizes_our_gguf_identically(ds_gguf: Path, tok: HFTokenizer) -> None:
    pytest.importorskip("llama_cpp")
    from tests.peers import llama_cpp as llama

    detok = [ids if not set(ids) & tok.special_ids else None for ids in map(tok.encode, STRINGS)]
    got, eos, bos = llama.isolated("tokenize", str(ds_gguf), STRINGS, detok)
    for s, g, d in zip(STRINGS, got, detok):
        ids = tok.encode(s)
        assert g.special == ids, s
        # special=False: CONTROL tokens are text, USER_DEFINED (<think>) still match, as allow_special=False
        assert g.plain == tok.encode(s, allow_special=False), s
        assert g.with_bos[:1] == [tok.bos_id]  # add_bos_token
        if d is not None:
            assert g.detokenized == s.encode()
    assert eos == tok.eos_id and bos == tok.bos_id


def test_engine_from_gguf_builds_the_same_prompt(ds_gguf: Path, ds_engine) -> None:
    from k2local.engine import Engine, LoadOptions

    a, b = Engine.load(ds_gguf, LoadOptions(device="cpu", max_context=128)), ds_engine
    assert a.chat_ids(MESSAGES) == b.chat_ids(MESSAGES) and a.stop_ids == b.stop_ids == {1}
    ids = a.chat_ids(MESSAGES[1:2])
    la, lb = a.model.forward(ids, a.model.new_cache()), b.model.forward(ids, b.model.new_cache())
    assert (la - lb).abs().max().item() < 1e-2 * lb.abs().max().item() and torch.isfinite(la).all()


# ---------------------------------------------------------------------------------------------------------- errors
def _copy_tokenizer(src: Path, dst: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_bad_tokenizer_json_errors_name_the_file(tiny_ds: Path, tmp_path: Path) -> None:
    d = _copy_tokenizer(tiny_ds, tmp_path)
    tj = d / "tokenizer.json"
    good = json.loads(tj.read_text(encoding="utf-8"))
    (tj).write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON"):
        load_tokenizer(d)
    bad = dict(good, model={"type": "WordPiece", "vocab": {"a": 0}, "unk_token": "a"})
    tj.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: tokenizer model is 'WordPiece', not 'BPE'"):
        load_tokenizer(d)
    tj.write_text(json.dumps(dict(good, pre_tokenizer={"type": "Metaspace", "replacement": "▁"})), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a byte-level BPE \(its pre_tokenizer"):
        load_tokenizer(d)
    tj.write_text(json.dumps(dict(good, decoder={"type": "Fuse"})), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not a byte-level BPE \(its decoder"):
        load_tokenizer(d)
    broken = dict(good, model=dict(good["model"], merges=[["Ġ", "nope"]]))
    tj.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load"):
        load_tokenizer(d)
    tj.write_text(json.dumps(good), encoding="utf-8")
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    (d / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_token="<｜nope｜>")), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: eos_token '<｜nope｜>' is not a token"):
        load_tokenizer(d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer found \(looked for tiktoken\.model.*tokenizer\.json"):
        load_tokenizer(d)


def test_gguf_metadata_refuses_other_pre_tokenizers(tiny_ds: Path, tmp_path: Path) -> None:
    from k2local.config import ModelConfig
    from k2local.tokenizer.gguf_vocab import tokenizer_metadata

    d = _copy_tokenizer(tiny_ds, tmp_path)
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "\\p{N}"
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    cfg = ModelConfig.from_dict(json.loads((tiny_ds / "config.json").read_text()))
    with pytest.raises(CheckpointError, match="not DeepSeek-V3's"):
        tokenizer_metadata(d, cfg)


def test_completions_prompt_gets_bos_like_transformers(tiny_ds: Path, tok: HFTokenizer, tiny_k2: Path) -> None:
    """/v1/completions with a raw string: DeepSeek's tokenizer prepends BOS (as transformers does), Kimi's does not."""
    from types import SimpleNamespace

    import transformers

    from k2local.server.app import _completion_prompt

    auto = transformers.AutoTokenizer.from_pretrained(str(tiny_ds))
    _, ids = _completion_prompt(SimpleNamespace(tokenizer=tok), "Hello world")
    assert ids == auto("Hello world")["input_ids"] and ids[0] == tok.bos_id
    _, again = _completion_prompt(SimpleNamespace(tokenizer=tok), "<｜begin▁of▁sentence｜>Hello world")
    assert again == ids  # an explicit BOS is not doubled
    kimi = load_tokenizer(tiny_k2)
    _, kids = _completion_prompt(SimpleNamespace(tokenizer=kimi), "Hello world")
    assert kids == kimi.encode("Hello world")
