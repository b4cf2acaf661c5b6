"""Profiling a run: LLM.start_profile / stop_profile write a JAX trace holding the models' named
scopes and the engine's phases, and compile logging reports the step graphs it builds."""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.profiling import DEVICE_STEP, PREPARE, PROCESS_OUTPUTS, SCHEDULE
from testlib import PAGE_SIZE


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=PAGE_SIZE)


def test_trace_holds_layer_scopes_and_engine_phases(tiny_llm, tmp_path):
    folder = tiny_llm.start_profile(str(tmp_path))
    assert folder == str(tmp_path)
    with pytest.raises(RuntimeError, match="already"):
        tiny_llm.start_profile(str(tmp_path))
    tiny_llm.generate(["w5 w6 w7 w8 w9"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    run = tiny_llm.stop_profile()
    assert os.path.dirname(run) == os.path.join(str(tmp_path), "plugins", "profile")

    # The XProf trace carries the step's HLO with each op's scope path.
    (xplane,) = glob.glob(os.path.join(run, "*.xplane.pb"))
    data = open(xplane, "rb").read()
    for scope in (b"decoder_layer/", b"attention/qkv_proj/", b"attention/paged_attention/", b"mlp/mlp/", b"logits/", b"sampler/"):
        assert scope in data, scope
    # The Perfetto trace shows each host phase of every step.
    with gzip.open(os.path.join(run, "perfetto_trace.json.gz")) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e.get("name") for e in events if isinstance(e, dict)}
    assert {SCHEDULE, PREPARE, DEVICE_STEP, PROCESS_OUTPUTS} <= names

    with pytest.raises(RuntimeError, match="no profile"):
        tiny_llm.stop_profile()


def test_profile_needs_a_directory(tiny_llm, monkeypatch):
    monkeypatch.delenv("JAXSERVE_PROFILER_DIR", raising=False)
    tiny_llm.engine.profiler.trace_dir = None
    with pytest.raises(ValueError, match="JAXSERVE_PROFILER_DIR"):
        tiny_llm.start_profile()


@pytest.fixture
def restore_compile_logging():
    import jax

    yield
    jax.config.update("jax_log_compiles", False)
    logging.getLogger("jaxserve.runner").setLevel(logging.NOTSET)


def test_log_compiles_reports_each_step_graph(tiny_checkpoint, caplog, restore_compile_logging):
    folder, _ = tiny_checkpoint("llama")
    with caplog.at_level(logging.DEBUG, logger="jaxserve.runner"):
        llm = LLM(folder, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=32, block_size=PAGE_SIZE,
                  log_compiles=True)
    compiled = [r.getMessage() for r in caplog.records if r.name == "jaxserve.runner" and "compiled" in r.getMessage()]
    # One line per warm-up graph: the forward graphs of T = 2, 4, 8, the penalties, sampler and
    # masked sampler of B = 2.
    assert len(compiled) == len(llm.engine.runner.warmup_keys) == 6
