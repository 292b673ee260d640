"""Continuous batching in the server: --parallel N sequences share each forward step (decode rows and prefill
chunks of other requests in one batch), with the same greedy output as one request at a time, and a long prefill
still cancelled within one chunk while other streams decode.

Real uvicorn servers on loopback over the tiny random model, driven by the official ``openai`` SDK and httpx.
Prompts are raw token ids through /v1/completions, so their lengths are exact and no two share a prefix.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest

from k2local.engine import Engine, LoadOptions
from k2local.server.app import create_app
from k2local.tiny import default_tiny_path
from tests.server_harness import serving

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load(default_tiny_path(), LoadOptions(max_context=8192))


@contextmanager
def serve(engine: Engine, parallel: int, max_prefill_rows: int | None = None) -> Iterator[tuple[str, object]]:
    """(base url, worker) of a server on a loopback port."""
    app = create_app(engine, MODEL, parallel=parallel)
    worker = app.state.k2.worker
    if max_prefill_rows is not None:
        worker.max_prefill_rows = max_prefill_rows
    with serving(app) as url:
        yield url, worker


def prompt(seed: int, n: int) -> list[int]:
    """n ordinary token ids starting with a token no other seed starts with (no shared prefix)."""
    return [seed] + [(seed * 37 + i * 11) % 1000 + 1 for i in range(n - 1)]


def wait_for(pred, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def sdk_stream(url: str, ids: list[int], max_tokens: int, start: threading.Barrier | None = None
               ) -> tuple[float, float, str]:
    """(first text time, end time, text) of one streamed completion through the openai SDK."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    if start is not None:
        start.wait()
    first, text = None, ""
    for chunk in client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            text += chunk.choices[0].text
            first = first or time.monotonic()
    assert first is not None, "no text came"
    return first, time.monotonic(), text


def complete(url: str, ids: list[int], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == max_tokens
    return r.choices[0].text


def test_four_sdk_streams_share_forward_steps(engine: Engine) -> None:
    """4 concurrent streams: every first token arrives before any stream ends, and the streams really ran in the
    same forward steps (the worker's batch counters: steps of 4 sequences, far fewer forwards than tokens)."""
    n, max_tokens = 4, 32
    with serve(engine, n) as (url, worker):
        start = threading.Barrier(n)
        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(lambda i: sdk_stream(url, prompt(i + 1, 20), max_tokens, start), range(n)))
        stats = worker.batch
    firsts, ends = [g[0] for g in got], [g[1] for g in got]
    assert max(firsts) < min(ends), f"firsts {firsts}, ends {ends}"
    assert stats.max_sequences == n
    # one request at a time would take n * (1 + max_tokens) forwards; shared steps take about 1 + max_tokens
    assert stats.forwards < 2 * (max_tokens + 1), stats
    assert stats.sequences / stats.forwards > 0.75 * n, stats
    assert stats.rows == n * 20 + n * (max_tokens - 1), stats  # prompts + every decoded token but the last


def test_batched_outputs_equal_one_at_a_time(engine: Engine) -> None:
    """Batching must not change results: the same greedy requests, concurrently, answer the same token for token
    with --parallel 1 (each forward one sequence) and --parallel 4 with a small prefill budget (a 700-token prompt
    read in 96-row chunks mixed into other streams' decode steps, chunks cut where the budget runs out)."""
    prompts = [prompt(1, 12), prompt(2, 700), prompt(3, 30), prompt(4, 5), prompt(5, 64), prompt(6, 9)]

    def answers(parallel: int, budget: int | None) -> tuple[list[str], object]:
        with serve(engine, parallel, budget) as (url, worker), ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda p: complete(url, p, 24), prompts)), worker.batch

    one, solo = answers(1, None)
    four, batched = answers(4, 96)
    assert all(one) and one == four
    assert solo.max_sequences == 1 and batched.max_sequences == 4 and batched.shared > 0
    assert batched.forwards < solo.forwards


LONG = 6000  # about 10 s of tiny-model prefill on a 2-core machine; chunks of 512 take a fraction of that


def test_long_prefill_cancelled_within_one_chunk_while_others_decode(engine: Engine) -> None:
    """Two streams decode while a 6000-token prompt is read chunk by chunk in the same steps; its client goes
    away mid-prefill: it stops within one chunk, and the two streams go on to the same answers as alone."""
    short = [prompt(11, 16), prompt(12, 16)]
    with serve(engine, 4) as (url, worker):
        alone = [complete(url, p, 48) for p in short]
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(sdk_stream, url, p, 48) for p in short]
            wait_for(lambda: len(worker.active) == 2 and not any(a.run.prefilling for a in worker.active),
                     "two streams decoding")
            before = len(worker.finished)
            ids = prompt(100, LONG)
            body = {"model": MODEL, "prompt": ids, "max_tokens": 4, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120):
                long_run = lambda: next((a.run for a in worker.active if a.run.ids[:1] == ids[:1]), None)  # noqa
                wait_for(lambda: long_run() is not None and long_run().chunks >= 1, "prefill started")
                seen = long_run().chunks
                shared_before = worker.batch.shared
                # the decoding streams share the long prompt's steps
                wait_for(lambda: worker.batch.shared > shared_before, "a step shared with the prefill")
            t0 = time.monotonic()  # leaving the block closed the connection mid-prefill
            wait_for(lambda: any(f.result.prompt_tokens == LONG for f in list(worker.finished)[before:]),
                     "the abandoned request ended", limit=30)
            cancel_s = time.monotonic() - t0
            texts = [f.result()[2] for f in futs]
    rec = next(f for f in list(worker.finished)[before:] if f.result.prompt_tokens == LONG)
    chunk = worker.max_prefill_rows
    assert rec.result.finish_reason == "cancelled" and rec.result.tokens == []
    assert rec.result.prefilled is not None and rec.result.prefilled <= (seen + 2) * chunk, (rec.result, seen)
    per_chunk = rec.result.prefill_s / max(1, rec.result.prefilled / chunk)
    assert cancel_s < 2 * per_chunk + 1.0, (cancel_s, per_chunk)
    assert texts == alone
