"""GGUF tokenizer metadata (`tokenizer.ggml.*` and the chat template): written from a checkpoint directory, and read
back into a tokenizer for the `deepseek-v3` pre-tokenizer (Kimi's `kimi-k2` is read by k2local.tokenizer).

Both follow llama.cpp's converter: a "gpt2" vocabulary of GPT-2 byte-level strings, token types (NORMAL, CONTROL for
special or special-looking added tokens, USER_DEFINED for other added tokens, UNUSED `[PAD{i}]` for embedding rows
past the tokenizer), merges, bos/eos/pad/unk ids, add_bos, and the checkpoint's chat template.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGUFValueType, Keys

from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from quant.gguf_file import MetaValue, arr, boolv, strv, u32

if TYPE_CHECKING:
    from k2local.hf_tokenizer import HFTokenizer

__all__ = ["hf_gguf_vocab", "tokenizer_from_metadata", "tokenizer_metadata"]

# gguf.TokenType values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_metadata(src_dir: Path, cfg: ModelConfig) -> dict[str, MetaValue]:
    """tokenizer.ggml.* and the chat template from a checkpoint: Kimi's tiktoken.model (pre `kimi-k2`) or a
    DeepSeek-V3 tokenizer.json (pre `deepseek-v3`)."""
    from k2local.hf_tokenizer import HFTokenizer  # noqa: PLC0415
    from k2local.tokenizer import TokenizerError, gguf_vocab, load_tokenizer  # noqa: PLC0415

    try:
        tok = load_tokenizer(src_dir)
        if isinstance(tok, HFTokenizer):
            tokens, types, merges, pre = hf_gguf_vocab(tok, cfg.vocab_size)
            add_bos, add_eos = tok.add_bos_token, tok.add_eos_token
        else:
            tokens, types, merges = gguf_vocab(tok)
            pre, add_bos, add_eos = "kimi-k2", False, None  # Tokenizer always uses Kimi's regex, never adds BOS
    except TokenizerError as e:
        raise CheckpointError(f"{src_dir}: tokenizer: {e}") from None
    if len(tokens) < cfg.vocab_size:  # embedding rows beyond the tokenizer: unused padding ids
        types += [_UNUSED] * (cfg.vocab_size - len(tokens))
        tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    elif len(tokens) > cfg.vocab_size:
        raise CheckpointError(f"{src_dir}: tokenizer has {len(tokens)} tokens but vocab_size is {cfg.vocab_size}")
    md: dict[str, MetaValue] = {
        Keys.Tokenizer.MODEL: strv("gpt2"),
        Keys.Tokenizer.PRE: strv(pre),
        Keys.Tokenizer.LIST: arr(tokens, GGUFValueType.STRING),
        Keys.Tokenizer.TOKEN_TYPE: arr(types, GGUFValueType.INT32),
        Keys.Tokenizer.MERGES: arr(merges, GGUFValueType.STRING),
        Keys.Tokenizer.ADD_BOS: boolv(add_bos),
    }
    if add_eos is not None:
        md[Keys.Tokenizer.ADD_EOS] = boolv(add_eos)
    ids = {Keys.Tokenizer.BOS_ID: tok.bos_id, Keys.Tokenizer.EOS_ID: tok.eos_id, Keys.Tokenizer.PAD_ID: tok.pad_id,
           Keys.Tokenizer.UNK_ID: tok.unk_id}
    for key, v in ids.items():
        if v is not None:
            md[key] = u32(v)
    md.update(_template_metadata(src_dir))
    return md


def _template_metadata(src_dir: Path) -> dict[str, MetaValue]:
    from k2local.chat_template import ChatTemplate, ChatTemplateError  # noqa: PLC0415

    try:
        tmpl = ChatTemplate.from_dir(src_dir)
    except ChatTemplateError:
        return {}
    md = {Keys.Tokenizer.CHAT_TEMPLATE: strv(tmpl.source)}
    if tmpl.tool_use_source:
        md[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="tool_use")] = strv(tmpl.tool_use_source)
        md[Keys.Tokenizer.CHAT_TEMPLATES] = arr(["tool_use"], GGUFValueType.STRING)
    return md


# ---------------------------------------------------------------------------------------------- tokenizer.json

def _looks_special(token: str) -> bool:
    """llama.cpp's converter types these added tokens CONTROL even when not marked special."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>")) or \
        (token.startswith("<｜") and token.endswith("｜>"))


def hf_gguf_vocab(tok: HFTokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str], str]:
    """(tokens, token types, merges, pre) for GGUF from a byte-level BPE tokenizer.json, as llama.cpp converts it.

    Raises TokenizerError when the tokenizer is not one llama.cpp's ``deepseek-v3`` pre-tokenizer reproduces.
    """
    from k2local.hf_tokenizer import pre_tokenizer_name  # noqa: PLC0415
    from k2local.tokenizer import TokenizerError  # noqa: PLC0415

    spec = json.loads(tok.backend.to_str())
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None or spec.get("normalizer") is not None:
        raise TokenizerError(f"{tok.name}: pre-tokenizer / normalizer are not DeepSeek-V3's; k2local writes GGUF "
                             "vocabularies for Kimi K2 (tiktoken.model) and DeepSeek-V3 (tokenizer.json) only")
    if tok.vocab_size > n_vocab:
        raise TokenizerError(f"{tok.name}: tokenizer has {tok.vocab_size} ids but the model's vocab_size is {n_vocab}")
    added = tok.backend.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i >= tok.vocab_size or tok.is_unused(i):
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        text = tok.id_to_token(i)
        if i in added:
            if added[i].special or _looks_special(text):
                types.append(_CONTROL)
            else:
                text = text.replace("▁", " ")  # llama.cpp expects user-defined tokens pre-normalized
                types.append(_USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(_NORMAL)
    merges: list[str] = []
    for m in spec["model"].get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise TokenizerError(f"{tok.name}: merge {m!r} is not a pair of byte-level tokens")
        merges.append(f"{pair[0]} {pair[1]}")
    return tokens, types, merges, pre


def tokenizer_from_metadata(meta: dict[str, Any], where: str) -> HFTokenizer:
    """Rebuild a ``deepseek-v3`` GGUF vocabulary (tokens, types, merges, bos/eos/pad/unk, add_bos) as a
    ``tokenizers`` BPE with DeepSeek-V3's pre-tokenizer, so it tokenizes as the original tokenizer.json did."""
    import tokenizers  # noqa: PLC0415
    from tokenizers import AddedToken, decoders, models, processors  # noqa: PLC0415

    from k2local.hf_tokenizer import HFTokenizer, deepseek_v3_pre_tokenizer  # noqa: PLC0415
    from k2local.tokenizer import TokenizerError  # noqa: PLC0415

    tokens = list(meta.get(Keys.Tokenizer.LIST) or [])
    types = [int(t) for t in meta.get(Keys.Tokenizer.TOKEN_TYPE) or []]
    if not tokens or len(tokens) != len(types):
        raise CheckpointError(f"{where}: tokenizer metadata: {len(tokens)} tokens but {len(types)} token types")
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == _UNUSED:
            continue
        if typ not in (_NORMAL, _CONTROL, _USER_DEFINED, _UNKNOWN):
            raise CheckpointError(f"{where}: tokenizer metadata: token {i} {tok!r} has type {typ}, unexpected in a "
                                  "deepseek-v3 vocabulary")
        if tok in vocab:
            raise CheckpointError(f"{where}: tokenizer metadata: token {tok!r} appears twice (ids {vocab[tok]}, {i})")
        vocab[tok] = i
        if typ != _NORMAL:
            added.append(AddedToken(tok, special=typ != _USER_DEFINED, normalized=False))
    merges = []
    for m in meta.get(Keys.Tokenizer.MERGES) or []:
        pair = tuple(m.split(" "))
        if len(pair) != 2:
            raise CheckpointError(f"{where}: tokenizer metadata: bad merge {m!r}")
        merges.append(pair)
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # the library rejects merges whose parts are not in the vocabulary
        raise CheckpointError(f"{where}: tokenizer metadata: {e}") from None
    backend.pre_tokenizer = deepseek_v3_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])

    def name(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) and types[int(i)] != _UNUSED else None

    bos = name(Keys.Tokenizer.BOS_ID)
    add_bos = bool(meta.get(Keys.Tokenizer.ADD_BOS, False))
    if add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, vocab[bos])])
    stops = [int(meta[k]) for k in (Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID) if meta.get(k) is not None]
    try:
        tok = HFTokenizer(backend, bos_token=bos, eos_token=name(Keys.Tokenizer.EOS_ID),
                          pad_token=name(Keys.Tokenizer.PAD_ID), unk_token=name(Keys.Tokenizer.UNK_ID),
                          stop_ids=stops, vocab_size=len(tokens), add_bos_token=add_bos, name=where)
    except TokenizerError as e:
        raise CheckpointError(f"{where}: tokenizer metadata: {e}") from None
    tok.add_eos_token = bool(meta.get(Keys.Tokenizer.ADD_EOS, False))
    return tok
