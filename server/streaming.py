"""One response writer for every generation route: engine deltas -> a stream (SSE or NDJSON) or one
JSON body.

`respond` reads the deltas of a response's engine requests as they arrive (`merged`) and hands each
completion's delta to the route's `Shape`, which says what the API makes of it: the objects to
stream now (`chunks`), or what to remember for the single body (`add`, `body`). The writer owns
the framing, the closing `[DONE]`, an engine fault or a late refusal reported inside a stream
already under way, and closing the engine requests whatever happens (a client that leaves frees
its KV pages). /v1/completions, /v1/chat/completions, /api/generate and /api/chat are shapes.
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from sanic import Request
from sanic.response import json as json_response

from jaxserve.async_engine import EngineStepError
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.server.validation import RequestError


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Shape:
    """What one API makes of a response's deltas. `prompt_index` says which engine request (one
    per prompt of a /v1/completions request) a delta belongs to."""

    def opening(self) -> list[dict]:
        """Stream objects before any token (OpenAI chat's role chunks)."""
        return []

    def chunks(self, prompt_index: int, out: RequestOutput, c: CompletionOutput) -> list[dict]:
        """Stream objects for one completion's delta (none: it carries nothing to show)."""
        raise NotImplementedError

    def closing(self) -> list[dict]:
        """Stream objects after the last delta (usage)."""
        return []

    def add(self, prompt_index: int, out: RequestOutput, c: CompletionOutput) -> None:
        """Remember one completion's delta for the single body."""
        raise NotImplementedError

    def body(self) -> dict:
        """The single JSON body, once every request finished."""
        raise NotImplementedError

    def error(self, error: RequestError | EngineStepError) -> dict:
        """The error object sent inside a stream already under way."""
        raise NotImplementedError


class Framing:
    def __init__(self, content_type: str, line: str, done: str | None = None):
        self.content_type = content_type
        self.line = line    # one object's framing, "{}" the JSON
        self.done = done    # sent once after the last object, if any

    def frame(self, obj: dict) -> str:
        return self.line.replace("{}", dumps(obj), 1)


SSE = Framing("text/event-stream", "data: {}\n\n", "data: [DONE]\n\n")
NDJSON = Framing("application/x-ndjson", "{}\n")


async def merged(streams) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, delta) from several request streams as they arrive; closes them all at the end."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                inbox.put_nowait((i, out))
            inbox.put_nowait((i, None))
        except Exception as e:
            inbox.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def respond(request: Request, streams: list, shape: Shape, *, stream: bool, framing: Framing = SSE):
    """The response of `streams` (the engine requests of one API request) in `shape`: streamed in
    `framing`, or one JSON body. The streams are closed on every way out."""
    try:
        if not stream:
            async for i, out in merged(streams):
                for c in out.outputs:
                    shape.add(i, out, c)
            return json_response(shape.body())
        headers = {"Cache-Control": "no-cache"} if framing is SSE else None
        response = await request.respond(content_type=framing.content_type, headers=headers)
        try:
            for obj in shape.opening():
                await response.send(framing.frame(obj))
            async for i, out in merged(streams):
                for c in out.outputs:
                    for obj in shape.chunks(i, out, c):
                        await response.send(framing.frame(obj))
            for obj in shape.closing():
                await response.send(framing.frame(obj))
        except (RequestError, EngineStepError) as e:  # the stream is under way: say so inside it
            await response.send(framing.frame(shape.error(e)))
        if framing.done is not None:
            await response.send(framing.done)
        await response.eof()
        return None
    finally:
        for s in streams:
            s.close()
