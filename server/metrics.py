"""Prometheus metrics for /metrics, named as vLLM's with a ``jaxserve:`` prefix, in a registry of
their own (a second app in one process never collides with the first).

Engine-wide gauges and counters are read from the AsyncEngine's stats snapshot at scrape time;
per-request histograms are observed when each request ends, the step-time histogram after every
engine step (from the engine thread: prometheus_client metrics are thread-safe), and the compile-time
histogram is rebuilt from the list of compile durations at scrape time.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from jaxserve.async_engine import RequestRecord

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_COMPILE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _EngineCollector:
    """Reads the engine's stats snapshot whenever Prometheus scrapes."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def _gauge(self, name, doc, value):
        g = GaugeMetricFamily(f"jaxserve:{name}", doc, labels=list(self.labels))
        g.add_metric(list(self.labels.values()), value)
        return g

    def _counter(self, name, doc, value):
        c = CounterMetricFamily(f"jaxserve:{name}", doc, labels=list(self.labels))
        c.add_metric(list(self.labels.values()), value)
        return c

    def collect(self):
        s = self.engine.stats()
        yield self._gauge("num_requests_running", "Sequences in the running batch.", s.num_running)
        yield self._gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield self._gauge("kv_cache_usage_perc", "Share of KV cache pages held by requests (1 = full).",
                          s.kv_cache_usage)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.prefix_cache_hits)
        yield self._counter("prompt_tokens", "Prompt tokens computed (recomputation included).", s.prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._counter("num_preemptions", "Requests preempted for lack of KV pages.", s.num_preemptions)
        yield self._gauge("num_compiled_graphs", "XLA executables compiled by the runner.", s.num_compiled_graphs)
        yield self._counter("compile_seconds", "Seconds spent compiling step graphs.", s.compile_seconds)
        yield self._counter("engine_step_seconds", "Seconds spent in engine steps.", s.step_seconds_total)
        if s.spec_decode_accepted_per_position:  # speculative decoding is on
            yield from self._spec_decode(s)
        yield self._histogram("compile_time_seconds", "Seconds to compile each step graph (warm-up included).",
                              s.compile_times, _COMPILE_BUCKETS)

    def _spec_decode(self, s):
        yield self._counter("spec_decode_num_drafts", "Sequences verified with draft tokens, over all steps.",
                            s.spec_decode_num_drafts)
        yield self._counter("spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                            s.spec_decode_num_draft_tokens)
        yield self._counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                            s.spec_decode_num_accepted_tokens)
        c = CounterMetricFamily("jaxserve:spec_decode_num_accepted_tokens_per_pos",
                                "Draft tokens accepted, by their position among a step's drafts.",
                                labels=list(self.labels) + ["position"])
        for position, count in enumerate(s.spec_decode_accepted_per_position):
            c.add_metric(list(self.labels.values()) + [str(position)], count)
        yield c

    def _histogram(self, name, doc, values, buckets):
        counts = [sum(1 for v in values if v <= b) for b in buckets] + [len(values)]
        h = HistogramMetricFamily(f"jaxserve:{name}", doc, labels=list(self.labels))
        h.add_metric(list(self.labels.values()), list(zip([str(b) for b in buckets] + ["+Inf"], counts)),
                     sum_value=sum(values))
        return h


class Metrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        self.model_name = model_name
        labels = ["model_name"]
        self.success = Counter("jaxserve:request_success", "Finished requests by finish reason.",
                               labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("jaxserve:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("jaxserve:time_per_output_token_seconds", "Mean time per output token after the "
                              "first, per request.", labels, buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jaxserve:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.step = Histogram("jaxserve:engine_step_time_seconds", "Seconds of each engine step (schedule, "
                              "device step, outputs).", labels, buckets=_STEP_BUCKETS, registry=self.registry)

    def observe_step(self, seconds: float) -> None:
        self.step.labels(self.model_name).observe(seconds)

    def observe(self, record: RequestRecord) -> None:
        for reason in record.finish_reasons:
            self.success.labels(self.model_name, reason).inc()
        if record.ttft is not None:
            self.ttft.labels(self.model_name).observe(record.ttft)
        if record.time_per_output_token is not None:
            self.tpot.labels(self.model_name).observe(record.time_per_output_token)
        self.e2e.labels(self.model_name).observe(record.e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
