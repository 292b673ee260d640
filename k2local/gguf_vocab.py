"""GGUF tokenizer metadata (`tokenizer.ggml.*` and the chat template) written from a checkpoint directory."""
from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType, Keys

from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from quant.gguf_file import MetaValue, arr, boolv, strv, u32


def tokenizer_metadata(src_dir: Path, cfg: ModelConfig) -> dict[str, MetaValue]:
    """tokenizer.ggml.* (gpt2 vocabulary with merges, pre `kimi-k2`) and the chat template, from a Kimi checkpoint."""
    from k2local.chat_template import ChatTemplate, ChatTemplateError  # noqa: PLC0415
    from k2local.tokenizer import Tokenizer, TokenizerError, gguf_vocab  # noqa: PLC0415

    try:
        tok = Tokenizer.from_dir(src_dir)
    except TokenizerError as e:
        raise CheckpointError(f"{src_dir}: tokenizer: {e}") from None
    tokens, types, merges = gguf_vocab(tok)
    if len(tokens) < cfg.vocab_size:  # embedding rows beyond the tokenizer: unused padding ids
        types += [5] * (cfg.vocab_size - len(tokens))
        tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    elif len(tokens) > cfg.vocab_size:
        raise CheckpointError(f"{src_dir}: tokenizer has {len(tokens)} tokens but vocab_size is {cfg.vocab_size}")
    md: dict[str, MetaValue] = {
        Keys.Tokenizer.MODEL: strv("gpt2"),
        Keys.Tokenizer.PRE: strv("kimi-k2"),  # Tokenizer.from_dir always uses Kimi's pre-tokenizer regex
        Keys.Tokenizer.LIST: arr(tokens, GGUFValueType.STRING),
        Keys.Tokenizer.TOKEN_TYPE: arr(types, GGUFValueType.INT32),
        Keys.Tokenizer.MERGES: arr(merges, GGUFValueType.STRING),
        Keys.Tokenizer.ADD_BOS: boolv(False),  # Kimi's tokenizer never adds BOS
    }
    ids = {Keys.Tokenizer.BOS_ID: tok.bos_id, Keys.Tokenizer.EOS_ID: tok.eos_id, Keys.Tokenizer.PAD_ID: tok.pad_id,
           Keys.Tokenizer.UNK_ID: tok.unk_id}
    for key, v in ids.items():
        if v is not None:
            md[key] = u32(v)
    try:
        tmpl = ChatTemplate.from_dir(src_dir)
    except ChatTemplateError:
        tmpl = None
    if tmpl is not None:
        md[Keys.Tokenizer.CHAT_TEMPLATE] = strv(tmpl.source)
        if tmpl.tool_use_source:
            md[Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="tool_use")] = strv(tmpl.tool_use_source)
            md[Keys.Tokenizer.CHAT_TEMPLATES] = arr(["tool_use"], GGUFValueType.STRING)
    return md
