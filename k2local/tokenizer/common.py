"""What both tokenizers share: the interface the rest of k2local uses, streaming decode, the GPT-2 byte alphabet of
GGUF / ``tokenizer.json`` vocabularies, the JSON readers of tokenizer files, and the error type.

:class:`k2local.tokenizer.tiktoken_bpe.Tokenizer` (Kimi K2's tiktoken BPE) and :class:`k2local.tokenizer.hf.HFTokenizer`
(a ``tokenizer.json``, DeepSeek-V3 family) both build on this module and satisfy :class:`TextTokenizer`; neither
imports the other's module for it. Standard library only, so anything may import it.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from k2local.errors import K2Error

__all__ = [
    "TOKEN_TYPE_BYTE",
    "TOKEN_TYPE_CONTROL",
    "TOKEN_TYPE_NORMAL",
    "TOKEN_TYPE_UNKNOWN",
    "TOKEN_TYPE_UNUSED",
    "TOKEN_TYPE_USER_DEFINED",
    "StreamDecoder",
    "TextTokenizer",
    "TokenizerError",
    "bytes_to_gpt2",
    "gpt2_to_bytes",
    "read_config",
    "read_json",
    "token_name",
    "unicode_to_byte",
]

# gguf.TokenType values (kept here so importing a tokenizer does not import gguf).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 1, 2, 3
TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 4, 5, 6


class TokenizerError(K2Error, ValueError):
    """A tokenizer file is missing or malformed, or an id/token is invalid."""


class TextTokenizer(Protocol):
    """The tokenizer interface the generator, chat session, server, tool-call parser and GGUF writer use.

    ``skip_ids`` are the ids ``decode(..., skip_special_tokens=True)`` drops (HF's "special": true);
    ``stop_ids`` end a turn; ``add_bos_token`` records whether the checkpoint's own tokenizer prepends BOS to a raw
    prompt (k2local's ``encode`` never adds it: chat templates write ``bos_token`` themselves).
    """

    vocab_size: int
    special_ids: frozenset[int]
    skip_ids: frozenset[int]
    stop_ids: frozenset[int]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    im_end_id: int | None
    add_bos_token: bool
    add_eos_token: bool

    @property
    def special_tokens(self) -> dict[str, int]: ...

    def encode(self, text: str, allow_special: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def stream_decoder(self, skip_special_tokens: bool = False, keep: Iterable[int] = ()) -> StreamDecoder: ...

    def is_special(self, token_id: int) -> bool: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, token_id: int) -> str: ...

    def __len__(self) -> int: ...


# ----------------------------------------------------------------------------------------------------------------------
# Files


def read_json(path: Path, what: str = "") -> Any:
    """A JSON file's value; TokenizerError naming the file when it is missing or not JSON (`what` says what it is)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON{f' ({what})' if what else ''}: {e}") from None


def read_config(path: Path) -> dict[str, Any]:
    """A JSON object file (``tokenizer_config.json``); TokenizerError when it is not an object."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def token_name(value: Any) -> str | None:
    """A config token field is a string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------------------------------------
# GPT-2 byte <-> unicode mapping (what GGUF "gpt2" vocabularies and byte-level tokenizer.json files store)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> tuple[str, ...]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """GPT-2 printable character -> the byte it stands for."""
    return {ch: b for b, ch in enumerate(_byte_to_unicode())}


def bytes_to_gpt2(token: bytes) -> str:
    """Token bytes -> GPT-2 printable-unicode form (e.g. b" the" -> "Ġthe")."""
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def gpt2_to_bytes(text: str) -> bytes:
    """Inverse of :func:`bytes_to_gpt2`; raises TokenizerError on characters outside the GPT-2 alphabet."""
    table = unicode_to_byte()
    try:
        return bytes(table[ch] for ch in text)
    except KeyError as e:
        raise TokenizerError(f"{text!r} is not a GPT-2 byte-level token (bad char {e.args[0]!r})") from None


# ----------------------------------------------------------------------------------------------------------------------
# Streaming decode


class StreamDecoder:
    """Turns token ids into text pieces incrementally without splitting UTF-8 multi-byte characters.

    ``feed`` returns only complete characters; incomplete trailing bytes wait for the next ids. ``flush`` emits
    whatever is left (invalid bytes as U+FFFD). With ``skip_special_tokens``, the special ids in ``keep`` still come
    through (tool-call markers flagged special, as DeepSeek-V3's are, must reach the tool-call parser).
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = False, keep: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = frozenset(tokenizer.skip_ids) - frozenset(keep) if skip_special_tokens and keep else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the newly complete text (possibly "")."""
        ids = [ids] if isinstance(ids, int) else ids
        if self._skip is not None:  # skipping all special ids but those kept
            data = self.tokenizer.decode_bytes([i for i in ids if i not in self._skip])
        else:
            data = self.tokenizer.decode_bytes(ids, self.skip_special_tokens)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return remaining text and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
