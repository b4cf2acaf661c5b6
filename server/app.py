"""The Sanic app factory: routes of both API families over the served model's AsyncEngine and the
models loaded on demand beside it (server/model_pool.py), and the middleware
every route shares (request ids, API key, CORS, errors in the caller's API format, request logs
and spans).

Single process: ``run_server(create_app(...), config)``; the engine thread starts with the server
and stops (ending every open stream) when it shuts down.
"""
from __future__ import annotations

import hmac
import logging
import math
import time

from sanic import HTTPResponse, Request, Sanic
from sanic.exceptions import SanicException, ServiceUnavailable
from sanic.response import json as json_response

from jaxserve.async_engine import (AsyncEngine, EngineClosedError, QueueFullError, RequestRecord,
                                   RequestRefusedError)
from jaxserve.model_store import ModelStore
from jaxserve.server import ollama_protocol, openai_protocol, request_ids
from jaxserve.server.chat import ChatOutputFormats
from jaxserve.server.config import ServerConfig
from jaxserve.server.cors import Cors
from jaxserve.server.metrics import CONTENT_TYPE, Metrics
from jaxserve.server.embedding_routes import bp as embedding_bp
from jaxserve.server.lora_routes import bp as lora_bp
from jaxserve.server.model_card import ModelCard
from jaxserve.server.model_pool import KEEP_ALIVE_DEFAULT, LoadedModel, Loader, ModelPool
from jaxserve.server.ollama_routes import bp as ollama_bp
from jaxserve.server.openai_routes import bp as openai_bp
from jaxserve.server.store_routes import bp as store_bp
from jaxserve.server.validation import RequestError

logger = logging.getLogger("jaxserve.server")
_OPEN_PATHS = ("/health",)


def _is_ollama(request: Request) -> bool:
    return request.path.startswith("/api/")


def error_response(request: Request, status: int, message: str, *, kind: str | None = None,
                   param: str | None = None, code: str | None = None) -> HTTPResponse:
    """An error in the format of the API family the path belongs to."""
    if _is_ollama(request):
        return json_response(ollama_protocol.error_body(message), status=status)
    if kind is None:  # OpenAI itself answers 401 and 404 with invalid_request_error too
        kind = "invalid_request_error" if status < 500 else "server_error"
    return json_response(openai_protocol.error_body(message, kind=kind, param=param, code=code), status=status)


def _log_record(config: ServerConfig, record: RequestRecord) -> None:
    prompt = record.prompt
    if prompt is not None and config.max_log_len is not None:
        prompt = prompt[:config.max_log_len]
    ttft = f"{record.ttft:.3f}s" if record.ttft is not None else "-"
    logger.info("request %s: prompt_tokens=%d generation_tokens=%d ttft=%s total=%.3fs finish=%s prompt=%r",
                record.log_id, record.num_prompt_tokens, record.num_generation_tokens, ttft, record.e2e,
                ",".join(record.finish_reasons), prompt)


def _connection(request: Request):
    """The HTTP/1.1 connection (Sanic's protocol object) a request came on; None under ASGI."""
    get_protocol = getattr(request.transport, "get_protocol", None)
    connection = get_protocol() if get_protocol is not None else None
    return connection if hasattr(connection, "response_timeout") else None


def _set_timeouts(app: Sanic, config: ServerConfig) -> None:
    """No HTTP timeout cuts off the engine's work; stalled clients still are.

    Sanic applies REQUEST_TIMEOUT while the head arrives, but RESPONSE_TIMEOUT both while the body
    arrives and while the handler runs, each counted from the last byte in or out. So
    RESPONSE_TIMEOUT starts each request as the request timeout, and once the body is in (request
    middleware runs after it) it is lifted for that connection until its next request arrives.
    """
    app.config.REQUEST_TIMEOUT = config.request_timeout
    app.config.RESPONSE_TIMEOUT = config.request_timeout
    app.config.KEEP_ALIVE_TIMEOUT = config.keep_alive_timeout

    @app.signal("http.lifecycle.request")
    async def body_may_stall(request: Request):
        if (connection := _connection(request)) is not None:
            connection.response_timeout = config.request_timeout

    @app.on_request
    async def body_is_in(request: Request):
        request.ctx.body_received = True
        if (connection := _connection(request)) is not None:
            connection.response_timeout = math.inf


def run_server(app: Sanic, config: ServerConfig) -> None:
    """Serve ``app`` in this process until SIGINT/SIGTERM."""
    ssl = {"cert": config.ssl_certfile, "key": config.ssl_keyfile} if config.ssl_certfile else None
    # A burst connects faster than one event loop accepts: past Sanic's listen backlog of 100 the
    # kernel drops the handshakes, and clients retry them only a second or more later.
    app.run(host=config.host, port=config.port, single_process=True, access_log=False, motd=False, ssl=ssl,
            debug=False, backlog=config.backlog)


def create_app(engine: AsyncEngine, card: ModelCard, config: ServerConfig, *, name: str = "jaxserve",
               store: ModelStore | None = None, loader: Loader | None = None, max_loaded_models: int = 3,
               models_memory: int | None = None, keep_alive: float = KEEP_ALIVE_DEFAULT,
               engine_bytes: int | None = None) -> Sanic:
    """``store``: the models /api/create writes and requests may name (default ModelStore(): JAXSERVE_MODELS).
    ``loader``: loads other weights on demand (server/model_pool.py; None: this model only), at most
    ``max_loaded_models`` at once (this one included) in ``models_memory`` bytes, each kept
    ``keep_alive`` seconds after its last request unless the request says otherwise.
    ``engine_bytes``: this model's weights and KV cache (default: its files' size)."""
    app = Sanic(name)
    app.config.REQUEST_MAX_SIZE = config.max_request_bytes
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.shutdown_timeout
    app.config.FALLBACK_ERROR_FORMAT = "json"
    _set_timeouts(app, config)
    metrics = Metrics(engine, card.names[0])
    app.ctx.engine, app.ctx.card, app.ctx.config, app.ctx.metrics = engine, card, config, metrics
    app.ctx.chat_output = ChatOutputFormats.of(config, card, getattr(engine, "tokenizer", None))
    tracer = None
    if config.otlp_traces_endpoint is not None:
        from jaxserve.server.tracing import RequestTracer  # the OpenTelemetry SDK loads only when asked for

        tracer = RequestTracer(config.otlp_traces_endpoint, card.names[0])
        logger.info("tracing: a span per request to %s (OTLP/HTTP)", tracer.url)

    def watch(model: LoadedModel) -> None:
        """Metrics, request logs and spans of a loaded model's engine."""
        label = model.card.names[0]

        def on_request_done(record: RequestRecord) -> None:
            metrics.observe(record, label)
            if config.log_requests:
                _log_record(config, record)
            if tracer is not None:  # called in the task of the HTTP request the record belongs to
                tracer.export(record, request_ids.current_request())

        model.engine.on_request_done = on_request_done
        model.engine.on_step = lambda seconds: metrics.observe_step(seconds, label)
        metrics.add_engine(model.engine, label)

    app.ctx.store = store if store is not None else ModelStore()
    served = LoadedModel(ModelPool.key_of(card.source), engine, card, app.ctx.chat_output,
                         size=engine_bytes or card.size_bytes, chat_template=config.chat_template, pinned=True)
    watch(served)
    app.ctx.pool = ModelPool(served, loader, max_loaded=max_loaded_models, memory_budget=models_memory,
                             keep_alive=keep_alive, on_load=watch,
                             on_unload=lambda model: metrics.remove_engine(model.card.names[0]))
    app.ctx.adapter_locks = {}  # a stored model's adapter name -> the lock of its first registration
    api_key = config.api_key.encode() if config.api_key else None
    cors = Cors(config.allowed_origins, config.allowed_methods, config.allowed_headers, config.allow_credentials)

    @app.signal("http.lifecycle.request")
    async def name_request(request: Request):
        # First thing once the head is in, so that every log line of the request carries its id.
        request_ids.begin(request)

    @app.on_request
    async def before(request: Request):
        request.ctx.start = time.monotonic()
        if cors.is_preflight(request.method, request.headers):  # before the API key: browsers send none
            headers, refusal = cors.preflight(request.headers)
            if refusal is None:
                return HTTPResponse(status=204, headers=headers)
            response = error_response(request, 400, refusal, code="cors_refused")
            response.headers.update(headers)
            return response
        if api_key is not None and request.path not in _OPEN_PATHS:
            given = request.headers.get("authorization", "")
            token = given[7:].encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, api_key):
                raise RequestError("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                   status=401, code="invalid_api_key")

    @app.on_response
    async def after(request: Request, response: HTTPResponse):
        # Runs as a streamed response's head goes out too (request.respond).
        response.headers[request_ids.HEADER] = getattr(request.ctx, "request_id", None) or request_ids.begin(request)
        if not cors.is_preflight(request.method, request.headers):
            response.headers.update(cors.response_headers(request.headers.get("origin")))

    @app.exception(Exception)
    async def on_error(request: Request, error: Exception):
        if isinstance(error, RequestError):
            return error_response(request, error.status, error.message, kind=error.kind, param=error.param,
                                  code=error.code)
        if isinstance(error, QueueFullError):
            return error_response(request, 503, str(error), code="queue_full")
        if isinstance(error, EngineClosedError):
            return error_response(request, 503, str(error), code="shutting_down")
        if isinstance(error, RequestRefusedError):  # the engine validates last (token ids, KV pages...)
            return error_response(request, 400, str(error), param=error.param, code=error.code)
        if isinstance(error, ServiceUnavailable) and not getattr(request.ctx, "body_received", False):
            # Sanic's response timeout struck while the body was still arriving: the client stalled.
            # Sanic would wait for the rest of the body before closing; there is nothing to wait for.
            if request.stream is not None and hasattr(request.stream, "request_body"):
                request.stream.request_body = None
            return error_response(request, 408, f"the request body did not arrive within "
                                  f"{config.request_timeout:g} s", code="request_timeout")
        if isinstance(error, SanicException):
            status = error.status_code
            message = {404: f"route {request.method} {request.path} not found",
                       405: f"method {request.method} not allowed on {request.path}",
                       413: f"request body larger than {config.max_request_bytes} bytes"}.get(status, str(error))
            return error_response(request, status, message)
        logger.exception("internal error on %s %s", request.method, request.path)
        return error_response(request, 500, "internal server error")

    @app.post("/start_profile")
    async def start_profile(request: Request):
        if engine.profiler_dir is None:  # as vLLM: the routes exist only when a directory is set
            raise RequestError(f"route POST {request.path} not found: start the server with --profiler-dir "
                               "(or JAXSERVE_PROFILER_DIR) to profile", status=404)
        try:
            folder = await engine.start_profile()
        except RuntimeError as e:  # one is already running
            raise RequestError(str(e), status=409) from None
        return json_response({"status": "profiling", "trace_dir": folder})

    @app.post("/stop_profile")
    async def stop_profile(request: Request):
        if engine.profiler_dir is None:
            raise RequestError(f"route POST {request.path} not found: start the server with --profiler-dir "
                               "(or JAXSERVE_PROFILER_DIR) to profile", status=404)
        try:
            run = await engine.stop_profile()
        except RuntimeError as e:  # none is running
            raise RequestError(str(e), status=409) from None
        return json_response({"status": "stopped", "trace": run})

    @app.get("/metrics")
    async def metrics_route(request: Request):
        return HTTPResponse(metrics.render(), content_type=CONTENT_TYPE)

    app.blueprint(openai_bp)
    app.blueprint(ollama_bp)
    app.blueprint(embedding_bp)
    app.blueprint(lora_bp)
    app.blueprint(store_bp)

    @app.before_server_start
    async def start_engine(app):
        engine.start()
        app.add_task(app.ctx.pool.reap(), name="jaxserve-keep-alive")

    @app.before_server_stop
    async def stop_engine(app):
        # Ends every open stream (finish_reason "abort") so the graceful shutdown is quick.
        await app.ctx.pool.close()
        await engine.shutdown(timeout=config.shutdown_timeout)

    @app.after_server_stop
    async def stop_tracing(app):
        if tracer is not None:  # the spans of the requests that ended last, aborted ones too
            tracer.shutdown(timeout=config.shutdown_timeout)

    return app
