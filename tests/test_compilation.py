"""Compilation: one graph per bucket, compiled at warm-up; serving compiles nothing; a second
process reads the exported graphs back and loads their executables from the persistent
compilation cache."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from testlib import SMOLLM2_ENGINE_ARGS, compile_counter
from jaxserve import SamplingParams


COUNTER = compile_counter()


def mixed_requests(seed: int, vocab: int):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, vocab, size=int(rng.integers(3, 90))).tolist() for _ in range(64)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), max_tokens=int(rng.integers(1, 9)),
                             seed=int(rng.integers(1 << 20)), ignore_eos=True) for _ in range(64)]
    return prompts, params


def test_mixed_traffic_compiles_nothing_after_warmup(smollm2_llm):
    llm = smollm2_llm
    runner = llm.engine.runner
    # Warm-up compiled every bucket's forward graph and every batch size's sampler, no more.
    assert runner.num_compiled_warmup == len(runner.warmup_keys) == runner.num_compiled
    compiled_before = runner.num_compiled
    prompts, params = mixed_requests(0, llm.loaded.config.vocab_size)
    before = COUNTER.count
    first = llm.generate(prompts, params, use_tqdm=False)
    second = llm.generate(prompts, params, use_tqdm=False)
    assert COUNTER.count == before, "serving compiled a new graph"
    assert runner.num_compiled == compiled_before
    used = {r.bucket for r in llm.engine.step_log}
    assert len(used) > 3  # the run really went through several buckets
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in second]


SECOND_PROCESS = """
import json, time, jax
events = []
jax.monitoring.register_event_listener(lambda e, **kw: events.append(e))
start = time.perf_counter()
from jaxserve import LLM
llm = LLM(**{args})
print(json.dumps({{"start_seconds": time.perf_counter() - start, "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
                  "cache_misses": events.count("/jax/compilation_cache/cache_misses"), "graphs": len(llm.engine.runner.warmup_keys),
                  "warmup_seconds": llm.engine.runner.compile_seconds, "from_store": llm.engine.runner.num_graphs_from_store,
                  "stats_graphs": llm.stats().num_compiled_graphs}}))
"""


def test_second_process_loads_step_graphs_from_the_persistent_cache(smollm2_llm):
    code = SECOND_PROCESS.format(args=repr(SMOLLM2_ENGINE_ARGS))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print("second process:", report)
    assert report["cache_hits"] >= report["graphs"]
    assert report["cache_misses"] < report["graphs"]  # the step graphs came from disk, not the compiler
    assert report["from_store"] == report["graphs"]  # and were not traced again (jaxserve/graph_cache.py)
    # Before any step, LLM.stats() already counts the graphs warm-up built.
    assert report["stats_graphs"] == report["graphs"]
