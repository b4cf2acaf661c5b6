"""Pieces of the app that need no server: the request log line, ServerConfig validation, the HTTP
settings handed to Sanic, and the --chat-template loader."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from jaxserve.async_engine import RequestRecord
from jaxserve.cli import _load_chat_template
from jaxserve.server.app import _log_record, create_app, run_server
from jaxserve.server.config import ServerConfig


def test_request_log_line_has_id_tokens_ttft_total_and_a_cut_prompt(caplog):
    record = RequestRecord("cmpl-1", "client-id", "x" * 50, 50, 7, arrival_time=10.0, first_token_time=10.25,
                           finish_time=11.5, finish_reasons=("stop",))
    with caplog.at_level(logging.INFO, logger="jaxserve.server"):
        _log_record(ServerConfig(("m",), max_log_len=5), record)
    (line,) = caplog.messages
    assert line == ("request client-id: prompt_tokens=50 generation_tokens=7 ttft=0.250s total=1.500s "
                    "finish=stop prompt='xxxxx'")
    assert record.time_per_output_token == pytest.approx(1.25 / 6)


@pytest.mark.parametrize("kwargs, words", [
    (dict(served_model_names=()), "served_model_names"),
    (dict(port=70000), "port"),
    (dict(log_level="loud"), "log_level"),
    (dict(max_queue=-1), "max_queue"),
    (dict(ssl_keyfile="/k.pem"), "together"),
    (dict(ssl_keyfile="/no/k.pem", ssl_certfile="/no/c.pem"), "does not exist"),
    (dict(allowed_origins=()), "allowed_origins must be a non-empty tuple"),
    (dict(allowed_methods=("GET, POST",)), "allowed_methods: 'GET, POST' is not an HTTP method"),
    (dict(allowed_headers=("x-a\r\n",)), "allowed_headers"),
    (dict(otlp_traces_endpoint="grpc://collector:4317"), "OTLP/HTTP collector"),
    (dict(otlp_traces_endpoint="collector:4318"), "otlp_traces_endpoint must be an http:// or https:// URL"),
    (dict(api_key=""), "api_key"),
    (dict(request_timeout=0), "request_timeout must be a number of seconds > 0"),
    (dict(keep_alive_timeout=float("nan")), "keep_alive_timeout"),
    (dict(shutdown_timeout="5"), "shutdown_timeout"),
    (dict(backlog=0), "backlog"),
])
def test_server_config_refuses_bad_values(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ServerConfig(**{"served_model_names": ("m",), **kwargs})


def test_the_http_timeouts_and_the_listen_backlog_reach_sanic(monkeypatch):
    engine = SimpleNamespace(max_model_len=64, stats=lambda: None)
    config = ServerConfig(("m",), request_timeout=7.0, keep_alive_timeout=3.0, backlog=4096)
    app = create_app(engine, SimpleNamespace(names=("m",), source="/m", size_bytes=0), config,
                     name="test-http-settings")
    # The response timeout starts as the request timeout (a body still arriving); the app lifts it
    # per request once the body is in (tests/server/test_burst.py checks both over HTTP).
    assert (app.config.REQUEST_TIMEOUT, app.config.RESPONSE_TIMEOUT, app.config.KEEP_ALIVE_TIMEOUT) == (7.0, 7.0, 3.0)
    ran = {}
    monkeypatch.setattr(type(app), "run", lambda self, **kwargs: ran.update(kwargs, app=self))
    run_server(app, config)
    assert ran["app"] is app and ran["backlog"] == 4096 and ran["single_process"] and (ran["host"], ran["port"]) == ("127.0.0.1", 8000)


def test_chat_template_from_a_file_or_inline(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert _load_chat_template(str(path)) == path.read_text()
    assert _load_chat_template("{{ messages }}") == "{{ messages }}"
    assert _load_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        _load_chat_template("/no/such/template.jinja")
