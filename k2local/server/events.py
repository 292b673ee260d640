"""Async glue between the worker's events and HTTP responses: waiting, streaming, SSE framing, usage."""
from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from k2local.server.worker import Done, Failed, Job, ServerEvent


async def _watch_disconnect(request: Request, *cancels: threading.Event) -> None:
    """Set `cancels` when the client goes away (non-streaming requests)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            for c in cancels:
                c.set()
            return


async def run_to_end(request: Request, job: Job, events: asyncio.Queue[ServerEvent]) -> Done:
    """Wait for the request's Done (raising its APIError if it Failed), cancelling it if the client goes away."""
    watcher = asyncio.create_task(_watch_disconnect(request, job.cancel))
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, Done):
                return ev
            if isinstance(ev, Failed):
                raise ev.error
    finally:
        watcher.cancel()
        job.cancel.set()


async def run_all_to_end(request: Request, jobs: list[Job], events: asyncio.Queue[tuple[int, ServerEvent]]
                         ) -> list[Done]:
    """:func:`run_to_end` for the n choices of one request (events tagged with the choice index)."""
    cancels = [j.cancel for j in jobs]
    watcher = asyncio.create_task(_watch_disconnect(request, *cancels))
    done: dict[int, Done] = {}
    try:
        while len(done) < len(jobs):
            i, ev = await events.get()
            if isinstance(ev, Done):
                done[i] = ev
            elif isinstance(ev, Failed):
                raise ev.error
        return [done[i] for i in range(len(jobs))]
    finally:
        watcher.cancel()
        for c in cancels:
            c.set()


async def stream_all(jobs: list[Job], events: asyncio.Queue[tuple[int, ServerEvent]]
                     ) -> AsyncIterator[tuple[int, ServerEvent]]:
    """The n choices' events as they come, up to each one's Done / Failed; cancels them all when the consumer
    stops early (client disconnect)."""
    try:
        left = len(jobs)
        while left:
            i, ev = await events.get()
            yield i, ev
            if isinstance(ev, (Done, Failed)):
                left -= 1
    finally:
        for j in jobs:
            j.cancel.set()


@dataclass(frozen=True)
class Idle:
    """No event from the worker for ``idle`` seconds (a long prefill, a slow token): a stream sends a keep-alive
    (Anthropic's ``ping`` event), so clients that drop a silent stream keep waiting."""

    waited: float


async def stream_events(job: Job, events: asyncio.Queue[ServerEvent], idle: float | None = None
                        ) -> AsyncIterator[ServerEvent | Idle]:
    """Events up to and including Done / Failed; cancels the job when the consumer stops early (client disconnect).
    With ``idle`` (seconds), an :class:`Idle` comes each time that long passes without an event."""
    try:
        waited = 0.0
        while True:
            if idle is None:
                ev: ServerEvent | Idle = await events.get()
            else:
                try:
                    ev = await asyncio.wait_for(events.get(), idle)
                    waited = 0.0
                except asyncio.TimeoutError:
                    waited += idle
                    ev = Idle(waited)
            yield ev
            if isinstance(ev, (Done, Failed)):
                return
    finally:
        job.cancel.set()


def sse(data: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_json(d: Done, *more: Done) -> dict:
    """OpenAI usage of one answer, or of n choices of one prompt (the prompt counted once)."""
    completion = d.completion_tokens + sum(m.completion_tokens for m in more)
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": completion,
            "total_tokens": d.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": d.cached_tokens}}


def openai_finish(d: Done) -> str:
    return "stop" if d.finish_reason == "cancelled" else d.finish_reason


def stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
