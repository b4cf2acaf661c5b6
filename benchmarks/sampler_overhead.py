"""Cost of the pluggable-sampler path against the default sampler (SmolLM2, B=64 decode steps).

Two measurements, every variant timed in turn inside each repeat (interleaved, so a noisy
neighbour slows all of them alike), reported as min and median:

- step: one whole decode step of 64 sequences through the runner (host packing, the jitted
  model + sampler, the device->host copy), on the default graph and on the pluggable graph
  with no row, one row, or every row using a pluggable sampler;
- sampler: `sample()` alone on [64, 49152] logits: today's default path against the sampler
  of `--baseline-rev` (before pluggable sampling), the pluggable graph skipping every sampler
  (lax.switch per sampler, what the runner compiles) against running them all unconditionally
  and selecting per row (the alternative), and each built-in on all 64 rows.

    .venv/bin/python benchmarks/sampler_overhead.py                  # both, 10 repeats
    .venv/bin/python benchmarks/sampler_overhead.py --repeats 4 --only sampler
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxserve import sampling
from jaxserve.sampling.core import SamplingRow, build_sampling_tensors, sample
from jaxserve.sampling_params import SamplingParams

B, V = 64, 49152


def second_best(logits, params, state, keys):
    ids = lax.top_k(logits, 2)[1]  # [B, 2]; gathered, not sliced: a slice makes XLA:CPU sort the row
    return jnp.take_along_axis(ids, jnp.ones_like(ids[:, :1]), -1)[:, 0]


def variant_params(kind: str, i: int) -> SamplingParams:
    """Row i's parameters: default rows sample (temperature 0.8, top_p 0.95), as chat clients do."""
    if kind == "custom" or (kind == "one_custom" and i == 0):
        return SamplingParams(sampler="bench_second_best")
    return {"typical": SamplingParams(temperature=0.8, typical_p=0.9),
            "tfs": SamplingParams(temperature=0.8, tfs_z=0.95),
            "mirostat": SamplingParams(mirostat=1),
            "mirostat2": SamplingParams(mirostat=2)}.get(kind, SamplingParams(temperature=0.8, top_p=0.95))


# (label, row kind, force the pluggable graph)
STEP_VARIANTS = [("default graph, 64 default rows", "default", False),
                 ("pluggable graph, 64 default rows", "default", True),
                 ("pluggable graph, 63 default + 1 custom", "one_custom", False),
                 ("64 typical rows", "typical", False), ("64 tfs rows", "tfs", False),
                 ("64 mirostat rows", "mirostat", False), ("64 mirostat2 rows", "mirostat2", False)]


def report(title: str, times: dict[str, list[float]], reference: str) -> None:
    ref = statistics.median(times[reference])
    print(f"\n{title} (ms; ratio = median / median of '{reference}')")
    print(f"{'variant':48s} {'min':>8s} {'median':>8s} {'ratio':>7s}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:48s} {1e3 * min(ts):8.1f} {1e3 * med:8.1f} {med / ref:7.3f}")


# ---------------------------------------------------------------------------- whole steps

def decode_batch(llm, prompt_len: int, seed: int):
    """Run 64 requests until all of them decode, then return one decode step's schedule."""
    engine = llm.engine
    rng = np.random.default_rng(seed)
    for i in range(B):
        engine.add_request(f"bench-{i}", rng.integers(100, V, prompt_len).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    while not (engine.step_log and len(engine.step_log[-1].scheduled) == B
               and set(engine.step_log[-1].scheduled.values()) == {1}):
        if not engine.has_unfinished_requests():
            raise RuntimeError("the requests finished before all 64 decoded together")
        engine.step()
    sched = engine.scheduler.schedule()
    assert len(sched.seqs) == B and all(s.num_tokens == 1 and s.samples for s in sched.seqs), (
        len(sched.seqs), engine.stats.num_preemptions)
    return sched


def timed_step(runner, sched, rows, force_pluggable: bool) -> float:
    """What runner.execute does, with the pluggable graph optionally forced (the same decode step
    re-run writes the same KV slots, so repeats are identical)."""
    start = time.perf_counter()
    pluggable = force_pluggable or any(r.params.selected_sampler != "default" for r in rows)
    samplers = sampling.snapshot() if pluggable else None
    bucket, inputs = runner.prepare(sched, rows, samplers)
    runner.run_graphs(bucket, inputs, None, samplers)
    return time.perf_counter() - start


def bench_steps(args) -> None:
    from jaxserve import LLM

    # Room for 64 full requests in the KV cache, so nothing is preempted; a prefill budget that admits
    # all of them before the first finishes. Only the buckets used compile (warm-up off).
    llm = LLM(max_num_seqs=B, max_num_batched_tokens=1024, max_model_len=args.prompt_len + 128, warmup=False)
    sched = decode_batch(llm, args.prompt_len, seed=0)
    runner = llm.engine.runner
    rows = {kind: [SamplingRow(variant_params(kind, i), 1000 + i, len(s.request.output_token_ids),
                               s.request.prompt_token_ids, s.request.output_token_ids, ())
                   for i, s in enumerate(sched.seqs)] for _, kind, _ in STEP_VARIANTS}
    for label, kind, force in STEP_VARIANTS:  # compile, and touch every path once
        timed_step(runner, sched, rows[kind], force)
    times = {label: [] for label, _, _ in STEP_VARIANTS}
    for _ in range(args.repeats):
        for label, kind, force in STEP_VARIANTS:
            times[label].append(timed_step(runner, sched, rows[kind], force))
    kv_len = sched.seqs[0].start + 1
    report(f"B={B} SmolLM2 decode step, kv length ~{kv_len}, {args.repeats} interleaved repeats", times,
           STEP_VARIANTS[0][0])


# ---------------------------------------------------------------------------- sampler alone

def load_baseline_sampler(rev: str):
    """The core sampler as of `rev` (jaxserve/sampling/core.py, before that jaxserve/sampler.py),
    imported as a separate module."""
    for where in ("jaxserve/sampling/core.py", "jaxserve/sampler.py"):
        shown = subprocess.run(["git", "show", f"{rev}:{where}"], capture_output=True, text=True)
        if shown.returncode == 0:
            source = shown.stdout
            break
    else:
        raise SystemExit(f"no core sampler at {rev}")
    path = tempfile.NamedTemporaryFile("w", suffix="_baseline_sampler.py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location("baseline_sampler", path.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def all_samplers_unconditionally(logits, t, samplers):
    """The alternative to one lax.switch per sampler: run every sampler, select per row."""
    out = sample(logits, t, num_top_logprobs=0)
    tokens, state = out.tokens, t.sampler_state
    keys = sampling.row_keys(t.seeds, t.steps)
    for index, s in enumerate(samplers, start=1):
        result = s.fn(logits, t, state, keys)
        sampled, new_state = result if isinstance(result, tuple) else (result, state)
        uses = t.sampler_ids == index
        tokens = jnp.where(uses, sampled, tokens)
        state = jnp.where(uses[:, None], new_state, state)
    return tokens, state


def bench_sampler(args) -> None:
    baseline = load_baseline_sampler(args.baseline_rev)
    rng = np.random.default_rng(1)
    # Model-like rows: Zipf-distributed probabilities (p ~ rank^-1.1), ranks shuffled over the vocabulary.
    ranks = np.argsort(rng.random((B, V)), axis=-1) + 1
    logits = jnp.asarray((-1.1 * np.log(ranks) + 0.1 * rng.standard_normal((B, V))).astype(np.float32))
    snap = sampling.snapshot()

    def tensors(kind):
        rows = [SamplingRow(variant_params(kind, i), 1000 + i, 3, [1, 2, 3], [4, 5, 6], ()) for i in range(B)]
        return build_sampling_tensors(rows, B, 512, 16, samplers=snap.samplers)

    old_rows = [baseline.SamplingRow(variant_params("default", i), 1000 + i, 3, [1, 2, 3], [4, 5, 6], ())
                for i in range(B)]
    old_t = baseline.build_sampling_tensors(old_rows, B, 512, 16)
    new_sample = jax.jit(sample, static_argnames=("samplers", "num_top_logprobs"))
    variants = {
        f"default path, sampler at {args.baseline_rev}": (jax.jit(baseline.sample), (logits, old_t), {}),
        "default path, now": (new_sample, (logits, tensors("default")), {}),
        "pluggable graph, every sampler skipped": (new_sample, (logits, tensors("default")),
                                                   dict(samplers=snap.pluggable)),
        "every sampler run, selected per row": (
            jax.jit(all_samplers_unconditionally, static_argnames="samplers"), (logits, tensors("default")),
            dict(samplers=snap.pluggable)),
        "pluggable graph, 1 custom row": (new_sample, (logits, tensors("one_custom")), dict(samplers=snap.pluggable)),
    }
    for kind in ("typical", "tfs", "mirostat", "mirostat2"):
        variants[f"pluggable graph, 64 {kind} rows"] = (new_sample, (logits, tensors(kind)),
                                                        dict(samplers=snap.pluggable))
    for fn, a, kw in variants.values():
        jax.block_until_ready(fn(*a, **kw))
    times = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, (fn, a, kw) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*a, **kw))
            times[label].append(time.perf_counter() - start)
    report(f"sample() on [{B}, {V}] logits, top-20 logprobs, {args.repeats} interleaved repeats", times,
           f"default path, sampler at {args.baseline_rev}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--baseline-rev", default="4e29d57", help="a commit before pluggable sampling")
    parser.add_argument("--only", choices=("step", "sampler"))
    args = parser.parse_args(argv)
    sampling.register("bench_second_best", second_best)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, registered samplers: {sampling.names()}")
    if args.only in (None, "sampler"):
        bench_sampler(args)
    if args.only in (None, "step"):
        bench_steps(args)


if __name__ == "__main__":
    sys.exit(main())
