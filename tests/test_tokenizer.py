"""Tokenizer: real Kimi K2 test vectors, special tokens, streaming decode, GGUF vocab, tiny tokenizer, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from k2local.chat.template import KIMI_K2_TEMPLATE
from k2local.tiny.tokenizer import write_tiny_tokenizer
from k2local.tokenizer.tiktoken_bpe import (
    KIMI_SPECIAL_OFFSETS,
    MAX_NO_WHITESPACES_CHARS,
    Tokenizer,
    TokenizerError,
    _split_long_runs,
    bytes_to_gpt2,
    gguf_vocab,
    gpt2_to_bytes,
    ranks_from_gguf_tokens,
)


def _kimi_dir() -> Path | None:
    env = os.environ.get("K2_SHARED")
    candidates = [Path(env), Path(env) / "kimi_k2"] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "kimi_k2")
    return next((c for c in candidates if (c / "tiktoken.model").is_file()), None)


KIMI_DIR = _kimi_dir()
needs_kimi = pytest.mark.skipif(KIMI_DIR is None, reason="Kimi K2 tokenizer files (../shared/kimi_k2) not present")


@pytest.fixture(scope="module")
def kimi() -> Tokenizer:
    assert KIMI_DIR is not None
    return Tokenizer.from_dir(KIMI_DIR)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_dir)


# -- real Kimi K2 tokenizer (FACTS §3.6) ----------------------------------------------------------------------

KIMI_VECTORS = [
    ("Hello, world! 你好，世界！", [19180, 11, 2695, 0, 220, 33845, 378, 2243, 856]),
    (
        "<|im_middle|>Hello, world! 你好，世界！<|im_end|>",
        [163601, 19180, 11, 2695, 0, 220, 33845, 378, 2243, 856, 163586],
    ),
    (
        "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
        "<|im_user|>user<|im_middle|>What's 2+2?<|im_end|><|im_assistant|>assistant<|im_middle|>",
        [163594, 14062, 163601, 3900, 554, 24980, 72, 11, 519, 22572, 26626, 5232, 673, 30218, 10065, 22572, 13,
         163586, 163587, 2482, 163601, 58434, 220, 17, 10, 17, 30, 163586, 163588, 69702, 163601],
    ),
    (
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
        '{"city": "Beijing"}<|tool_call_end|><|tool_calls_section_end|>',
        [163595, 163597, 41937, 1150, 21055, 2800, 25, 15, 163598, 8264, 37666, 1289, 414, 4396, 39556, 16934,
         163599, 163596],
    ),
    ("The quick brown fox jumps over the lazy dog.", [1008, 5072, 16331, 69275, 60062, 1312, 276, 29292, 7751, 13]),
    ("12345 678", [6694, 2899, 220, 22523]),
]


@needs_kimi
@pytest.mark.parametrize("text,ids", KIMI_VECTORS)
def test_kimi_vectors(kimi: Tokenizer, text: str, ids: list[int]) -> None:
    assert kimi.encode(text) == ids
    assert kimi.decode(ids) == text


@needs_kimi
def test_kimi_vocab_and_specials(kimi: Tokenizer) -> None:
    assert (kimi.n_base, kimi.vocab_size, len(kimi)) == (163584, 163840, 163840)
    ids = (kimi.bos_id, kimi.eos_id, kimi.im_end_id, kimi.pad_id, kimi.unk_id)
    assert ids == (163584, 163585, 163586, 163839, 163838)
    assert kimi.stop_ids == {163586, 163585, 163593}
    for name, (offset, _) in KIMI_SPECIAL_OFFSETS.items():
        assert kimi.token_to_id(name) == 163584 + offset
        assert kimi.id_to_token(163584 + offset) == name
    assert kimi.id_to_token(163589) == "<|reserved_token_163589|>"
    assert kimi.special_ids == frozenset(range(163584, 163840))
    assert kimi.token_to_id("Ġthe") == kimi.token_to_id(" the") == kimi.encode(" the")[0]
    assert kimi.id_to_token(kimi.encode(" the")[0]) == "Ġthe"
    assert kimi.token_to_id("definitely-not-a-token-xyz") is None
    assert kimi.token_bytes(163586) == b"<|im_end|>"


@needs_kimi
def test_kimi_special_handling(kimi: Tokenizer) -> None:
    text = "<|im_user|>user<|im_middle|>hi<|im_end|>"
    assert kimi.encode(text)[0] == 163587
    plain = kimi.encode(text, allow_special=False)
    assert not set(plain) & kimi.special_ids
    assert kimi.decode(plain) == text
    # HF-style skip keeps the tool markers (special=false in Kimi's config) and drops control tokens.
    ids = kimi.encode("<|im_middle|>a<|tool_call_begin|>b<|im_end|>")
    assert kimi.decode(ids, skip_special_tokens=True) == "a<|tool_call_begin|>b"


@needs_kimi
def test_kimi_stream_decoder_chinese(kimi: Tokenizer) -> None:
    text = "你好，世界！鿿𝄞😀 naïve 𠀀𠀁 日本語"
    ids = kimi.encode(text)
    assert any("\ufffd" in kimi.decode([i]) for i in ids), "want a token that splits a UTF-8 character"
    dec = kimi.stream_decoder()
    pieces = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@needs_kimi
def test_kimi_gguf_vocab(kimi: Tokenizer) -> None:
    tokens, types, merges = gguf_vocab(kimi)
    assert len(tokens) == len(types) == 163840
    assert len(merges) == 163584 - 256  # every multi-byte Kimi token has a two-part merge
    assert merges[0] == "Ġ Ġ"
    assert tokens[163586] == "<|im_end|>" and types[163586] == 3
    assert tokens[163600] == "<|reserved_token_163600|>" and types[163600] == 3
    assert set(types[:163584]) == {1}
    ranks, specials = ranks_from_gguf_tokens(tokens, types)
    assert ranks == kimi.ranks
    assert specials == kimi.special_tokens
    rebuilt = Tokenizer.from_ranks(ranks, specials)
    assert rebuilt.stop_ids == kimi.stop_ids and rebuilt.skip_ids == kimi.skip_ids
    for text, ids in KIMI_VECTORS:
        assert rebuilt.encode(text) == ids


# -- behaviour on the tiny tokenizer -----------------------------------------------------------------------------------


def test_tiny_tokenizer_files(tiny_dir: Path, tmp_path: Path) -> None:
    n_base = write_tiny_tokenizer(tmp_path)
    for name in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes()  # deterministic
    assert 512 <= n_base <= 2048
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == KIMI_K2_TEMPLATE == (tmp_path / "chat_template.jinja").read_text()
    assert cfg["tokenizer_class"] == "TikTokenTokenizer"
    names = (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"])
    assert names == ("[BOS]", "[EOS]", "[PAD]", "[UNK]")
    assert cfg["added_tokens_decoder"][str(n_base + 11)]["content"] == "<|tool_calls_section_begin|>"
    assert cfg["added_tokens_decoder"][str(n_base + 11)]["special"] is False
    lines = (tmp_path / "tiktoken.model").read_text().splitlines()
    assert len(lines) == n_base and lines[0] == "AA== 0" and lines[-1].endswith(f" {n_base - 1}")


@needs_kimi
def test_tiny_specials_match_kimi_offsets(tiny: Tokenizer) -> None:
    real = json.loads((KIMI_DIR / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    for key, entry in real.items():
        assert tiny.token_to_id(entry["content"]) == tiny.n_base + int(key) - 163584
        assert (tiny.token_to_id(entry["content"]) in tiny.skip_ids) == entry["special"]


def test_tiny_roundtrip_and_common_words(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == tiny.n_base + 256
    assert tiny.stop_ids == {tiny.n_base + 2, tiny.n_base + 1, tiny.n_base + 9}
    for word in ("Hello", " the", " weather", " assistant", "user", "system", " Beijing", " function"):
        assert len(tiny.encode(word)) == 1, word
    text = "<|im_system|>system<|im_middle|>Hi 你好 ñ 😀\n\n  x<|im_end|><|im_assistant|>assistant<|im_middle|>"
    ids = tiny.encode(text)
    assert ids[0] == tiny.token_to_id("<|im_system|>") and ids[-1] == tiny.token_to_id("<|im_middle|>")
    assert tiny.decode(ids) == text
    assert tiny.id_to_token(tiny.n_base + 100) == f"<|reserved_token_{tiny.n_base + 100}|>"


def test_stream_decoder_multibyte(tiny: Tokenizer) -> None:
    text = "中文测试：你好，世界！Hello 😀 done"
    ids = tiny.encode(text)
    dec = tiny.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some ids only carried part of a character
    dec.feed(tiny.encode("你")[:1])  # dangling bytes at end of stream become U+FFFD
    assert dec.flush() == "\ufffd"


def test_long_input_is_split_like_kimi(tiny: Tokenizer) -> None:
    def reference(s: str, limit: int) -> list[str]:  # Kimi's per-character rule
        out, start, run, is_space = [], 0, 0, s[0].isspace() if s else False
        for i, ch in enumerate(s):
            if ch.isspace() != is_space:
                run, is_space = 1, ch.isspace()
            else:
                run += 1
                if run > limit:
                    out.append(s[start:i])
                    start, run = i, 1
        return out + [s[start:]]

    for s in ["", "abc", "aaaaaaa", "  \n\n\n\t   xx", "a" * 7 + " " * 9 + "b" * 3, "xy" * 9 + "\u3000" * 8]:
        assert list(_split_long_runs(s, 3)) == reference(s, 3)
    long = "a" * (2 * MAX_NO_WHITESPACES_CHARS + 10) + " end"
    pieces = list(_split_long_runs(long))
    assert [len(p) for p in pieces] == [MAX_NO_WHITESPACES_CHARS, MAX_NO_WHITESPACES_CHARS, 14]
    assert tiny.encode(long) == [i for p in pieces for i in tiny.encode(p)]
    assert tiny.decode(tiny.encode(long)) == long


def test_gguf_vocab_tiny(tiny: Tokenizer) -> None:
    tokens, types, merges = gguf_vocab(tiny)
    assert len(tokens) == len(types) == tiny.vocab_size
    assert types[: tiny.n_base] == [1] * tiny.n_base and set(types[tiny.n_base :]) == {3}
    assert len(merges) == tiny.n_base - 256
    ranks, specials = ranks_from_gguf_tokens(tokens, types)
    rebuilt = Tokenizer.from_ranks(ranks, specials)
    text = "<|im_user|>user<|im_middle|>What's the weather in Beijing? 你好<|im_end|>"
    assert rebuilt.encode(text) == tiny.encode(text)
    # Unused ids become [PAD{i}]; ranks_from_gguf_tokens skips them and from_ranks fills them as reserved.
    specials = {"[BOS]": tiny.n_base, "[EOS]": tiny.n_base + 5}
    gapped = Tokenizer.from_ranks(tiny.ranks, specials, vocab_size=tiny.n_base + 8)
    g_tokens, g_types, _ = gguf_vocab(gapped)
    assert g_tokens[tiny.n_base + 5] == "[EOS]" and g_types[tiny.n_base + 1] == 3


def test_token_type_values_match_gguf() -> None:
    gguf = pytest.importorskip("gguf")
    from k2local.tokenizer import tiktoken_bpe as t

    assert (t.TOKEN_TYPE_NORMAL, t.TOKEN_TYPE_CONTROL, t.TOKEN_TYPE_UNUSED) == (
        gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNUSED)


def test_gguf_merges_drive_a_gpt2_bpe(tiny: Tokenizer) -> None:
    """The exported merges reproduce tiktoken's tokenization in an independent BPE (HF tokenizers)."""
    hf = pytest.importorskip("tokenizers")
    from k2local.tokenizer.tiktoken_bpe import KIMI_PAT_STR

    tokens, types, merges = gguf_vocab(tiny)
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}
    bpe = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = hf.pre_tokenizers.Sequence([
        hf.pre_tokenizers.Split(hf.Regex(KIMI_PAT_STR), behavior="isolated"),
        hf.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    texts = ["Hello, world! The weather in Beijing is sunny.", "def add(a, b):\n    return a + b\n", "你好 ñ 😀"]
    for text in texts:
        assert bpe.encode(text).ids == tiny.encode(text, allow_special=False)


def test_gpt2_byte_mapping() -> None:
    all_bytes = bytes(range(256))
    assert gpt2_to_bytes(bytes_to_gpt2(all_bytes)) == all_bytes
    assert bytes_to_gpt2(b" the\n") == "ĠtheĊ"
    assert len(set(bytes_to_gpt2(all_bytes))) == 256
    with pytest.raises(TokenizerError):
        gpt2_to_bytes("a b")  # a raw space is not in the GPT-2 alphabet


# -- errors ------------------------------------------------------------------------------------------------------------


def test_missing_ranks_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tiktoken.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_malformed_ranks_file(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "tokenizer_config.json", tmp_path)
    lines = (tiny_dir / "tiktoken.model").read_text().splitlines()
    bad = {
        "not base64": lines[:5] + ["@@@notbase64 5"] + lines[6:],
        "no rank": lines[:5] + ["BQ=="] + lines[6:],
        "gap": lines[:-2] + [lines[-1].split()[0] + " 99999"],
        "missing byte": lines[1:],
    }
    for what, content in bad.items():
        (tmp_path / "tiktoken.model").write_text("\n".join(content) + "\n")
        with pytest.raises(TokenizerError, match="tiktoken.model") as e:
            Tokenizer.from_dir(tmp_path)
        assert isinstance(e.value, ValueError), what


def test_bad_config(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "tiktoken.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"x": {"content": "a"}}}))
    with pytest.raises(TokenizerError, match="added_tokens_decoder"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()  # no config: Kimi's special-token table is assumed
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.im_end_id == tok.n_base + 2 and tok.eos_id == tok.n_base + 1


def test_bad_ids(tiny: Tokenizer) -> None:
    for bad in (-1, tiny.vocab_size, 10**9):
        with pytest.raises(TokenizerError):
            tiny.decode([bad])


def test_from_dir_picks_tiktoken_then_tokenizer_json(tiny_dir: Path, tmp_path: Path) -> None:
    from k2local.tokenizer.hf import HFTokenizer
    from k2local.tiny.tokenizer import write_tiny_deepseek_tokenizer
    from k2local.tokenizer.tiktoken_bpe import load_tokenizer

    write_tiny_deepseek_tokenizer(tmp_path)
    assert isinstance(Tokenizer.from_dir(tmp_path), HFTokenizer)  # tokenizer.json only (DeepSeek-V3)
    shutil.copy(tiny_dir / "tiktoken.model", tmp_path)
    shutil.copy(tiny_dir / "tokenizer_config.json", tmp_path)
    both = load_tokenizer(tmp_path)
    assert type(both) is Tokenizer and both.encode("[EOS]") == [both.n_base + 1]  # tiktoken.model wins
    for name in ("tiktoken.model", "tokenizer.json"):
        (tmp_path / name).unlink()
    with pytest.raises(TokenizerError, match=f"{tmp_path}: no tokenizer found.*tiktoken.model.*tokenizer.json"):
        load_tokenizer(tmp_path)


def test_gguf_metadata_without_chat_template(tiny_k2: Path, tiny_ds: Path) -> None:
    """A GGUF's own template wins; without one Kimi K2 gets k2local's Kimi template, DeepSeek-V3 a clear error (the
    tiny checkpoint's DeepSeek-style template is test data, not DeepSeek-V3's)."""
    from k2local.chat.template import ChatTemplate
    from k2local.weights.hf_checkpoint import open_checkpoint
    from k2local.errors import CheckpointError
    from k2local.tokenizer.gguf_vocab import tokenizer_and_template_from_gguf, tokenizer_metadata

    msgs = [{"role": "user", "content": "hi"}]
    for src, kimi in ((tiny_k2, True), (tiny_ds, False)):
        meta = {k: v.value for k, v in tokenizer_metadata(src, open_checkpoint(src).config).items()}
        tok, tmpl = tokenizer_and_template_from_gguf(meta, "x.gguf")
        assert tmpl.origin == "x.gguf tokenizer.chat_template"
        assert tmpl.render(msgs) == ChatTemplate.from_dir(src).render(msgs)
        del meta["tokenizer.chat_template"]
        if kimi:
            tok, tmpl = tokenizer_and_template_from_gguf(meta, "x.gguf")
            assert tmpl.source == KIMI_K2_TEMPLATE and tmpl.origin == "k2local built-in Kimi K2 template"
            assert tmpl.render(msgs) == ChatTemplate.from_dir(src).render(msgs)
        else:
            with pytest.raises(CheckpointError, match="x.gguf: the GGUF has no chat template"):
                tokenizer_and_template_from_gguf(meta, "x.gguf")
