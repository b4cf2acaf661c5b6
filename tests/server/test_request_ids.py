"""X-Request-ID over HTTP: the client's id (or a new one) comes back on every route, streamed or
not, errors and preflights included, and the server's log lines written for a request name it
([xid=...]); the logging filter on its own."""
from __future__ import annotations

import logging
import re
import time
import uuid

import httpx
import pytest

from jaxserve.server import request_ids
from serverlib import MODEL

CHAT = [{"role": "user", "content": "Say hi."}]
# (method, path, JSON body, expected status): every route of the default server, and its errors.
ROUTES = [
    ("GET", "/health", None, 200),
    ("HEAD", "/health", None, 200),
    ("GET", "/metrics", None, 200),
    ("GET", "/version", None, 200),
    ("GET", "/v1/models", None, 200),
    ("GET", f"/v1/models/{MODEL}", None, 200),
    ("GET", "/api/tags", None, 200),
    ("GET", "/api/ps", None, 200),
    ("GET", "/api/version", None, 200),
    ("POST", "/api/show", {"model": MODEL}, 200),
    ("POST", "/tokenize", {"model": MODEL, "prompt": "hello"}, 200),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}, 200),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3}, 200),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True}, 200),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 3}, 200),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True}, 200),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 3}, "stream": False}, 200),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"num_predict": 3}}, 200),
    ("POST", "/api/chat", {"model": MODEL, "messages": CHAT, "options": {"num_predict": 3}, "stream": False}, 200),
    ("POST", "/api/chat", {"model": MODEL, "messages": CHAT, "options": {"num_predict": 3}}, 200),
    # errors: of the route, of the body, of the model; in both API formats
    ("GET", "/no/such/route", None, 404),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/chat/completions", {"model": MODEL}, 400),
    ("POST", "/v1/completions", {"model": "no-such-model", "prompt": "Hi"}, 404),
    ("POST", "/api/generate", {"model": MODEL, "prompt": "Hi", "options": {"temperature": "hot"}}, 400),
    ("POST", "/v1/embeddings", {"model": MODEL, "input": "Hi"}, 400),
    ("POST", "/v1/chat/completions", b"{not json", 400),
]


def _send(client: httpx.Client, method: str, path: str, body, headers: dict) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    json_body = None if isinstance(body, bytes) else body
    with client.stream(method, path, json=json_body, content=content, headers=headers) as response:
        response.read()  # a streamed body to its end: the id came with the head
        return response


def _label(method: str, path: str, body, status: int) -> str:
    streamed = isinstance(body, dict) and body.get("stream", path.startswith("/api/"))  # Ollama streams by default
    return f"{method} {path}{' stream' if streamed else ''} {status}"


@pytest.mark.parametrize("method, path, body, status", ROUTES, ids=[_label(*route) for route in ROUTES])
def test_every_route_echoes_the_request_id_or_makes_one(server, method, path, body, status):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        given = f"client-{uuid.uuid4()}"
        response = _send(client, method, path, body, {"X-Request-ID": given})
        assert response.status_code == status, response.text[:300]
        assert response.headers["x-request-id"] == given
        made = [_send(client, method, path, body, {}).headers["x-request-id"] for _ in range(2)]
        assert all(re.fullmatch(r"[0-9a-f]{32}", m) for m in made) and made[0] != made[1]


def test_a_preflight_and_a_streamed_response_carry_the_id(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": "http://page.example", "Access-Control-Request-Method": "POST", "X-Request-ID": "pre-1"})
        assert preflight.status_code == 204 and preflight.headers["x-request-id"] == "pre-1"
        with client.stream("POST", "/v1/chat/completions", headers={"X-Request-ID": "sse-1"}, json={
                "model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True}) as response:
            assert response.headers["x-request-id"] == "sse-1"  # before the first event is read
            events = [line for line in response.iter_lines() if line]
        assert events[-1] == "data: [DONE]"


def test_the_log_lines_of_a_request_name_its_id(server):
    xid = f"log-{uuid.uuid4()}"
    response = httpx.post(f"{server.url}/api/generate", headers={"X-Request-ID": xid}, timeout=120, json={
        "model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2, "no_such_option": 1}})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server.read_log().splitlines() if f"[xid={xid}]" in line]
        if len(lines) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # A warning the route wrote, and the request line written when the engine request ended.
    assert any("ignoring unknown Ollama options: 'no_such_option'" in line for line in lines), lines
    assert any(f"request {xid}: prompt_tokens=" in line for line in lines), lines
    started = next(line for line in server.read_log().splitlines() if "serving as" in line)
    assert "[xid=" not in started  # a line of no request has no tag
    # The start-up heap is out of the collector's sight (a full collection walked it in ~110 ms).
    frozen = re.search(r"\((\d+) start-up objects frozen out of garbage collection\)", started)
    assert frozen and int(frozen.group(1)) > 50_000, started
    # serve set the heap up before it started JAX's backends (JAXSERVE_HOST_HEAP=retain, conftest.py).
    heap = next(line for line in server.read_log().splitlines() if "host heap:" in line)
    assert "host heap: one arena keeps the blocks XLA:CPU frees" in heap, heap


def test_the_filter_tags_records_of_the_current_request_or_the_named_one():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logging.Formatter("%(name)s%(xid_tag)s: %(message)s"))
    handler.addFilter(request_ids.XidFilter())
    log = logging.getLogger("jaxserve.test_request_ids")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("outside")
        log.warning("from the engine thread", extra={"xid": "abc"})
        request = type("FakeRequest", (), {})()
        request.headers, request.ctx = {"x-request-id": "r" * 300}, type("Ctx", (), {})()
        assert request_ids.begin(request) == "r" * 200  # cut: it is echoed and logged
        log.warning("inside")
    finally:
        request_ids._current.set(None)
        log.removeHandler(handler)
    assert records == ["jaxserve.test_request_ids: outside",
                       "jaxserve.test_request_ids [xid=abc]: from the engine thread",
                       f"jaxserve.test_request_ids [xid={'r' * 200}]: inside"]
