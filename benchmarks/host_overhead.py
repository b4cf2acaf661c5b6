"""Host time per engine step at a large decode batch: schedule, input preparation, output processing.

On a GPU a small model's decode step takes a few ms of device time, so whatever the host spends
per step (in Python, between the device calls) bounds the step rate. This measures that host time
with a tiny random-weight model (2 layers, hidden 64), so the device share stays small, but with
SmolLM2's real tokenizer and vocabulary (detokenising is part of output processing), at B running
sequences that all decode (default 256), sampling as chat clients do (temperature 0.8, top_p 0.95).

Per step it reports the phases the engine records (jaxserve/engine.py StepRecord): schedule (with
the sampling rows), prepare (the padded host arrays), outputs (tokens into requests, detokenising,
stop checks, RequestOutputs, stats), their sum (the host time), and the device wait beside them;
once per output kind (SamplingParams.output_kind): cumulative (every step, all so far), delta
(every step, what is new: streaming) and final_only (LLM.generate, non-streaming requests).

Each configuration runs in `--rounds` rounds, interleaved, because on a shared 2-vCPU host a
whole round can run 2-3x slower than the next: the medians are over every measured step of
every round, and "best round" is the lowest round median (the least disturbed). As `jaxserve
serve` does once loaded, the start-up heap is frozen out of garbage collection (`--no-freeze`:
left to it, when a full collection walks it in ~110 ms in some step). With
``JAXSERVE_HOST_HEAP=retain`` the C heap keeps the CPU step's large blocks (jaxserve/host_heap.py).

    .venv/bin/python benchmarks/host_overhead.py                 # B = 256, 3 rounds of 64 steps
    .venv/bin/python benchmarks/host_overhead.py --batch 64 --steps 32 --stop "\\n\\n"
    .venv/bin/python benchmarks/host_overhead.py --replayed-only --rounds 5    # the host alone
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import time

import jax
import numpy as np

from jaxserve import host_heap
from jaxserve.config import CacheConfig, CompileConfig, SchedulerConfig
from jaxserve.engine import LLMEngine
from jaxserve.models import LoadedModel, ModelConfig, bundled_model_path, model_class
from jaxserve.models.loader_gguf import load_gguf_tokenizer
from jaxserve.pallas_kernels import attention_backend
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

PHASES = ("schedule", "prepare", "outputs", "host", "best round", "host mean", "device")
TEXT = ("The history of the printing press begins in the fifteenth century, when movable type made books "
        "cheap enough for ordinary readers. Within decades, presses spread across Europe, and with them "
        "pamphlets, newspapers and the arguments that reshaped religion, science and politics. ")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def tiny_engine(tokenizer, batch: int, max_model_len: int) -> LLMEngine:
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                         rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=True,
                         attention_bias=False, qk_norm=False, sliding_window=None,
                         max_position_embeddings=max_model_len, bos_token_id=1, eos_token_ids=(2,))
    family = model_class(config.architecture)(config)
    params = jax.jit(family.init_params, static_argnums=1)(jax.random.key(0), np.float32)
    loaded = LoadedModel(config=config, model=family, params=params, source="random", name="tiny",
                         tokenizer_or_future=tokenizer)
    return LLMEngine(loaded, cache=CacheConfig(block_size=16, kv_cache_memory=None, kv_cache_dtype="auto",
                                               gpu_memory_utilization=0.9, enable_prefix_caching=True),
                     scheduler=SchedulerConfig(max_model_len=max_model_len, max_num_seqs=batch,
                                               max_num_batched_tokens=max(512, batch)),
                     compile=CompileConfig(compilation_cache_dir=None, warmup=True),
                     attention_fn=attention_backend("jnp"))


def measure(engine: LLMEngine, tokenizer, batch: int, steps: int, stop: list[str],
            kind: RequestOutputKind = RequestOutputKind.CUMULATIVE, replay: bool = False) -> list:
    """Phase records of `steps` decode steps of `batch` fresh sequences (the engine drained after).
    replay: the measured steps replay the last warm step's device results instead of running the
    graphs, so the host work runs back to back as it would beside a GPU (here the "device" is
    these same cores, and its 0.1-0.3 s steps evict the host's data from the CPU caches)."""
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    prefill_steps = -(-batch * 32 // engine.scheduler.config.max_num_batched_tokens)  # the first ones decode meanwhile
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=steps + prefill_steps + 8, ignore_eos=True,
                            stop=stop or None,
                            output_kind=kind)
    for i in range(batch):
        engine.add_request(f"{kind.name}-{i}", ids[i % 7:i % 7 + 32], params)  # distinct prompts: no shared prefix
    while not (engine.step_log and len(engine.step_log[-1].scheduled) == batch
               and set(engine.step_log[-1].scheduled.values()) == {1}):
        engine.step()  # prefill until every sequence decodes
    for _ in range(3):
        engine.step()  # warm: the decode bucket's graphs ran, caches filled
    runner, real = engine.runner, engine.runner.run_graphs
    results = []
    runner.run_graphs = lambda *args, **kw: results.append(real(*args, **kw)) or results[-1]
    engine.step()
    if replay:
        runner.run_graphs = lambda *args, **kw: results[-1]
    first = len(engine.step_log)
    try:
        for _ in range(steps):
            engine.step()
    finally:
        runner.run_graphs = real
    records = list(engine.step_log)[first:]
    assert all(len(r.scheduled) == batch for r in records), "a sequence finished early"
    while engine.has_unfinished_requests():
        engine.step()
    return records


def summarise(records) -> dict[str, float]:
    values = {"schedule": [r.schedule_seconds for r in records], "prepare": [r.prepare_seconds for r in records],
              "outputs": [r.outputs_seconds for r in records], "host": [r.host_seconds for r in records],
              "device": [r.device_seconds for r in records]}
    result = {name: statistics.median(v) * 1e3 for name, v in values.items()}
    result["host mean"] = statistics.fmean(values["host"]) * 1e3  # with the steps a collection or a page lands in
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    parser.add_argument("--stop", action="append", default=[], help="a stop string every request carries")
    parser.add_argument("--max-model-len", type=int, default=8192, help="SmolLM2's context, serve's default")
    parser.add_argument("--replayed-only", action="store_true",
                        help="only the replayed-device configurations (the host alone, as beside a GPU)")
    parser.add_argument("--json", default=None, help="also write the medians here")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the start-up heap to the garbage collector (serve freezes it)")
    args = parser.parse_args()
    host_heap.keep_freed_blocks()  # as LLM does, before JAX starts: JAXSERVE_HOST_HEAP=retain keeps the step's blocks
    tokenizer = load_gguf_tokenizer(bundled_model_path())
    engine = tiny_engine(tokenizer, args.batch, max_model_len=args.max_model_len)
    if not args.no_freeze:  # what jaxserve/cli.py's _freeze_startup_heap does before serving
        gc.collect()
        gc.freeze()
    stop = [s.encode().decode("unicode_escape") for s in args.stop]
    started = time.perf_counter()
    records: dict[str, list] = {}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for replay in (True,) if args.replayed_only else (False, True):
            for kind in RequestOutputKind:
                label = kind.name.lower() + (" (replayed device)" if replay else "")
                round_records = measure(engine, tokenizer, args.batch, args.steps, stop, kind, replay)
                records.setdefault(label, []).extend(round_records)
                best[label] = min(best.get(label, float("inf")), summarise(round_records)["host"])
    results = {label: summarise(r) | {"best round": best[label]} for label, r in records.items()}
    print(f"{cpu_name()}, jax {jax.__version__}: {args.batch} decoding sequences, max_model_len "
          f"{args.max_model_len}, {args.rounds} rounds of {args.steps} steps per output kind "
          f"({time.perf_counter() - started:.1f} s in all); host heap: {host_heap.describe()}; median ms per step")
    print(f"{'output kind':<30}" + "".join(f"{name:>12}" for name in PHASES))
    for label, result in results.items():
        print(f"{label:<30}" + "".join(f"{result[name]:12.3f}" for name in PHASES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
                       "median_ms": results}, f)


if __name__ == "__main__":
    main()
