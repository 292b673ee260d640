"""Hugging Face ``tokenizer.json`` tokenizers (DeepSeek-V3 family: byte-level BPE) run by the ``tokenizers`` library.

:class:`HFTokenizer` has the public interface of :class:`k2local.tokenizer.tiktoken_bpe.Tokenizer` (encode / decode / streaming
decode / special tokens / bos, eos, stop ids: :class:`k2local.tokenizer.common.TextTokenizer`), so the generator,
chat session, server and chat template code use either. Encoding and decoding are the library's; k2local only keeps
a per-id byte table (what the ByteLevel decoder turns each token into) so that text can be streamed without splitting
UTF-8 characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import models, pre_tokenizers

from k2local.tokenizer.common import (
    StreamDecoder,
    TokenizerError,
    bytes_to_gpt2,
    read_config,
    read_json,
    token_name,
    unicode_to_byte,
)

__all__ = ["DEEPSEEK_V3_SPLITS", "HFTokenizer", "deepseek_v3_pre_tokenizer", "deepseek_v3_pre_tokenizer_json",
           "pre_tokenizer_name"]

DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    ("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
     "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
)
"""DeepSeek-V3's pre-tokenizer: these regexes, each a Split(behavior=Isolated) in turn, then ByteLevel without its own
regex (llama.cpp's pre-tokenizer ``deepseek-v3`` uses the same three)."""


def deepseek_v3_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """DeepSeek-V3's pre-tokenizer as a ``tokenizers`` object."""
    splits = [pre_tokenizers.Split(tokenizers.Regex(p), behavior="isolated", invert=False) for p in DEEPSEEK_V3_SPLITS]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                       use_regex=False)])


def deepseek_v3_pre_tokenizer_json() -> dict[str, Any]:
    """DeepSeek-V3's pre-tokenizer as it appears in ``tokenizer.json`` (the library's serialization)."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = deepseek_v3_pre_tokenizer()
    return json.loads(tk.to_str())["pre_tokenizer"]


def _regex(split: dict[str, Any]) -> str | None:
    pattern = split.get("pattern") or {}
    value = pattern.get("Regex") if isinstance(pattern, dict) else None
    return value.replace("\\r", "\r").replace("\\n", "\n") if isinstance(value, str) else None


def pre_tokenizer_name(spec: dict[str, Any] | None) -> str | None:
    """GGUF ``tokenizer.ggml.pre`` name of a serialized pre-tokenizer (``"deepseek-v3"``), or None if unknown."""
    if not isinstance(spec, dict) or spec.get("type") != "Sequence":
        return None
    parts = spec.get("pretokenizers") or []
    if len(parts) != len(DEEPSEEK_V3_SPLITS) + 1:
        return None
    *splits, last = parts
    ok = all(s.get("type") == "Split" and s.get("behavior") == "Isolated" and not s.get("invert")
             and _regex(s) == p for s, p in zip(splits, DEEPSEEK_V3_SPLITS))
    byte_level = last.get("type") == "ByteLevel" and not last.get("add_prefix_space") and not last.get("use_regex")
    return "deepseek-v3" if ok and byte_level else None


def _has_byte_level(spec: Any) -> bool:
    if not isinstance(spec, dict):
        return False
    if spec.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(p) for p in spec.get("pretokenizers") or spec.get("decoders") or [])


def _token_bytes(token: str) -> bytes:
    """What the ByteLevel decoder makes of one token: GPT-2 byte chars -> bytes, any other token as UTF-8."""
    table = unicode_to_byte()
    try:
        return bytes(table[ch] for ch in token)
    except KeyError:
        return token.encode("utf-8")


def _ids(value: Any) -> list[int]:
    """A config's ``eos_token_id``: an int, a list of ints, or absent."""
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, int) and not isinstance(v, bool)]


class HFTokenizer:
    """A byte-level BPE ``tokenizer.json`` (DeepSeek-V3 layout). Build with :meth:`from_dir`.

    Added tokens are the special tokens: all of them are matched in the input (``allow_special=False`` leaves
    those marked ``special`` as plain text, as HF's ``split_special_tokens`` does); only those marked ``special``
    are dropped by ``skip_special_tokens``. Ids past the tokenizer up to ``vocab_size`` (the model's padded
    embedding rows) are valid and decode to nothing.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        stop_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        add_bos_token: bool = False,
        name: str = "tokenizer.json",
    ) -> None:
        self.name = name
        self._tk = backend
        self._tk_plain: tokenizers.Tokenizer | None = None  # a copy that leaves special tokens as text, made on demand
        added = backend.get_added_tokens_decoder()
        self._added: dict[str, int] = {t.content: i for i, t in added.items()}
        self._vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
        size = max(self._vocab.values(), default=-1) + 1
        self.vocab_size = max(size, vocab_size or 0)
        self._id_to_token: list[str | None] = [None] * self.vocab_size
        for tok, i in self._vocab.items():
            self._id_to_token[i] = tok
        self._bytes: dict[int, bytes] = {}  # id -> what the ByteLevel decoder makes of it, filled on demand
        self.special_ids: frozenset[int] = frozenset(added)
        self.skip_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        """Ids dropped by ``decode(..., skip_special_tokens=True)`` (added tokens marked special)."""
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_id = self.token_to_id(pad_token) if pad_token else None
        self.unk_id = self.token_to_id(unk_token) if unk_token else None
        self.im_end_id: int | None = None
        stops = {i for i in stop_ids if 0 <= i < self.vocab_size}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.add_bos_token = add_bos_token
        """Whether the checkpoint's tokenizer prepends BOS (what GGUF's ``add_bos_token`` records); k2local's own
        ``encode`` never adds it: the chat template writes ``bos_token``."""
        self.add_eos_token = False

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        """Load ``tokenizer.json`` plus ``tokenizer_config.json`` (token names, add_bos_token),
        ``generation_config.json`` (extra stop ids) and ``config.json`` (padded vocab_size) when present."""
        path = Path(path)
        tj = path / "tokenizer.json"
        spec = read_json(tj, "tokenizer.json")
        model = spec.get("model") if isinstance(spec, dict) else None
        kind = model.get("type") if isinstance(model, dict) else None
        if kind != "BPE":
            raise TokenizerError(f"{tj}: tokenizer model is {kind!r}, not 'BPE' (k2local reads byte-level BPE "
                                 "tokenizer.json files such as DeepSeek-V3's)")
        for part in ("pre_tokenizer", "decoder"):
            if not _has_byte_level(spec.get(part)):
                raise TokenizerError(f"{tj}: not a byte-level BPE (its {part} has no ByteLevel step)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # the library raises its own Exception subclass on bad vocab / merges
            raise TokenizerError(f"{tj}: cannot load: {e}") from None
        cfg_path = path / "tokenizer_config.json"
        cfg = read_config(cfg_path) if cfg_path.exists() else {}
        names = {k: token_name(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        gen_path, model_cfg_path = path / "generation_config.json", path / "config.json"
        gen = read_json(gen_path, "generation config") if gen_path.exists() else {}
        model_cfg = read_json(model_cfg_path, "model config") if model_cfg_path.exists() else {}
        gen, model_cfg = (d if isinstance(d, dict) else {} for d in (gen, model_cfg))
        for key in ("bos_token", "eos_token"):  # as llama.cpp's converter: config.json ids when the config names none
            if names[key] is None:
                for i in _ids(model_cfg.get(f"{key}_id"))[:1]:
                    names[key] = backend.id_to_token(i)
        for key in ("bos_token", "eos_token"):
            if names[key] is not None and backend.token_to_id(names[key]) is None:
                raise TokenizerError(f"{cfg_path}: {key} {names[key]!r} is not a token of {tj}")
        vocab_size = model_cfg.get("vocab_size") if isinstance(model_cfg.get("vocab_size"), int) else None
        tok = cls(backend, **names, stop_ids=_ids(gen.get("eos_token_id")), vocab_size=vocab_size, name=str(tj))
        if spec.get("post_processor"):  # what the post-processor does wins over tokenizer_config (as llama.cpp)
            with_specials = backend.encode("a", add_special_tokens=True).ids
            tok.add_bos_token = tok.bos_id is not None and with_specials[:1] == [tok.bos_id]
            tok.add_eos_token = tok.eos_id is not None and with_specials[-1:] == [tok.eos_id]
        else:
            tok.add_bos_token = cfg.get("add_bos_token") is True
            tok.add_eos_token = cfg.get("add_eos_token") is True
        return tok

    # -- encoding ------------------------------------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With ``allow_special`` literal special-token strings become their ids; no BOS is added."""
        if allow_special:
            return self._tk.encode(text, add_special_tokens=False).ids
        if self._tk_plain is None:
            plain = tokenizers.Tokenizer.from_str(self._tk.to_str())
            plain.encode_special_tokens = True
            self._tk_plain = plain
        return self._tk_plain.encode(text, add_special_tokens=False).ids

    # -- decoding ------------------------------------------------------------------------------------------------------

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = list(ids)
        for i in out:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Ids -> raw bytes, exactly what the ByteLevel decoder joins (special tokens as their text unless skipped)."""
        ids = self._check_ids(ids)
        skip = self.skip_ids if skip_special_tokens else frozenset()
        return b"".join(self._token_bytes(i) for i in ids if i not in skip)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text (the library's decode; invalid UTF-8 becomes U+FFFD)."""
        return self._tk.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (an added token's text for special ids)."""
        self._check_ids([token_id])
        return self._token_bytes(token_id)

    def _token_bytes(self, token_id: int) -> bytes:
        out = self._bytes.get(token_id)
        if out is None:
            tok = self._id_to_token[token_id]
            out = self._bytes[token_id] = _token_bytes(tok) if tok is not None else b""
        return out

    def stream_decoder(self, skip_special_tokens: bool = False, keep: Iterable[int] = ()) -> StreamDecoder:
        """A new :class:`StreamDecoder` over this tokenizer (``keep``: special ids kept even when skipping)."""
        return StreamDecoder(self, skip_special_tokens, keep)

    # -- vocabulary ----------------------------------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers.Tokenizer`` doing the work. Do not mutate."""
        return self._tk

    @property
    def special_tokens(self) -> dict[str, int]:
        """Added token text -> id."""
        return dict(self._added)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids

    def is_unused(self, token_id: int) -> bool:
        """True for padding ids: inside ``vocab_size`` but no token of the tokenizer."""
        return 0 <= token_id < self.vocab_size and self._id_to_token[token_id] is None

    def token_to_id(self, token: str) -> int | None:
        """An added token, a vocabulary string ("Ġthe") or plain token text (" the") -> id, else None."""
        if token in self._added:
            return self._added[token]
        if token in self._vocab:
            return self._vocab[token]
        return self._vocab.get(bytes_to_gpt2(token.encode("utf-8")))

    def id_to_token(self, token_id: int) -> str:
        """Id -> its vocabulary string (added tokens as their text; padding ids as ``[PAD{id}]``)."""
        self._check_ids([token_id])
        tok = self._id_to_token[token_id]
        return tok if tok is not None else f"[PAD{token_id}]"

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name}, vocab_size={self.vocab_size}, added={len(self._added)})"
