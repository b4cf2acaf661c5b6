"""Profiling through the server: POST /start_profile and /stop_profile (the default test server
has JAXSERVE_PROFILER_DIR set) write a JAX trace of the requests served in between; /metrics
carries the step-time and compile-time histograms."""
from __future__ import annotations

import glob
import os

import httpx

from serverlib import MODEL, metric, scrape


def test_start_and_stop_profile_trace_the_requests_in_between(server):
    started = httpx.post(f"{server.url}/start_profile", timeout=60)
    assert started.status_code == 200, started.text
    assert httpx.post(f"{server.url}/start_profile", timeout=60).status_code == 409  # one at a time
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Profile me", "max_tokens": 4,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    stopped = httpx.post(f"{server.url}/stop_profile", timeout=120)
    assert stopped.status_code == 200, stopped.text
    run = stopped.json()["trace"]
    assert run.startswith(started.json()["trace_dir"])
    (xplane,) = glob.glob(os.path.join(run, "*.xplane.pb"))
    data = open(xplane, "rb").read()
    assert b"decoder_layer" in data and b"paged_attention" in data and b"jaxserve.device_step" in data
    assert httpx.post(f"{server.url}/stop_profile", timeout=60).status_code == 409  # none running


def test_metrics_histograms_of_step_and_compile_time(server):
    before = scrape(server.url)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Count:", "max_tokens": 3,
                                                         "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    after = scrape(server.url)
    # At least one step per generated token, each observed once.
    steps = metric(after, "jaxserve:engine_step_time_seconds_count") - metric(
        before, "jaxserve:engine_step_time_seconds_count")
    assert steps >= 3
    assert metric(after, "jaxserve:engine_step_time_seconds_sum") > metric(before, "jaxserve:engine_step_time_seconds_sum")
    # Every warm-up graph's compile is in the histogram (a cache hit still takes a moment to load).
    compiled = metric(after, "jaxserve:compile_time_seconds_count")
    assert compiled >= metric(after, "jaxserve:num_compiled_graphs") > 0
