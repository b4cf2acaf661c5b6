"""Prometheus metrics for /metrics, named as vLLM's with a ``jaxserve:`` prefix, in a registry of
their own (a second app in one process never collides with the first).

Every loaded model's samples carry its model_name (the served model's name; a model loaded on
demand, its weights' path or alias). Engine-wide gauges and counters are read from each
AsyncEngine's stats snapshot at scrape time;
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
    """Reads each engine's stats snapshot whenever Prometheus scrapes: one sample per model."""

    def __init__(self):
        self.engines: dict[str, object] = {}  # model_name -> AsyncEngine

    @staticmethod
    def _family(kind, name, doc, stats, value_of, extra_labels=()):
        """One metric family over (model_name, stats) pairs; with extra_labels, value_of gives
        [(label values, value)] per model."""
        family = kind(f"jaxserve:{name}", doc, labels=["model_name", *extra_labels])
        for model, s in stats:
            for labels, value in (value_of(s) if extra_labels else [((), value_of(s))]):
                family.add_metric([model, *labels], value)
        return family

    def collect(self):
        stats = [(model, engine.stats()) for model, engine in list(self.engines.items())]
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        for kind, name, doc, value_of in (
                (gauge, "num_requests_running", "Sequences in the running batch.", lambda s: s.num_running),
                (gauge, "num_requests_waiting", "Sequences waiting to be scheduled.", lambda s: s.num_waiting),
                (gauge, "kv_cache_usage_perc", "Share of KV cache pages held by requests (1 = full).",
                 lambda s: s.kv_cache_usage),
                (counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 lambda s: s.prefix_cache_queries),
                (counter, "prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                 lambda s: s.prefix_cache_hits),
                (counter, "prompt_tokens", "Prompt tokens computed (recomputation included).",
                 lambda s: s.prompt_tokens),
                (counter, "generation_tokens", "Tokens generated.", lambda s: s.generation_tokens),
                (counter, "num_preemptions", "Requests preempted for lack of KV pages.", lambda s: s.num_preemptions),
                (gauge, "num_compiled_graphs", "XLA executables compiled by the runner.",
                 lambda s: s.num_compiled_graphs),
                (counter, "compile_seconds", "Seconds spent compiling step graphs.", lambda s: s.compile_seconds),
                (counter, "engine_step_seconds", "Seconds spent in engine steps.", lambda s: s.step_seconds_total)):
            yield self._family(kind, name, doc, stats, value_of)
        speculative = [(m, s) for m, s in stats if s.spec_decode_accepted_per_position]
        if speculative:
            yield from self._spec_decode(speculative)
        yield self._histogram("compile_time_seconds", "Seconds to compile each step graph (warm-up included).",
                              stats, _COMPILE_BUCKETS)

    def _spec_decode(self, stats):
        counter = CounterMetricFamily
        yield self._family(counter, "spec_decode_num_drafts", "Sequences verified with draft tokens, over all steps.",
                           stats, lambda s: s.spec_decode_num_drafts)
        yield self._family(counter, "spec_decode_num_draft_tokens", "Draft tokens proposed and verified.",
                           stats, lambda s: s.spec_decode_num_draft_tokens)
        yield self._family(counter, "spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                           stats, lambda s: s.spec_decode_num_accepted_tokens)
        yield self._family(counter, "spec_decode_num_accepted_tokens_per_pos",
                           "Draft tokens accepted, by their position among a step's drafts.", stats,
                           lambda s: [((str(p),), c) for p, c in enumerate(s.spec_decode_accepted_per_position)],
                           extra_labels=("position",))

    @staticmethod
    def _histogram(name, doc, stats, buckets):
        h = HistogramMetricFamily(f"jaxserve:{name}", doc, labels=["model_name"])
        for model, s in stats:
            values = s.compile_times
            counts = [sum(1 for v in values if v <= b) for b in buckets] + [len(values)]
            h.add_metric([model], list(zip([str(b) for b in buckets] + ["+Inf"], counts)), sum_value=sum(values))
        return h


class Metrics:
    """Every loaded model's metrics, told apart by the model_name label: the served model's from the
    start, a model loaded on demand from add_engine() until remove_engine() (its engine's gauges
    and counters leave with it; its request histograms stay)."""

    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.engines = _EngineCollector()
        self.registry.register(self.engines)
        self.model_name = model_name
        self.add_engine(engine, model_name)
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

    def add_engine(self, engine, model_name: str) -> None:
        self.engines.engines[model_name] = engine

    def remove_engine(self, model_name: str) -> None:
        self.engines.engines.pop(model_name, None)

    def observe_step(self, seconds: float, model_name: str | None = None) -> None:
        self.step.labels(model_name or self.model_name).observe(seconds)

    def observe(self, record: RequestRecord, model_name: str | None = None) -> None:
        model_name = model_name or self.model_name
        for reason in record.finish_reasons:
            self.success.labels(model_name, reason).inc()
        if record.ttft is not None:
            self.ttft.labels(model_name).observe(record.ttft)
        if record.time_per_output_token is not None:
            self.tpot.labels(model_name).observe(record.time_per_output_token)
        self.e2e.labels(model_name).observe(record.e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
