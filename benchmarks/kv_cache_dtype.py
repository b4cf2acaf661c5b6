"""KV cache dtypes side by side (--kv-cache-dtype): greedy agreement with the model-dtype cache, decode
speed and KV bytes per token, one engine per dtype, all in this process.

Accuracy: 16 chat prompts x 64 greedy tokens on each cache against the "auto" one, as the share of
tokens equal at the same position (free-running: a sequence that diverges keeps counting against
itself), and teacher-forced (each position's top token given the auto run's own prefix, through
prompt_logprobs), which separates the per-step error from where a divergence leads.

Speed: each round runs every engine in turn (the host's noise comes and goes), for each --batch:
that many synthetic prompts of --prompt-len tokens, --output-len tokens each; decode tok/s counts
only pure-decode steps (tokens / their wall time, host work included). Medians over rounds, and
each dtype's ratio to the first one's per round.

    .venv/bin/python benchmarks/kv_cache_dtype.py                          # auto, bfloat16, int8
    .venv/bin/python benchmarks/kv_cache_dtype.py --rounds 1 --batch 8     # quick look
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea.",
             "Explain photosynthesis in one sentence.", "What is 12 times 13?", "Give me a recipe for pancakes.",
             "Who wrote Hamlet?", "Describe a cat to someone who has never seen one.",
             "Write a Python function that reverses a string.", "What causes rain?",
             "List the planets of the solar system.", "Tell me a short joke.", "How do airplanes fly?",
             "Translate 'good morning' into Spanish.", "What is a prime number?", "Summarise the plot of Cinderella."]


def agreement(want: list[list[int]], got: list[list[int]]) -> float:
    return float(np.mean([np.mean(np.array(w) == np.array(g)) for w, g in zip(want, got)]))


def chat_prompts(tokenizer) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def accuracy(llms: dict, tokens: int) -> dict:
    from jaxserve import SamplingParams

    prompts = chat_prompts(next(iter(llms.values())).get_tokenizer())
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    runs = {kv: [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            for kv, llm in llms.items()}
    base = next(iter(runs))
    forced = [p + t for p, t in zip(prompts, runs[base])]
    top = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    out = {}
    for kv, llm in llms.items():
        outs = llm.generate(forced, top, use_tqdm=False)
        tops = [[max(lp.items(), key=lambda item: item[1].logprob)[0] for lp in o.prompt_logprobs[len(p):]]
                for p, o in zip(prompts, outs)]
        out[kv] = {"free_running": agreement(runs[base], runs[kv]), "teacher_forced": agreement(runs[base], tops)}
    return out


def decode_speed(llm, prompts, output_len: int) -> float:
    from jaxserve import SamplingParams

    llm.reset_prefix_cache()
    engine = llm.engine
    first = len(engine.step_log)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True), use_tqdm=False)
    steps = [r for r in list(engine.step_log)[first:] if r.scheduled and set(r.scheduled.values()) == {1}]
    tokens = sum(len(r.scheduled) for r in steps)
    seconds = sum(r.host_seconds + r.device_seconds for r in steps)
    return tokens / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--dtype", default="float32", help="the weights' dtype (auto KV follows it)")
    p.add_argument("--kv-cache-dtype", default="auto,bfloat16,int8", help="comma-separated; the first is the baseline")
    p.add_argument("--batch", default="1,32", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--accuracy-tokens", type=int, default=64, help="0 skips the accuracy run")
    args = p.parse_args()

    from jaxserve import LLM
    from jaxserve.engine import kv_page_bytes

    kvs, batches = args.kv_cache_dtype.split(","), [int(b) for b in args.batch.split(",")]
    llms, info = {}, {}
    for kv in kvs:
        start = time.perf_counter()
        llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv, max_num_seqs=max(batches),
                  max_num_batched_tokens=max(512, max(batches)), max_model_len=args.prompt_len + args.output_len + 64)
        runner = llm.engine.runner
        info[kv] = {"stored": runner.kv_cache_dtype.name, "page_dtype": str(runner.kv_cache.k.dtype),
                    "kv_bytes_per_token": kv_page_bytes(llm.loaded.config, 1, runner.kv_cache_dtype),
                    "startup_s": round(time.perf_counter() - start, 1)}
        llms[kv] = llm
        print(json.dumps({kv: info[kv]}), flush=True)
    if args.accuracy_tokens:
        for kv, figures in accuracy(llms, args.accuracy_tokens).items():
            info[kv].update(figures)
            print(json.dumps({kv: figures}), flush=True)

    vocab = next(iter(llms.values())).loaded.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocab, size=args.prompt_len).tolist() for _ in range(max(batches))]
    speeds = {(kv, b): [] for kv in kvs for b in batches}
    for r in range(args.rounds):
        for b in batches:
            for kv in kvs:  # in alternation: each round sees the same noise in every dtype
                speeds[kv, b].append(decode_speed(llms[kv], prompts[:b], args.output_len))
            print(json.dumps({"round": r, "batch": b, **{kv: round(speeds[kv, b][-1], 1) for kv in kvs}}), flush=True)
    for b in batches:
        base = np.array(speeds[kvs[0], b])
        for kv in kvs:
            tok_s = np.array(speeds[kv, b])
            print(f"batch {b:3d}  {kv:9s} ({info[kv]['stored']:8s}, {info[kv]['kv_bytes_per_token']:6d} B/token): "
                  f"decode {np.median(tok_s):7.1f} tok/s (median of {len(tok_s)}), x{np.median(tok_s / base):.2f} "
                  f"of {kvs[0]}")
    for kv in kvs:
        if "free_running" in info[kv]:
            print(f"{kv:9s} greedy agreement with {kvs[0]} over 16 x {args.accuracy_tokens}: free-running "
                  f"{info[kv]['free_running']:.3f}, teacher-forced {info[kv]['teacher_forced']:.3f}")


if __name__ == "__main__":
    main()
