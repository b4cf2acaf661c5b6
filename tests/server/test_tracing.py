"""--otlp-traces-endpoint against an OTLP/HTTP receiver in this test (http.server on 127.0.0.1,
decoding ExportTraceServiceRequest with opentelemetry-proto): one span per request, a child of
the caller's W3C traceparent, with the request id, the model, the token counts the response
reported and the engine's latencies; unsampled callers get none, untraced ones a root span."""
from __future__ import annotations

import gzip
import json
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import ollama
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)

from jaxserve.server.tracing import traces_url
from serverlib import MODEL, running

CHAT = [{"role": "user", "content": "Name a color."}]


def _value(v):
    kind = v.WhichOneof("value")
    return [_value(x) for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)


class Receiver:
    """An OTLP/HTTP collector of one route, POST /v1/traces, keeping every span it is sent."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                if ok:
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def add(self, message: ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in message.resource_spans:
                resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(dict(
                            trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                            name=s.name, kind=s.kind, start=s.start_time_unix_nano, end=s.end_time_unix_nano,
                            attributes={kv.key: _value(kv.value) for kv in s.attributes}, resource=resource))

    def wait_for(self, match, count: int = 1, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = [s for s in self.spans if match(s)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    receiver = Receiver()
    folder = tmp_path_factory.mktemp("traced")
    # OTEL_BSP_SCHEDULE_DELAY: the SDK's batch processor sends every 50 ms rather than 5 s.
    with running(["--served-model-name", MODEL, "--otlp-traces-endpoint", receiver.endpoint], folder / "serve.log",
                 env={"OTEL_BSP_SCHEDULE_DELAY": "50"}) as srv:
        yield srv, receiver
    receiver.http.shutdown()


def _trace() -> tuple[str, str, str]:
    """(trace id, parent span id, request id) of a new caller."""
    return secrets.token_hex(16), secrets.token_hex(8), f"trace-test-{uuid.uuid4()}"


def _headers(trace_id: str, parent: str, xid: str, flags: str = "01") -> dict:
    return {"traceparent": f"00-{trace_id}-{parent}-{flags}", "X-Request-ID": xid}


def test_a_span_per_request_is_a_child_of_the_callers_trace_with_its_token_counts(traced):
    srv, receiver = traced
    calls = {}  # trace id -> (parent, xid, operation, prompt tokens, completion tokens, response id)

    t, p, x = _trace()
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, extra_headers=_headers(t, p, x))
    calls[t] = (p, x, "chat", chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.id)

    t, p, x = _trace()
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, extra_headers=_headers(t, p, x)))
    usage = chunks[-1].usage
    calls[t] = (p, x, "text_completion", usage.prompt_tokens, usage.completion_tokens, chunks[0].id)

    t, p, x = _trace()
    generated = ollama.Client(host=srv.url, headers=_headers(t, p, x)).generate(
        model=MODEL, prompt="Why is the sky blue?", options={"num_predict": 4})
    calls[t] = (p, x, "text_completion", generated.prompt_eval_count, generated.eval_count, None)

    t, p, x = _trace()
    with httpx.stream("POST", f"{srv.url}/api/chat", headers=_headers(t, p, x), timeout=120, json={
            "model": MODEL, "messages": CHAT, "options": {"num_predict": 3}}) as response:
        last = [json.loads(line) for line in response.iter_lines() if line][-1]
    calls[t] = (p, x, "chat", last["prompt_eval_count"], last["eval_count"], None)

    spans = receiver.wait_for(lambda s: s["trace_id"] in calls, count=len(calls))
    assert sorted(s["trace_id"] for s in spans) == sorted(calls)  # one span per request
    for span in spans:
        parent, xid, operation, prompt_tokens, completion_tokens, response_id = calls[span["trace_id"]]
        a = span["attributes"]
        assert span["parent_span_id"] == parent and span["kind"] == 2  # SPAN_KIND_SERVER
        assert span["name"] == f"{operation} {MODEL}" and a["gen_ai.operation.name"] == operation
        assert a["gen_ai.request.id"] == xid and a["gen_ai.request.model"] == a["gen_ai.response.model"] == MODEL
        assert a["gen_ai.usage.input_tokens"] == a["gen_ai.usage.prompt_tokens"] == prompt_tokens > 0
        assert a["gen_ai.usage.output_tokens"] == a["gen_ai.usage.completion_tokens"] == completion_tokens > 0
        assert response_id is None or a["gen_ai.response.id"] == response_id
        assert a["gen_ai.response.finish_reasons"] == ["length"]
        queue, ttft, e2e = (a[f"gen_ai.latency.{k}"] for k in ("time_in_queue", "time_to_first_token", "e2e"))
        assert 0 <= queue <= ttft <= e2e < 60
        assert (span["end"] - span["start"]) / 1e9 == pytest.approx(e2e, abs=1e-3)
        assert abs(span["end"] / 1e9 - time.time()) < 120  # the wall clock, not time.monotonic()
        assert span["resource"]["service.name"] == "jaxserve"


def test_an_unsampled_caller_gets_no_span_and_an_untraced_one_a_root_span(traced):
    srv, receiver = traced
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    unsampled, p, x = _trace()
    assert httpx.post(f"{srv.url}/v1/completions", json=body, headers=_headers(unsampled, p, x, flags="00"),
                      timeout=120).status_code == 200
    response = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
    xid = response.headers["x-request-id"]  # made by the server
    (span,) = receiver.wait_for(lambda s: s["attributes"]["gen_ai.request.id"] == xid)
    assert span["parent_span_id"] == "" and len(span["trace_id"]) == 32
    assert span["attributes"]["gen_ai.response.id"] == response.json()["id"]
    # Spans leave in the order they end: the unsampled request's would have come first.
    assert not [s for s in receiver.spans if s["trace_id"] == unsampled]


def test_the_collector_url_gets_the_otlp_path_only_when_it_has_none():
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("https://collector:4318/") == "https://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/custom/traces") == "http://collector:4318/custom/traces"


def test_a_collector_that_is_down_holds_up_neither_requests_nor_the_exit(tmp_path):
    from serverlib import ServerProcess, free_port

    srv = ServerProcess(["--served-model-name", MODEL, "--otlp-traces-endpoint", f"http://127.0.0.1:{free_port()}"],
                        tmp_path / "serve.log", env={"OTEL_BSP_SCHEDULE_DELAY": "50"})
    try:
        srv.wait_ready()
        for _ in range(3):
            started = time.monotonic()
            response = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                                  timeout=60)
            assert response.status_code == 200 and time.monotonic() - started < 5
        time.sleep(0.5)  # the exporter is retrying now
    finally:
        started = time.monotonic()
        assert srv.stop(timeout=60) == 0
    # Spans still queued get the server's shutdown timeout (5 s), not the SDK's 10 s of retries + 30 s.
    assert time.monotonic() - started < 12, srv.read_log()[-2000:]
    assert "spans not sent to" in srv.read_log()
