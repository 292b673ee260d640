"""Token logprobs in OpenAI's shapes: chat ``choices[i].logprobs.content`` and completions ``choices[i].logprobs``.

Values are the model's own distribution (before temperature, penalties and grammar masks, as vLLM reports them);
end-of-turn tokens are left out (OpenAI lists only the tokens of the answer)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from k2local.sampler import TokenLogprob
from k2local.tokenizer.common import TextTokenizer

FLOOR = -9999.0  # OpenAI's value for a token of probability zero (JSON has no -inf)


def _val(v: float) -> float:
    return v if v > FLOOR else FLOOR


def _piece(tok: TextTokenizer, i: int) -> tuple[str, list[int]]:
    raw = tok.decode_bytes([i])
    return raw.decode("utf-8", errors="replace"), list(raw)


def _kept(tok: TextTokenizer, items: Iterable[TokenLogprob]) -> list[TokenLogprob]:
    return [x for x in items if x.token not in tok.stop_ids]


def chat_logprobs_json(tok: TextTokenizer, items: Iterable[TokenLogprob]) -> dict[str, Any]:
    """``{"content": [ChatCompletionTokenLogprob...], "refusal": null}``."""
    content = []
    for x in _kept(tok, items):
        text, raw = _piece(tok, x.token)
        top = []
        for i, lp in x.top:
            t, b = _piece(tok, i)
            top.append({"token": t, "logprob": _val(lp), "bytes": b})
        content.append({"token": text, "logprob": _val(x.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs_json(tok: TextTokenizer, items: Iterable[TokenLogprob], offset: int = 0
                             ) -> dict[str, Any]:
    """Completions' ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (offsets from ``offset``)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    for x in _kept(tok, items):
        text, _ = _piece(tok, x.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(_val(x.logprob))
        out["top_logprobs"].append({_piece(tok, i)[0]: _val(lp) for i, lp in x.top})
        out["text_offset"].append(pos)
        pos += len(text)
    return out
