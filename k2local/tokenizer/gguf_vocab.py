"""GGUF tokenizer metadata (`tokenizer.ggml.*` and the chat template): written from a checkpoint directory, and read
back into a tokenizer and chat template (:func:`tokenizer_and_template_from_gguf`, what a GGUF checkpoint hands the
engine).

Both follow llama.cpp's converter: a "gpt2" vocabulary of GPT-2 byte-level strings, token types (NORMAL, CONTROL for
special or special-looking added tokens, USER_DEFINED for other added tokens, UNUSED `[PAD{i}]` for embedding rows
past the tokenizer), merges, bos/eos/pad/unk ids, add_bos, and the checkpoint's chat template. Pre-tokenizer
`kimi-k2` is read back as Kimi's tiktoken :class:`~k2local.tokenizer.tiktoken_bpe.Tokenizer`, `deepseek-v3` as a `tokenizers` BPE
with DeepSeek-V3's pre-tokenizer (:class:`~k2local.tokenizer.hf.HFTokenizer`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFValueType, Keys
from tokenizers import AddedToken, decoders, models, processors

from k2local.chat.template import KIMI_K2_TEMPLATE, ChatTemplate, ChatTemplateError
from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from k2local.tokenizer.hf import HFTokenizer, deepseek_v3_pre_tokenizer, pre_tokenizer_name
from k2local.tokenizer.tiktoken_bpe import Tokenizer, gguf_vocab, load_tokenizer, ranks_from_gguf_tokens
from k2local.tokenizer.common import (
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_USER_DEFINED,
    TextTokenizer,
    TokenizerError,
)
from quant.gguf_file import MetaValue, arr, boolv, strv, u32

__all__ = ["KNOWN_TEMPLATES", "deepseek_tokenizer_from_metadata", "hf_gguf_vocab", "kimi_tokenizer_from_metadata",
           "tokenizer_and_template_from_gguf", "tokenizer_metadata"]

log = logging.getLogger("k2local")

KNOWN_TEMPLATES: dict[str, tuple[str, str]] = {"kimi-k2": (KIMI_K2_TEMPLATE, "k2local built-in Kimi K2 template")}
"""Pre-tokenizer -> (chat template, its origin) that k2local ships for that model family: what a GGUF without
``tokenizer.chat_template`` gets. Kimi K2 only: k2local has no DeepSeek-V3 template of its own (the tiny test
checkpoint's DeepSeek-style template is not DeepSeek-V3's), so such a GGUF must carry its template."""


def tokenizer_metadata(src_dir: Path, cfg: ModelConfig) -> dict[str, MetaValue]:
    """tokenizer.ggml.* and the chat template from a checkpoint: Kimi's tiktoken.model (pre `kimi-k2`) or a
    DeepSeek-V3 tokenizer.json (pre `deepseek-v3`)."""
    try:
        tok = load_tokenizer(src_dir)
        if isinstance(tok, HFTokenizer):
            tokens, types, merges, pre = hf_gguf_vocab(tok, cfg.vocab_size)
            add_bos, add_eos = tok.add_bos_token, tok.add_eos_token
        else:
            tokens, types, merges = gguf_vocab(tok)
            pre, add_bos, add_eos = "kimi-k2", False, None  # Tokenizer always uses Kimi's regex, never adds BOS
    except TokenizerError as e:
        msg = str(e)  # most already name the file: do not say the directory twice
        raise CheckpointError(msg if msg.startswith(str(src_dir)) else f"{src_dir}: tokenizer: {msg}") from None
    if len(tokens) < cfg.vocab_size:  # embedding rows beyond the tokenizer: unused padding ids
        types += [TOKEN_TYPE_UNUSED] * (cfg.vocab_size - len(tokens))
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
            types.append(TOKEN_TYPE_UNUSED)
            continue
        text = tok.id_to_token(i)
        if i in added:
            if added[i].special or _looks_special(text):
                types.append(TOKEN_TYPE_CONTROL)
            else:
                text = text.replace("▁", " ")  # llama.cpp expects user-defined tokens pre-normalized
                types.append(TOKEN_TYPE_USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(TOKEN_TYPE_NORMAL)
    merges: list[str] = []
    for m in spec["model"].get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else list(m)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise TokenizerError(f"{tok.name}: merge {m!r} is not a pair of byte-level tokens")
        merges.append(f"{pair[0]} {pair[1]}")
    return tokens, types, merges, pre


# ---------------------------------------------------------------------------------------------- reading a GGUF back

def tokenizer_and_template_from_gguf(meta: Mapping[str, Any], where: str) -> tuple[TextTokenizer, ChatTemplate]:
    """(tokenizer, ChatTemplate) from a GGUF's ``tokenizer.ggml.*`` and ``tokenizer.chat_template``: a tiktoken
    :class:`Tokenizer` for pre `kimi-k2` (or none given), a `tokenizers`-backed :class:`HFTokenizer` for pre
    `deepseek-v3`. ``where`` (the file) prefixes every error.

    Without ``tokenizer.chat_template`` the template k2local ships for the family is used (:data:`KNOWN_TEMPLATES`,
    with a warning); a family k2local has no template for is a CheckpointError saying so.
    """
    model, pre = meta.get(Keys.Tokenizer.MODEL), meta.get(Keys.Tokenizer.PRE)
    if model != "gpt2" or meta.get(Keys.Tokenizer.LIST) is None or meta.get(Keys.Tokenizer.TOKEN_TYPE) is None:
        raise CheckpointError(f"{where}: no gpt2-style tokenizer in the metadata (tokenizer.ggml.model = {model!r})")
    if pre == "deepseek-v3":
        tok: TextTokenizer = deepseek_tokenizer_from_metadata(meta, where)
    elif pre in ("kimi-k2", None):
        pre = "kimi-k2"
        tok = kimi_tokenizer_from_metadata(meta, where)
    else:
        raise CheckpointError(f"{where}: tokenizer pre-tokenizer {pre!r} is not supported (k2local implements "
                              "'kimi-k2' (Kimi K2, Moonlight) and 'deepseek-v3')")
    return tok, _chat_template(meta, where, pre, tok)


def _chat_template(meta: Mapping[str, Any], where: str, pre: str, tok: TextTokenizer) -> ChatTemplate:
    """The GGUF's own chat template, else the one k2local ships for pre-tokenizer ``pre``'s family."""
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
    src = meta.get(Keys.Tokenizer.CHAT_TEMPLATE)
    tool_use = meta.get(Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="tool_use"))
    if src:
        origin = f"{where} tokenizer.chat_template"
    elif pre in KNOWN_TEMPLATES:
        src, origin = KNOWN_TEMPLATES[pre]
        log.warning("%s has no tokenizer.chat_template; using the %s", where, origin)
    else:
        raise CheckpointError(
            f"{where}: the GGUF has no chat template (tokenizer.chat_template), and k2local ships none for its "
            f"model family (pre-tokenizer {pre!r}; k2local ships Kimi K2's only). Convert it again from a checkpoint "
            "whose tokenizer_config.json or chat_template.jinja has the model's template, or write the template "
            "into the GGUF's tokenizer.chat_template.")
    return ChatTemplate(src, bos_token=bos, eos_token=eos, tool_use_source=tool_use, origin=origin)


def kimi_tokenizer_from_metadata(meta: Mapping[str, Any], where: str) -> Tokenizer:
    """Rebuild a ``kimi-k2`` GGUF vocabulary (tokens, types, bos/eos/pad/unk ids) as Kimi's tiktoken tokenizer."""
    tokens, types = meta.get(Keys.Tokenizer.LIST), meta.get(Keys.Tokenizer.TOKEN_TYPE)
    try:
        ranks, specials = ranks_from_gguf_tokens(list(tokens or []), [int(x) for x in types or []])
        id_name = {i: s for s, i in specials.items()}

        def name_of(key: str) -> str | None:
            i = meta.get(key)
            return id_name.get(int(i)) if i is not None else None

        return Tokenizer.from_ranks(ranks, specials, bos_token=name_of(Keys.Tokenizer.BOS_ID),
                                    eos_token=name_of(Keys.Tokenizer.EOS_ID), pad_token=name_of(Keys.Tokenizer.PAD_ID),
                                    unk_token=name_of(Keys.Tokenizer.UNK_ID), vocab_size=len(tokens or []))
    except TokenizerError as e:
        raise CheckpointError(f"{where}: tokenizer metadata: {e}") from None


def deepseek_tokenizer_from_metadata(meta: Mapping[str, Any], where: str) -> HFTokenizer:
    """Rebuild a ``deepseek-v3`` GGUF vocabulary (tokens, types, merges, bos/eos/pad/unk, add_bos) as a
    ``tokenizers`` BPE with DeepSeek-V3's pre-tokenizer, so it tokenizes as the original tokenizer.json did."""
    tokens = list(meta.get(Keys.Tokenizer.LIST) or [])
    types = [int(t) for t in meta.get(Keys.Tokenizer.TOKEN_TYPE) or []]
    if not tokens or len(tokens) != len(types):
        raise CheckpointError(f"{where}: tokenizer metadata: {len(tokens)} tokens but {len(types)} token types")
    vocab: dict[str, int] = {}
    added: list[AddedToken] = []
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == TOKEN_TYPE_UNUSED:
            continue
        if typ not in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN):
            raise CheckpointError(f"{where}: tokenizer metadata: token {i} {tok!r} has type {typ}, unexpected in a "
                                  "deepseek-v3 vocabulary")
        if tok in vocab:
            raise CheckpointError(f"{where}: tokenizer metadata: token {tok!r} appears twice (ids {vocab[tok]}, {i})")
        vocab[tok] = i
        if typ != TOKEN_TYPE_NORMAL:
            added.append(AddedToken(tok, special=typ != TOKEN_TYPE_USER_DEFINED, normalized=False))
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
        ok = i is not None and 0 <= int(i) < len(tokens) and types[int(i)] != TOKEN_TYPE_UNUSED
        return tokens[int(i)] if ok else None

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
