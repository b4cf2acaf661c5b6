"""OpenTelemetry spans of finished engine requests (--otlp-traces-endpoint, vLLM's flag), exported
over OTLP/HTTP (protobuf) by the SDK's batch processor on its own thread.

As vLLM does, a span is made when its request ends, from the times the engine reported (arrival,
first token, finish; RequestRecord), as a child of the HTTP request's W3C `traceparent`. Its
attributes follow the OpenTelemetry GenAI conventions (gen_ai.usage.input_tokens, ...), with
vLLM's names beside them (gen_ai.request.id, gen_ai.usage.prompt_tokens, gen_ai.latency.*) so that
dashboards built on vLLM's spans read these too.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sanic import Request

from jaxserve.async_engine import RequestRecord

logger = logging.getLogger("jaxserve.server.tracing")
TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for spans
# gen_ai.operation.name by route; a span is named "{operation} {model}".
OPERATIONS = {"/v1/chat/completions": "chat", "/api/chat": "chat", "/v1/completions": "text_completion",
              "/api/generate": "text_completion", "/v1/embeddings": "embeddings", "/api/embed": "embeddings",
              "/api/embeddings": "embeddings"}


def traces_url(endpoint: str) -> str:
    """The collector's span URL: a bare http://host:4318 gets OTLP's /v1/traces."""
    url = urllib.parse.urlsplit(endpoint)
    return endpoint if url.path not in ("", "/") else url._replace(path=TRACES_PATH).geturl()


class RequestTracer:
    def __init__(self, endpoint: str, default_model: str):
        self.url = traces_url(endpoint)
        self.default_model = default_model
        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply
        if resource.attributes[SERVICE_NAME].startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "jaxserve"}))
        # The default sampler follows the caller's sampled flag; OTEL_TRACES_SAMPLER and the
        # OTEL_BSP_* batch settings apply as in any OpenTelemetry SDK.
        self.provider = TracerProvider(resource=resource)
        self.exporter = OTLPSpanExporter(endpoint=self.url)
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("jaxserve")
        self.propagator = TraceContextTextMapPropagator()

    def export(self, record: RequestRecord, request: Request | None) -> None:
        """Queue the span of a finished request; `request` is the HTTP request it served (its
        traceparent, route and model), None when it is not known."""
        parent = self.propagator.extract(request.headers) if request is not None else None
        operation = OPERATIONS.get(request.path, "text_completion") if request is not None else "text_completion"
        model = getattr(request.ctx, "model", None) if request is not None else None
        model = model or self.default_model
        attributes = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.request.id": record.log_id,        # X-Request-ID, as vLLM's
            "gen_ai.response.id": record.request_id,   # the response body's id
            "gen_ai.usage.input_tokens": record.num_prompt_tokens,
            "gen_ai.usage.output_tokens": record.num_generation_tokens,
            "gen_ai.usage.prompt_tokens": record.num_prompt_tokens,          # vLLM's names
            "gen_ai.usage.completion_tokens": record.num_generation_tokens,
            "gen_ai.response.finish_reasons": list(record.finish_reasons),
            "gen_ai.latency.e2e": record.e2e,
        }
        if record.ttft is not None:
            attributes["gen_ai.latency.time_to_first_token"] = record.ttft
        if record.queue_time is not None:
            attributes["gen_ai.latency.time_in_queue"] = record.queue_time
        # The record's times are time.monotonic(); spans want the wall clock in nanoseconds.
        offset = time.time_ns() - time.monotonic_ns()
        span = self.tracer.start_span(f"{operation} {model}", context=parent, kind=SpanKind.SERVER,
                                      attributes=attributes, start_time=int(record.arrival_time * 1e9) + offset)
        span.end(end_time=int(record.finish_time * 1e9) + offset)

    def shutdown(self, timeout: float) -> None:
        """Send the spans still queued, waiting at most `timeout` seconds for the collector, then stop.

        The SDK's own flush waits as long as the exporter retries (10 s by default), and its
        shutdown up to 30 s more: a collector that is down must not hold up the server's exit."""
        stopping = threading.Thread(target=self.provider.shutdown, name="jaxserve-tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(timeout)
        if stopping.is_alive():
            logger.warning("spans not sent to %s within %.1f s of shutting down: dropped", self.url, timeout)
            self.exporter.shutdown()  # ends the export still retrying
            stopping.join(timeout)
