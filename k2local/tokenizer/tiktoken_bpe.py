"""Kimi K2 tokenizer: tiktoken BPE over ``tiktoken.model`` plus 256 special ids.

Mirrors Moonshot's ``tokenization_kimi.TikTokenTokenizer``: base ids come from the ranks file, special ids
``[n_base, n_base + 256)`` come from ``added_tokens_decoder`` (unnamed ones are ``<|reserved_token_N|>``),
literal special-token strings in the input become control tokens unless ``allow_special=False``.
Also converts to and from the GPT-2 style vocabulary that GGUF files store.

:func:`load_tokenizer` / :meth:`Tokenizer.from_dir` pick ``tiktoken.model`` when a checkpoint has it, else its
Hugging Face ``tokenizer.json`` (DeepSeek-V3 family, :class:`k2local.tokenizer.hf.HFTokenizer`; both satisfy
:class:`k2local.tokenizer.common.TextTokenizer`, whose module holds what they share).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tiktoken

from k2local.tokenizer.hf import HFTokenizer
from k2local.tokenizer.common import (
    TOKEN_TYPE_BYTE,
    TOKEN_TYPE_CONTROL,
    TOKEN_TYPE_NORMAL,
    TOKEN_TYPE_UNKNOWN,
    TOKEN_TYPE_UNUSED,
    TOKEN_TYPE_USER_DEFINED,
    StreamDecoder,
    TokenizerError,
    bytes_to_gpt2,
    gpt2_to_bytes,
    read_config,
    token_name,
)

__all__ = [
    "KIMI_PAT_STR",
    "KIMI_SPECIAL_OFFSETS",
    "NUM_RESERVED_SPECIAL_TOKENS",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerError",
    "bytes_to_gpt2",
    "gguf_vocab",
    "gpt2_to_bytes",
    "load_tiktoken_ranks",
    "load_tokenizer",
    "ranks_from_gguf_tokens",
]

KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
"""Kimi's pre-tokenizer regex (needs ``&&`` class intersection, which tiktoken's fancy-regex supports)."""

NUM_RESERVED_SPECIAL_TOKENS = 256
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

# name -> (offset from n_base, HF "special" flag). The tool-call markers are special=False in Kimi's config,
# so HF-style ``skip_special_tokens`` decoding keeps them.
KIMI_SPECIAL_OFFSETS: dict[str, tuple[int, bool]] = {
    "[BOS]": (0, True),
    "[EOS]": (1, True),
    "<|im_end|>": (2, True),
    "<|im_user|>": (3, True),
    "<|im_assistant|>": (4, True),
    "<|start_header_id|>": (6, True),
    "<|end_header_id|>": (7, True),
    "[EOT]": (9, True),
    "<|im_system|>": (10, True),
    "<|tool_calls_section_begin|>": (11, False),
    "<|tool_calls_section_end|>": (12, False),
    "<|tool_call_begin|>": (13, False),
    "<|tool_call_argument_begin|>": (14, False),
    "<|tool_call_end|>": (15, False),
    "<|im_middle|>": (17, True),
    "[UNK]": (254, True),
    "[PAD]": (255, True),
}
STOP_TOKEN_NAMES = ("<|im_end|>", "[EOS]", "[EOT]")
TOOL_MARKER_NAMES = frozenset(n for n, (_, special) in KIMI_SPECIAL_OFFSETS.items() if not special)


# ----------------------------------------------------------------------------------------------------------------------
# Files


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file ("base64 rank" per line); ranks must be exactly 0..n-1 and cover all 256 bytes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: tokenizer ranks file not found") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read tokenizer ranks file: {e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 'base64 rank'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}:{lineno}: malformed tiktoken line {line[:80]!r} ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: duplicate token {token!r}")
        ranks[token] = rank
    try:
        _check_ranks(ranks)
    except TokenizerError as e:
        raise TokenizerError(f"{path}: {e}") from None
    return ranks


def _check_ranks(ranks: Mapping[bytes, int]) -> None:
    if not ranks:
        raise TokenizerError("no BPE ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"BPE ranks are not exactly 0..{len(ranks) - 1}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"BPE ranks lack {len(missing)} single-byte tokens (first: {missing[0]:#04x})")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


_RUN_RE = re.compile(r"\s+|\S+")


def _split_long_runs(text: str, limit: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cut ``text`` inside any whitespace / non-whitespace run longer than ``limit`` (as Kimi does)."""
    if len(text) <= limit:
        yield text
        return
    start = 0
    for m in _RUN_RE.finditer(text):
        run_start, run_end = m.span()
        for cut in range(run_start + limit, run_end, limit):
            yield text[start:cut]
            start = cut
    yield text[start:]


class Tokenizer:
    """Kimi K2 tokenizer (tiktoken BPE + special tokens). Build with :meth:`from_dir` or :meth:`from_ranks`."""

    def __init__(
        self,
        ranks: dict[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        bos_token: str | None = "[BOS]",
        eos_token: str | None = "[EOS]",
        pad_token: str | None = "[PAD]",
        unk_token: str | None = "[UNK]",
        skip_tokens: Iterable[str] | None = None,
        pat_str: str = KIMI_PAT_STR,
        name: str = "kimi_k2",
    ) -> None:
        _check_ranks(ranks)
        self.n_base = len(ranks)
        specials = dict(special_tokens)
        for tok, i in specials.items():
            if i < self.n_base:
                raise TokenizerError(f"special token {tok!r} has id {i} inside the base vocabulary (< {self.n_base})")
        if len(set(specials.values())) != len(specials):
            raise TokenizerError("two special tokens share one id")
        try:
            self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        except Exception as e:  # tiktoken raises ValueError / regex errors
            raise TokenizerError(f"cannot build tiktoken encoding: {e}") from e
        self._ranks = ranks
        self._specials = specials
        self._id_to_special = {i: t for t, i in specials.items()}
        self.vocab_size = max([self.n_base - 1, *specials.values()]) + 1
        self.special_ids: frozenset[int] = frozenset(specials.values())
        if skip_tokens is None:
            skip_tokens = [t for t in specials if t not in TOOL_MARKER_NAMES]
        self.skip_ids: frozenset[int] = frozenset(specials[t] for t in skip_tokens if t in specials)
        """Ids dropped by ``decode(..., skip_special_tokens=True)`` (HF "special": true; tool markers stay)."""
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_id = self.token_to_id(pad_token) if pad_token else None
        self.unk_id = self.token_to_id(unk_token) if unk_token else None
        self.im_end_id = specials.get("<|im_end|>")
        self.stop_ids: frozenset[int] = frozenset(specials[t] for t in STOP_TOKEN_NAMES if t in specials)
        self.add_bos_token = False
        """Kimi's tokenizer never prepends BOS to a raw prompt (nor appends EOS)."""
        self.add_eos_token = False
        self._id_to_bytes: list[bytes] | None = None

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | HFTokenizer:
        """A checkpoint directory's tokenizer: ``tiktoken.model`` (Kimi K2, Moonlight) when present, else
        ``tokenizer.json`` (DeepSeek-V3 family, returned as :class:`k2local.tokenizer.hf.HFTokenizer`).

        For ``tiktoken.model`` without ``tokenizer_config.json`` the Kimi K2 special-token table is assumed.
        """
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a directory")
        if not (path / "tiktoken.model").exists():
            if (path / "tokenizer.json").exists():
                return HFTokenizer.from_dir(path)
            raise TokenizerError(f"{path}: no tokenizer found (looked for tiktoken.model, as Kimi K2 and Moonlight "
                                 "ship, and tokenizer.json, as DeepSeek-V3 ships)")
        ranks = load_tiktoken_ranks(path / "tiktoken.model")
        n_base = len(ranks)
        cfg_path = path / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = read_config(cfg_path)
            decoder = cfg.get("added_tokens_decoder", {})
            if not isinstance(decoder, dict):
                raise TokenizerError(f"{cfg_path}: added_tokens_decoder must be an object")
            named: dict[int, tuple[str, bool]] = {}
            for key, entry in decoder.items():
                content = token_name(entry)
                try:
                    idx = int(key)
                except ValueError:
                    idx = -1
                if idx < 0 or content is None:
                    raise TokenizerError(f"{cfg_path}: bad added_tokens_decoder entry {key!r}: {entry!r}")
                special = bool(entry.get("special", True)) if isinstance(entry, dict) else True
                named[idx] = (content, special)
            fields = {k: token_name(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        else:
            named = {n_base + off: (tok, special) for tok, (off, special) in KIMI_SPECIAL_OFFSETS.items()}
            fields = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]"}
        specials: dict[str, int] = {}
        skip: list[str] = []
        # Entries outside [n_base, n_base + 256) are ignored, as Kimi does.
        for i in range(n_base, n_base + NUM_RESERVED_SPECIAL_TOKENS):
            tok, special = named.get(i, (f"<|reserved_token_{i}|>", True))
            if tok in specials:
                raise TokenizerError(f"{cfg_path}: special token {tok!r} appears twice")
            specials[tok] = i
            if special:
                skip.append(tok)
        fields = {k: (v if v in specials else None) for k, v in fields.items()}
        return cls(ranks, specials, skip_tokens=skip, name=path.name or "kimi_k2", **fields)

    @classmethod
    def from_ranks(
        cls,
        ranks: dict[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        bos_token: str | None = "[BOS]",
        eos_token: str | None = "[EOS]",
        pad_token: str | None = "[PAD]",
        unk_token: str | None = "[UNK]",
        skip_tokens: Iterable[str] | None = None,
        vocab_size: int | None = None,
        pat_str: str = KIMI_PAT_STR,
    ) -> Tokenizer:
        """Build from raw ranks and specials (e.g. from GGUF metadata).

        Free ids in ``[n_base, vocab_size)`` become ``<|reserved_token_N|>``; ``vocab_size`` defaults to
        ``n_base + 256`` (or just past the highest special id). Token names that are absent are treated as None.
        """
        n_base = len(ranks)
        specials = dict(special_tokens)
        top = max([n_base - 1, *specials.values()]) + 1
        vocab_size = vocab_size if vocab_size is not None else max(top, n_base + NUM_RESERVED_SPECIAL_TOKENS)
        if vocab_size < top:
            raise TokenizerError(f"vocab_size {vocab_size} is smaller than the highest id + 1 ({top})")
        used = set(specials.values())
        for i in range(n_base, vocab_size):
            if i not in used:
                specials.setdefault(f"<|reserved_token_{i}|>", i)
        names = {
            k: (v if v in specials else None)
            for k, v in dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token).items()
        }
        return cls(ranks, specials, skip_tokens=skip_tokens, pat_str=pat_str, **names)

    # -- encoding ------------------------------------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids. With ``allow_special`` literal special-token strings become their ids; no BOS is added."""
        kwargs: dict[str, Any] = {"allowed_special": "all"} if allow_special else {"disallowed_special": ()}
        if len(text) <= MAX_NO_WHITESPACES_CHARS:
            return self._enc.encode(text, **kwargs)
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                ids.extend(self._enc.encode(piece, **kwargs))
        return ids

    # -- decoding ------------------------------------------------------------------------------------------------------

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out = list(ids)
        for i in out:
            if not 0 <= i < self.vocab_size or (i >= self.n_base and i not in self._id_to_special):
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """Ids -> raw bytes (special tokens as their names unless skipped)."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.skip_ids]
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD (as tiktoken/Kimi do)."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's name for special ids)."""
        self._check_ids([token_id])
        return self._enc.decode_single_token_bytes(token_id)

    def stream_decoder(self, skip_special_tokens: bool = False, keep: Iterable[int] = ()) -> StreamDecoder:
        """A new :class:`StreamDecoder` over this tokenizer (``keep``: special ids kept even when skipping)."""
        return StreamDecoder(self, skip_special_tokens, keep)

    # -- vocabulary ----------------------------------------------------------------------------------------------------

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding (ranks, specials, pre-tokenizer regex). Do not mutate."""
        return self._enc

    @property
    def ranks(self) -> dict[bytes, int]:
        """The BPE ranks (token bytes -> id), base ids only. Do not mutate."""
        return self._ranks

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id (including reserved ones)."""
        return dict(self._specials)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    def token_to_id(self, token: str) -> int | None:
        """A special name, a GPT-2 style token string ("Ġthe") or plain token text (" the") -> id, else None."""
        if token in self._specials:
            return self._specials[token]
        candidates: list[bytes] = []
        try:
            candidates.append(gpt2_to_bytes(token))
        except TokenizerError:
            pass
        candidates.append(token.encode("utf-8"))
        for raw in candidates:
            if raw in self._ranks:
                return self._ranks[raw]
        return None

    def id_to_token(self, token_id: int) -> str:
        """Id -> special name, or the GPT-2 style string of the token's bytes (as GGUF/HF vocabularies show it)."""
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return bytes_to_gpt2(self.token_bytes(token_id))

    def base_token_bytes(self) -> list[bytes]:
        """Bytes of every base token, indexed by id (cached)."""
        if self._id_to_bytes is None:
            table: list[bytes] = [b""] * self.n_base
            for tok, i in self._ranks.items():
                table[i] = tok
            self._id_to_bytes = table
        return self._id_to_bytes

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(n_base={self.n_base}, vocab_size={self.vocab_size}, specials={len(self._specials)})"


def load_tokenizer(path: str | Path) -> Tokenizer | HFTokenizer:
    """A checkpoint directory's tokenizer (``tiktoken.model`` or ``tokenizer.json``); see :meth:`Tokenizer.from_dir`."""
    return Tokenizer.from_dir(path)


# ----------------------------------------------------------------------------------------------------------------------
# GGUF vocabulary


def ranks_from_gguf_tokens(tokens: list[str], types: list[int]) -> tuple[dict[bytes, int], dict[str, int]]:
    """GGUF ``tokenizer.ggml.tokens`` + ``token_type`` (gpt2 model) -> (BPE ranks, special tokens).

    NORMAL tokens are GPT-2 byte-level strings and become ranks (id = rank); CONTROL, USER_DEFINED and UNKNOWN
    tokens become specials; UNUSED ids (``[PAD{i}]``) are skipped. Pass both to :meth:`Tokenizer.from_ranks`.
    """
    if len(tokens) != len(types):
        raise TokenizerError(f"GGUF vocab: {len(tokens)} tokens but {len(types)} token types")
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(tokens, types)):
        if typ == TOKEN_TYPE_NORMAL:
            raw = gpt2_to_bytes(tok)
            if raw in ranks:
                raise TokenizerError(f"GGUF vocab: token {tok!r} appears twice (ids {ranks[raw]} and {i})")
            ranks[raw] = i
        elif typ == TOKEN_TYPE_BYTE:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", tok)
            raw = bytes([int(m.group(1), 16)]) if m else gpt2_to_bytes(tok)
            ranks.setdefault(raw, i)
        elif typ in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN):
            specials[tok] = i
        elif typ != TOKEN_TYPE_UNUSED:
            raise TokenizerError(f"GGUF vocab: token {i} {tok!r} has unknown type {typ}")
    return ranks, specials


def _bpe_parts(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of ``token`` using only merges with rank < ``max_rank`` (lowest rank first)."""
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    while len(parts) > 1:
        best_i, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_i, best_rank = i, r
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def gguf_vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) for a GGUF "gpt2" vocabulary, as llama.cpp's converter writes Kimi K2.

    Base tokens: GPT-2 byte-level strings, NORMAL. Special ids (reserved ones included): their names, CONTROL.
    Unassigned ids: ``[PAD{i}]``, UNUSED. Merges: for each multi-byte token in rank order, the BPE over lower
    ranks; when it ends in exactly two parts, "left right" in GPT-2 form.
    """
    table = tok.base_token_bytes()
    ranks = tok.ranks
    merges: list[str] = []
    for rank, token in enumerate(table):
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) == 2:
                merges.append(f"{bytes_to_gpt2(parts[0])} {bytes_to_gpt2(parts[1])}")
    tokens = [bytes_to_gpt2(t) for t in table]
    types = [TOKEN_TYPE_NORMAL] * len(table)
    specials = {i: t for t, i in tok.special_tokens.items()}
    for i in range(tok.n_base, tok.vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(TOKEN_TYPE_CONTROL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_TYPE_UNUSED)
    return tokens, types, merges
