"""The server's scheduler: --parallel N interleaved sequences, cancellation of a long prefill within one chunk.

Real uvicorn servers on loopback over the tiny random model (real sampling, greedy where results are compared).
Prompts are raw token ids through /v1/completions, so their lengths are exact and no two share a prefix unless a
test means them to.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from k2local.engine import Engine, LoadOptions
from k2local.server.app import create_app
from k2local.tiny import default_tiny_path
from tests.server_harness import serving

CONTEXT = 8192
MODEL = "tiny"


class Srv:
    def __init__(self, app, url: str) -> None:
        self.app, self.url = app, url

    @property
    def worker(self):
        return self.app.state.k2.worker

    def complete(self, prompt: list[int], timeout: float = 120, **kw) -> dict:
        body = {"model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True, **kw}
        r = httpx.post(self.url + "/v1/completions", json=body, timeout=timeout)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(default_tiny_path(), LoadOptions(max_context=CONTEXT))


@contextmanager
def serve(engine: Engine, parallel: int) -> Iterator[Srv]:
    app = create_app(engine, MODEL, parallel=parallel)
    with serving(app) as url:
        yield Srv(app, url)


@pytest.fixture(scope="module")
def srv4(engine: Engine) -> Iterator[Srv]:
    with serve(engine, 4) as s:
        yield s


def wait_for(pred, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def prompt(seed: int, n: int) -> list[int]:
    """n ordinary token ids starting with a token no other seed starts with (no shared prefix)."""
    return [seed] + [(seed * 37 + i * 11) % 1000 + 1 for i in range(n - 1)]


def stream_times(s: Srv, ids: list[int], max_tokens: int, start: threading.Barrier) -> tuple[float, float, str]:
    """(first text time, end time, text) of one streamed completion."""
    body = {"model": MODEL, "prompt": ids, "temperature": 0, "ignore_eos": True, "max_tokens": max_tokens,
            "stream": True}
    first, text = None, ""
    start.wait()
    with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"]
            if piece and piece[0]["text"]:
                text += piece[0]["text"]
                first = first or time.monotonic()
    assert first is not None, "no text came"
    return first, time.monotonic(), text


# --------------------------------------------------------------------------------------------- interleaving

def test_four_streams_all_start_before_any_ends(srv4: Srv) -> None:
    """4 concurrent streams: every first token arrives before any stream ends (one at a time, the 4th stream's
    first token would come after 3 whole answers)."""
    start = threading.Barrier(4)
    steps = srv4.worker.steps
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(stream_times, srv4, prompt(i + 1, 20), 32, start) for i in range(4)]
        got = [f.result() for f in futs]
    firsts, ends = [g[0] for g in got], [g[1] for g in got]
    assert max(firsts) < min(ends), f"firsts {firsts}, ends {ends}"
    # interleaved: about max_tokens rounds for all four, not 4 x max_tokens
    assert srv4.worker.steps - steps < 3 * 32


def test_greedy_outputs_same_with_parallel_1_and_4(engine: Engine) -> None:
    """Interleaving must not change results: the same requests, concurrently, answer the same token for token
    with --parallel 1 and --parallel 4 (a long prompt among them, prefilled in chunks between others' decode)."""
    prompts = [prompt(1, 12), prompt(2, 700), prompt(3, 30), prompt(4, 5), prompt(5, 64), prompt(6, 9)]

    def answers(parallel: int) -> list[str]:
        with serve(engine, parallel) as s, ThreadPoolExecutor(len(prompts)) as pool:
            outs = list(pool.map(lambda p: s.complete(p, max_tokens=24)["choices"][0]["text"], prompts))
            if parallel > 1:
                assert max(len(r.result.tokens) for r in s.worker.finished) == 24
            return outs

    one, four = answers(1), answers(4)
    assert all(one) and one == four


# --------------------------------------------------------------------------------------------- cancellation

LONG = 6000  # about 10 s of tiny-model prefill on a 2-core machine; chunks of 512 take a fraction of that


def _running(s: Srv):
    return next(iter(s.worker.active), None)


@pytest.mark.parametrize("how", ["stream_closed", "client_timeout"])
def test_disconnect_cancels_a_long_prefill_within_one_chunk(srv4: Srv, how: str) -> None:
    worker = srv4.worker
    wait_for(lambda: not worker.active, "an idle worker")
    before = len(worker.finished)
    ids = prompt(100 + len(how), LONG)
    body = {"model": MODEL, "prompt": ids, "max_tokens": 4, "stream": how == "stream_closed"}
    seen: dict[str, int] = {}

    def client() -> None:
        if how == "stream_closed":
            with httpx.stream("POST", srv4.url + "/v1/completions", json=body, timeout=120):
                wait_for(lambda: _running(srv4) is not None and _running(srv4).run.chunks >= 1, "prefill started")
                seen["chunks"] = _running(srv4).run.chunks
            return  # leaving the block closes the connection mid-prefill
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv4.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
        a = _running(srv4)  # None: already cancelled (the bound below then holds trivially)
        seen["chunks"] = a.run.chunks if a is not None else LONG

    client()
    t0 = time.monotonic()
    wait_for(lambda: len(worker.finished) > before, "the abandoned request ended", limit=30)
    cancel_s = time.monotonic() - t0
    rec = worker.finished[-1]
    chunk = worker.slots[0].gen.prefill_chunk
    assert rec.result.finish_reason == "cancelled" and rec.result.tokens == []
    assert rec.result.prefilled is not None and rec.result.prefilled < LONG
    # at most the chunk in flight when the client went (and one more for the disconnect to be seen) ran after it
    assert rec.result.prefilled <= (seen["chunks"] + 2) * chunk, (rec.result.prefilled, seen)
    per_chunk = rec.result.prefill_s / max(1, rec.result.prefilled / chunk)
    assert cancel_s < 2 * per_chunk + 1.0, (cancel_s, per_chunk)

    t1 = time.monotonic()  # the next request starts promptly: the worker is not busy with the dead prompt
    r = srv4.complete(prompt(7, 8), max_tokens=2)
    assert r["usage"]["completion_tokens"] == 2
    assert time.monotonic() - t1 < 5.0

    # the cut cache is consistent: it holds exactly the computed prefix, and a prompt continuing it reuses it
    n = rec.result.prefilled
    slot = next(s for s in worker.slots if s.gen.tokens[:1] == ids[:1])
    assert len(slot.gen.tokens) == slot.gen.cache.length == n and slot.gen.tokens == ids[:n]
    again = srv4.complete(ids[:n] + [5, 6], max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n
