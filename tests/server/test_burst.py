"""Overload and long requests over HTTP. A burst of many times --max-queue gets an answer for every
request: 200 with a whole body, or 503 in its API's format within a second of sending; no
connection is dropped and /health stays prompt. A generation that outlasts the HTTP timeouts
completes, streamed or not, while a stalled head, a stalled body and an idle connection are closed.

The timeout tests serve the real app over a scripted engine (no JAX: ``python test_burst.py PORT``
below) so that their server starts in a second with timeouts of one second.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from serverlib import MODEL, free_port, running

MAX_QUEUE = 4
BURST = 72  # 6x the 12 sequences that fit (8 running, --max-num-seqs of the test engine, + 4 waiting)
PROMPT_WAIT = 1.0  # seconds a refusal, or /health, may take
HTTP_TIMEOUT = 1.0  # the scripted server's request and keep-alive timeouts
STEP_SECONDS = 1.5  # the scripted engine's step: each token comes later than HTTP_TIMEOUT
CLI_REQUEST_TIMEOUT = 2.0  # `jaxserve serve --request-timeout` of the burst server


def _request(i: int) -> tuple[str, dict]:
    """Request i of the burst: the four generating routes in turn, streamed and not."""
    stream, say = (i // 4) % 2 == 1, f"Say something about the number {i}."
    kind = i % 4
    if kind == 0:
        return "/v1/completions", {"model": MODEL, "prompt": say, "max_tokens": 6, "stream": stream}
    if kind == 1:
        return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": say}],
                                        "max_tokens": 6, "stream": stream}
    if kind == 2:
        return "/api/generate", {"model": MODEL, "prompt": say, "options": {"num_predict": 6}, "stream": stream}
    return "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": say}],
                         "options": {"num_predict": 6}, "stream": stream}


def _check_whole_body(path: str, streamed: bool, text: str) -> None:
    """A 200's body is complete: the SSE stream ends in [DONE], the NDJSON stream in done, every
    completion has its finish reason."""
    if path.startswith("/v1/"):
        if streamed:
            events = [block.removeprefix("data: ") for block in text.split("\n\n") if block]
            assert events[-1] == "[DONE]", text[-200:]
            chunks = [json.loads(e) for e in events[:-1]]
            assert "error" not in chunks[-1]
            assert [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]] in (
                ["stop"], ["length"])
        else:
            (choice,) = json.loads(text)["choices"]
            assert choice["finish_reason"] in ("stop", "length")
            assert isinstance(choice["text"] if path == "/v1/completions" else choice["message"]["content"], str)
    else:
        objects = [json.loads(line) for line in text.splitlines()] if streamed else [json.loads(text)]
        assert objects[-1]["done"] is True and objects[-1]["done_reason"] in ("stop", "length")
        assert not any(o["done"] for o in objects[:-1])


def _check_refusal(path: str, text: str) -> None:
    body = json.loads(text)
    if path.startswith("/v1/"):
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "server_error"
        assert "--max-queue" in body["error"]["message"]
    else:
        assert set(body) == {"error"} and "--max-queue" in body["error"]


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("burst")
    with running(["--served-model-name", MODEL, "--max-queue", str(MAX_QUEUE),
                 "--request-timeout", str(CLI_REQUEST_TIMEOUT)], folder / "serve.log") as srv:
        yield srv


def test_a_burst_gets_every_answer_and_its_overflow_refused_within_a_second(small_queue):
    async def main():
        # No pool limit: every request has its own connection, all opened at once.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=small_queue.url, timeout=120, limits=limits) as http:
            go, burst_over = asyncio.Event(), asyncio.Event()

            async def one(i):
                path, body = _request(i)
                await go.wait()
                sent = time.monotonic()
                async with http.stream("POST", path, json=body) as r:
                    text = (await r.aread()).decode()
                return path, body["stream"], r.status_code, text, time.monotonic() - sent

            async def poll_health():
                waits = []
                await go.wait()
                while not burst_over.is_set():
                    sent = time.monotonic()
                    status = (await http.get("/health")).status_code
                    waits.append((status, time.monotonic() - sent))
                    await asyncio.sleep(0.1)
                return waits

            tasks = [asyncio.ensure_future(one(i)) for i in range(BURST)]
            health = asyncio.ensure_future(poll_health())
            await asyncio.sleep(0.2)  # every task is waiting on the same event: released at once
            go.set()
            answers = await asyncio.gather(*tasks)  # a dropped connection raises here
            burst_over.set()
            return answers, await health

    answers, health = asyncio.run(main())
    statuses = [a[2] for a in answers]
    assert set(statuses) <= {200, 503}, statuses
    # At most 12 sequences fit at once; requests that finish early make room for a few more.
    assert 12 <= statuses.count(200) < BURST // 2 and statuses.count(503) > BURST // 2
    for path, streamed, status, text, seconds in answers:
        if status == 200:
            _check_whole_body(path, streamed, text)
        else:
            _check_refusal(path, text)
            assert seconds < PROMPT_WAIT, (path, seconds)
    assert {p for p, _, s, _, _ in answers if s == 200} == {p for p, *_ in answers}  # every route served
    assert len(health) >= 3 and all(status == 200 and seconds < PROMPT_WAIT for status, seconds in health), health


def test_a_completion_longer_than_the_cli_request_timeout_completes(small_queue):
    started = time.monotonic()
    r = httpx.post(f"{small_queue.url}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True})
    seconds = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 200 and seconds > CLI_REQUEST_TIMEOUT, seconds


# ---- HTTP timeouts, over a scripted engine ---------------------------------------------------------

@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """The app over test_async_engine's FakeEngine (one token per STEP_SECONDS), with timeouts of
    HTTP_TIMEOUT seconds."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("scripted") / "serve.log"
    log = open(log_path, "w")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port)], stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here)])})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scripted server did not start:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield port, url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_generations_slower_than_the_http_timeouts_complete_streamed_or_not(scripted):
    _, url = scripted

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            async def plain():
                r = await http.post("/v1/completions", json={"model": "fake", "prompt": [1, 2], "max_tokens": 3})
                return r.status_code, r.json()

            async def streamed():
                async with http.stream("POST", "/api/generate", json={
                        "model": "fake", "raw": True, "context": [1, 2], "options": {"num_predict": 3}}) as r:
                    return r.status_code, [json.loads(line) async for line in r.aiter_lines() if line]

            started = time.monotonic()
            results = await asyncio.gather(plain(), streamed())
            return results, time.monotonic() - started

    ((status, body), (stream_status, objects)), seconds = asyncio.run(main())
    # 3 steps of 1.5 s: the non-streamed answer waits 4.5 s for its first byte, and the streamed
    # one 1.5 s between lines, both well past the 1 s timeouts.
    assert seconds > 3 * HTTP_TIMEOUT
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert body["choices"][0]["text"] == "w0 w1 w2 " and body["choices"][0]["finish_reason"] == "length"
    assert stream_status == 200 and objects[-1]["done"] is True and objects[-1]["eval_count"] == 3
    assert "".join(o["response"] for o in objects) == "w0 w1 w2 "


def _read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    sock.settimeout(limit)
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


@pytest.mark.parametrize("sent, status", [
    # Headers that promise a body which never finishes arriving.
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 100\r\n\r\n{\"prompt\": [1", b"408"),
    (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"", b"408"),
    # A head that never ends.
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", b"408"),
    # A whole request, then the connection left idle: answered, then closed without a word.
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
])
def test_stalled_and_idle_connections_are_closed_after_the_timeout(scripted, sent, status):
    port, _ = scripted
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        data, seconds = _read_until_closed(sock, limit=10)
    assert data.split(b"\r\n", 1)[0] == b"HTTP/1.1 " + status + (b" OK" if status == b"200" else b" Request Timeout")
    assert HTTP_TIMEOUT * 0.9 < seconds < HTTP_TIMEOUT + 2  # Sanic checks its timeouts every 0.5 s here
    if b"/v1/" in sent:
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    elif b"/api/" in sent:
        assert "did not arrive" in json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]


def _serve_scripted(port: int) -> None:
    from test_async_engine import FakeEngine

    from jaxserve.async_engine import AsyncEngine
    from jaxserve.server.app import create_app, run_server
    from jaxserve.server.config import ServerConfig
    from jaxserve.server.model_card import ModelCard

    config = ServerConfig(("fake",), port=port, request_timeout=HTTP_TIMEOUT, keep_alive_timeout=HTTP_TIMEOUT)
    card = ModelCard(names=("fake",), source="scripted", family="llama", format="gguf", num_params=0,
                     quantization="F32", size_bytes=0, digest="0" * 64, modified_at="2026-01-01T00:00:00Z",
                     created=0, max_model_len=64, chat_template=None, model_info={}, stop=())
    run_server(create_app(AsyncEngine(FakeEngine(step_seconds=STEP_SECONDS)), card, config), config)


if __name__ == "__main__":
    _serve_scripted(int(sys.argv[1]))
