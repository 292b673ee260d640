"""k2local tokenizers as llguidance tokenizers (built once per tokenizer: about 3 s for Kimi K2's 163,840 ids)."""
from __future__ import annotations

import threading
import weakref
from typing import Any

import llguidance
from llguidance.tiktoken import lltokenizer_from_encoding

from k2local.tokenizer.common import TextTokenizer

_CACHE: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class _Bytes:
    """Any TextTokenizer through llguidance's generic wrapper (token bytes; specials as 0xFF + name)."""

    def __init__(self, tok: TextTokenizer):
        self._tok = tok
        self.eos_token_id = next(iter(sorted(tok.stop_ids)), 0)
        self.bos_token_id = tok.bos_id
        self.special_token_ids = sorted(tok.special_ids)
        self.tokens = [b"\xff" + tok.id_to_token(i).encode() if i in tok.special_ids else tok.token_bytes(i)
                       for i in range(tok.vocab_size)]

    def __call__(self, s: str) -> list[int]:
        return self._tok.encode(s, allow_special=False)


def ll_tokenizer(tok: TextTokenizer) -> llguidance.LLTokenizer:
    """The llguidance tokenizer of ``tok`` (EOS: its end-of-turn ids), cached for ``tok``'s lifetime."""
    with _LOCK:
        hit = _CACHE.get(tok)
        if hit is not None:
            return hit
        eos = sorted(tok.stop_ids) or None
        encoding = getattr(tok, "encoding", None)  # Kimi's tiktoken Encoding
        backend = getattr(tok, "backend", None)  # a Hugging Face tokenizers.Tokenizer
        if encoding is not None:
            lt = lltokenizer_from_encoding(encoding, n_vocab=tok.vocab_size, eos_token=eos)
        elif backend is not None:
            lt = llguidance.LLTokenizer(backend.to_str(), n_vocab=tok.vocab_size, eos_token=eos)
        else:
            lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes(tok)), n_vocab=tok.vocab_size,
                                        eos_token=eos)
        _CACHE[tok] = lt
        return lt
