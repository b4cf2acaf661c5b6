"""What structured output costs: the token bitmask beside the device, and JSON-schema requests
against unconstrained ones through the server.

`overlap` (offline, one process): a batch of JSON-schema constrained sequences decodes, and its
steps alternate between the engine as it is (the bitmask filled while the device runs the forward
graph, jaxserve/runner.py) and the same step with the bitmask filled first, before anything is
dispatched (how the engine did it before). Per mode: the median host time of the mask and of the
whole step; the difference of the step times is what the overlap takes off each step.

    .venv/bin/python benchmarks/structured_output.py overlap              # B = 32, 3 rounds of 48 steps
    .venv/bin/python benchmarks/structured_output.py overlap --model tiny   # a tiny random model: short steps

`serve`: starts `jaxserve serve` on the bundled SmolLM2 (benchmarks/serving.py's helpers) and keeps
C streamed /v1/completions requests in flight (default 32), each making exactly 128 tokens, in
three kinds, interleaved round by round (each round reverses the order of the one before):
- "free": no constraint, `ignore_eos` and `min_tokens`;
- "schema": every request under one JSON schema (`structured_outputs.json`: an object with one
  string of at least 4000 characters, so no request can close it and end before its 128 tokens;
  compiled once, then cached);
- "fresh schema": the same schema with its property renamed by a nonce per request, so every
  request's constraint is compiled when it arrives.
It reports output tok/s and p50 time to first token of each (the median over the rounds), the
constrained / free tok/s ratio and the fresh-schema TTFT p50 minus the free one.

    .venv/bin/python benchmarks/structured_output.py serve                  # C = 32, 4 rounds
    .venv/bin/python benchmarks/structured_output.py serve --rounds 2 --requests-per-slot 1   # quick look
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import uuid

import numpy as np

from host_overhead import cpu_name
from serving import HEADER, print_level, run_level, served_model, start_jaxserve, stop, synthetic_prompts


def story_schema(key: str) -> dict:
    """An object with one string longer than any run lets a request write: a constrained request
    then makes exactly max_tokens tokens, as an unconstrained one with ignore_eos does."""
    return {"type": "object", "properties": {key: {"type": "string", "minLength": 4000}},
            "required": [key], "additionalProperties": False}


# Rows of typed fields (strings, an email, an enum, numbers) for as long as any run lasts: masks of
# every kind of JSON state, not only the inside of one long string.
RECORDS_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "email", "city", "score"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "email": {"type": "string", "format": "email"},
                   "city": {"enum": ["Paris", "Berlin", "Lisbon", "Oslo", "Rome"]}, "score": {"type": "number"}}}}


def overlap_engine(args):
    """SmolLM2 (the CPU is the device: 0.1-0.2 s steps), or a tiny random model with SmolLM2's
    tokenizer and vocabulary (25-35 ms steps here, most of them the sampler over the vocabulary)."""
    if args.model == "tiny":
        from host_overhead import tiny_engine
        from jaxserve.models import bundled_model_path
        from jaxserve.models.loader_gguf import load_gguf_tokenizer

        return tiny_engine(load_gguf_tokenizer(bundled_model_path()), args.batch, 1024)
    from jaxserve import LLM

    return LLM(max_num_seqs=args.batch, max_num_batched_tokens=512, max_model_len=1024, dtype=args.dtype).engine


def run_overlap(args) -> dict:
    from jaxserve import SamplingParams, StructuredOutputsParams
    from jaxserve.structured_output import bitmask_words

    engine = overlap_engine(args)
    runner = engine.runner
    execute, words = runner.execute, bitmask_words(engine.vocab_size)
    serial_mask_seconds: list[float] = []

    def filled_first(sched, rows, fill_bitmask=None):
        """The step with its bitmask filled before the runner dispatches anything."""
        if fill_bitmask is None:
            return execute(sched, rows)
        start = time.perf_counter()
        mask = np.full((len(sched.seqs), words), -1, np.int32)
        fill_bitmask(mask)
        serial_mask_seconds.append(time.perf_counter() - start)
        return execute(sched, rows, lambda padded: padded.__setitem__(slice(0, len(mask)), mask))

    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.steps + 16, seed=0,
                            structured_outputs=StructuredOutputsParams(json=RECORDS_SCHEMA))
    prompts = synthetic_prompts(args.batch * args.rounds, 48, seed=0)
    steps = {"overlapped": [], "filled first": []}
    masks = {"overlapped": [], "filled first": []}
    for r in range(args.rounds):
        for i in range(args.batch):
            engine.add_request(f"r{r}-{i}", prompts[r * args.batch + i], params)
        running = engine.scheduler.running
        while len(running) < args.batch or not all(req.output_token_ids for req in running):
            engine.step()  # the prompts' prefill, not timed
        for step in range(args.steps):
            mode = "overlapped" if (step + r) % 2 == 0 else "filled first"  # alternate, each round's order flipped
            runner.execute = execute if mode == "overlapped" else filled_first
            start = time.perf_counter()
            engine.step()
            steps[mode].append(time.perf_counter() - start)
            record = engine.step_log[-1]
            assert len(record.scheduled) == args.batch and all(n == 1 for n in record.scheduled.values()), record
            masks[mode].append(record.bitmask_seconds if mode == "overlapped" else serial_mask_seconds[-1])
        runner.execute = execute
        for i in range(args.batch):
            engine.abort_request(f"r{r}-{i}")
    result = {"cpu": cpu_name(), "model": args.model, "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps}
    print(f"{args.model}: {args.batch} JSON-schema rows decoding, {args.rounds} rounds x {args.steps} steps, {result['cpu']}")
    print(f"{'mode':<14}{'mask ms':>10}{'step ms':>10}{'steps':>7}")
    for mode in steps:
        mask_ms, step_ms = statistics.median(masks[mode]) * 1e3, statistics.median(steps[mode]) * 1e3
        result[mode] = {"mask_ms_median": mask_ms, "step_ms_median": step_ms, "steps": len(steps[mode]),
                        "mask_ms_mean": statistics.fmean(masks[mode]) * 1e3,
                        "step_ms_mean": statistics.fmean(steps[mode]) * 1e3}
        print(f"{mode:<14}{mask_ms:>10.3f}{step_ms:>10.2f}{len(steps[mode]):>7}")
    # Neighbouring steps run nearly the same batch: their difference is the least noisy measure.
    paired = [(b - a) * 1e3 for a, b in zip(steps["overlapped"], steps["filled first"])]
    result["paired_step_ms_filled_first_minus_overlapped"] = {"median": statistics.median(paired),
                                                             "mean": statistics.fmean(paired)}
    print(f"step, filled first - overlapped (neighbouring steps): median {statistics.median(paired):.2f} ms, "
          f"mean {statistics.fmean(paired):.2f} ms")
    return result


def request_kinds() -> dict:
    """The extra body of each kind's requests: a dict for all, or made per request."""
    usage = {"stream_options": {"include_usage": True}}  # exact token counts from the server
    return {"free": {**usage, "ignore_eos": True},
            "schema": {**usage, "structured_outputs": {"json": story_schema("story")}},
            "fresh schema": lambda i: {**usage, "structured_outputs": {
                "json": story_schema(f"story_{uuid.uuid4().hex[:12]}")}}}


def run_serve(args) -> dict:
    os.makedirs(args.out_dir, exist_ok=True)
    args.levels = [args.concurrency]  # start_jaxserve sizes --max-num-seqs from them
    proc, base = start_jaxserve(args)
    kinds = request_kinds()
    prompts = synthetic_prompts(256, 48, seed=0)
    num_requests = max(8, args.concurrency * args.requests_per_slot)
    results = {kind: [] for kind in kinds}
    try:
        model = served_model(base)
        # Untimed, at full concurrency: no kind pays the first run of a batch bucket inside the rounds
        # (without it the first kind timed took twice as long to its first token).
        for kind, body in kinds.items():
            asyncio.run(run_level(base, model, prompts, args.concurrency, args.concurrency, 8, body))
        print(HEADER)
        order = list(kinds)
        for r in range(args.rounds):
            for kind in order if r % 2 == 0 else order[::-1]:
                result = asyncio.run(run_level(base, model, prompts, args.concurrency, num_requests,
                                               args.output_len, kinds[kind]))
                result["round"] = r
                results[kind].append(result)
                print_level(kind, result)
    finally:
        stop(proc)
    summary = {"cpu": cpu_name(), "concurrency": args.concurrency, "requests_per_round": num_requests,
               "output_len": args.output_len, "rounds": args.rounds, "dtype": args.dtype}
    for kind, rounds in results.items():
        summary[kind] = {"output_tok_s": statistics.median(x["output_tok_s"] for x in rounds),
                         "ttft_p50_ms": statistics.median(x["ttft_s"]["p50"] for x in rounds) * 1e3,
                         "tokens_min": min(x["output_tokens_min"] for x in rounds),
                         "errors": sum(x["requests"] - x["completed"] for x in rounds)}
    free = summary["free"]
    summary["ratio_schema_tok_s"] = summary["schema"]["output_tok_s"] / free["output_tok_s"]
    summary["ratio_fresh_tok_s"] = summary["fresh schema"]["output_tok_s"] / free["output_tok_s"]
    summary["ratio_schema_tok_s_per_round"] = [c["output_tok_s"] / f["output_tok_s"]
                                               for c, f in zip(results["schema"], results["free"])]
    summary["fresh_ttft_p50_minus_free_ms"] = summary["fresh schema"]["ttft_p50_ms"] - free["ttft_p50_ms"]
    summary["fresh_ttft_p50_minus_free_ms_per_round"] = [(c["ttft_s"]["p50"] - f["ttft_s"]["p50"]) * 1e3
                                                         for c, f in zip(results["fresh schema"], results["free"])]
    # Rounds are pairs in time (a busy spell of the host slows both kinds of one round alike), so
    # the median of the per-round differences is the steadier figure.
    summary["fresh_ttft_p50_minus_free_ms_paired"] = statistics.median(summary["fresh_ttft_p50_minus_free_ms_per_round"])
    print(f"\n{summary['cpu']}, C = {args.concurrency}, {args.rounds} rounds of {num_requests} requests x "
          f"{args.output_len} tokens; medians over the rounds:")
    for kind in kinds:
        k = summary[kind]
        print(f"  {kind:<13} {k['output_tok_s']:7.1f} tok/s   TTFT p50 {k['ttft_p50_ms']:7.1f} ms   "
              f"fewest tokens {k['tokens_min']}   failed {k['errors']}")
    print(f"  schema / free tok/s: {summary['ratio_schema_tok_s']:.3f} (rounds "
          f"{', '.join(f'{x:.3f}' for x in summary['ratio_schema_tok_s_per_round'])}); "
          f"fresh schema / free: {summary['ratio_fresh_tok_s']:.3f}")
    print(f"  fresh-schema TTFT p50 - free TTFT p50: {summary['fresh_ttft_p50_minus_free_ms']:+.1f} ms; "
          f"median of the rounds' differences {summary['fresh_ttft_p50_minus_free_ms_paired']:+.1f} ms (rounds "
          f"{', '.join(f'{x:+.1f}' for x in summary['fresh_ttft_p50_minus_free_ms_per_round'])})")
    with open(os.path.join(args.out_dir, "structured_output.json"), "w") as f:
        json.dump({"summary": summary, "results": results}, f, indent=1)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    overlap = sub.add_parser("overlap")
    overlap.add_argument("--batch", type=int, default=32)
    overlap.add_argument("--steps", type=int, default=48, help="timed decode steps per round")
    overlap.add_argument("--rounds", type=int, default=3)
    overlap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    overlap.add_argument("--dtype", default="auto", help="SmolLM2's")
    overlap.add_argument("--json", default=None)
    serve = sub.add_parser("serve")
    serve.add_argument("--concurrency", type=int, default=32)
    serve.add_argument("--output-len", type=int, default=128)
    serve.add_argument("--requests-per-slot", type=int, default=2, help="requests per round and kind = this x C")
    serve.add_argument("--rounds", type=int, default=4)
    serve.add_argument("--dtype", default="bfloat16", help="jaxserve's --dtype (as serving.py's default)")
    serve.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args()
    if args.command == "serve":
        run_serve(args)
        return
    result = run_overlap(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
