"""Single-stream side of benchmarks/peers.py: jaxserve's `LLM.generate` in each mode against
llama-cpp-python's `Llama` API (benchmarks/llama_cpp_stream.py in .venv-peers) at each thread count.

The same chat prompt token ids go to both, greedy, exactly `--output-len` tokens (end-of-generation
ignored). Two prompts: a plain one, and a code edit whose answer repeats most of its prompt (where
n-gram speculation has something to find). Decode tok/s counts the tokens after the first over the
time from the first to the last; TTFT is the time to the first. Rounds alternate every engine and
rotate their order; the medians are the result.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time

CODE = '''def summarize_orders(orders, min_total=0.0):
    """Group orders by customer and return totals, counts and the largest order."""
    totals = {}
    counts = {}
    largest = {}
    for order in orders:
        customer = order["customer"]
        amount = float(order["amount"])
        if amount < min_total:
            continue
        totals[customer] = totals.get(customer, 0.0) + amount
        counts[customer] = counts.get(customer, 0) + 1
        if customer not in largest or amount > largest[customer]:
            largest[customer] = amount
    summary = []
    for customer in sorted(totals):
        summary.append({
            "customer": customer,
            "total": round(totals[customer], 2),
            "count": counts[customer],
            "largest": largest[customer],
        })
    return summary
'''
PROMPTS = {
    "plain": [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message "
                                          "in a bottle."}],
    "code-edit": [{"role": "user", "content": "Rename the variable `amount` to `value` in this function. Reply "
                                              "with the whole updated function only.\n\n```python\n" + CODE + "```"}],
}
LLAMA_API = "llama.cpp Llama API"


class JaxserveLLM:
    """One jaxserve LLM per mode, built once; run() is one timed stream."""

    def __init__(self, label: str, kwargs: dict):
        from jaxserve import LLM, SamplingParams

        self.name, self.setting, self.SamplingParams = label, json.dumps(kwargs) if kwargs else "defaults", SamplingParams
        start = time.perf_counter()
        self.llm = LLM(**kwargs)
        print(f"{label}: LLM({self.setting}) ready in {time.perf_counter() - start:.1f}s", flush=True)

    def run(self, prompt_ids: list[int], max_tokens: int) -> dict:
        self.llm.reset_prefix_cache()  # every run pays its prefill, as llama.cpp's does
        params = self.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out = self.llm.generate([prompt_ids], params, use_tqdm=False)[0]
        end = time.monotonic()  # the engine's metrics are on time.monotonic
        first, arrival = out.metrics["first_token_time"], out.metrics["arrival_time"]
        return {"token_ids": list(out.outputs[0].token_ids), "ttft_s": first - arrival, "decode_s": end - first}


class LlamaApi:
    """benchmarks/llama_cpp_stream.py in the peers' Python, one model per thread count."""

    def __init__(self, peer_python: str, model: str, threads: list[int]):
        import os

        helper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_stream.py")
        self.proc = subprocess.Popen([peer_python, helper, model, ",".join(map(str, threads))], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError(f"{helper} exited with {self.proc.wait()} before it was ready")
        self.version = json.loads(ready)["version"]

    def run(self, threads: int, prompt_ids: list[int], max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"threads": threads, "prompt_ids": prompt_ids, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama_cpp_stream.py exited with {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args) -> dict:
    """Every engine on every prompt, args.single_rounds times; returns what peers.py writes to
    peers_single.json: per prompt, per engine and setting, the rounds and their medians."""
    from jaxserve.models import bundled_model_path
    from jaxserve.models.loader_gguf import load_gguf_tokenizer

    model = bundled_model_path()
    tokenizer = load_gguf_tokenizer(model)
    prompt_ids = {name: tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                                  add_special_tokens=False).input_ids for name, messages in PROMPTS.items()}
    ours = [JaxserveLLM(label, kwargs) for label, kwargs in args.llm_modes]
    llama = LlamaApi(args.peer_python, model, args.peer_threads) if args.peer_python != "none" else None
    engines = [(e.name, "jaxserve LLM.generate", e.setting, e.run) for e in ours]
    if llama:
        engines += [(f"llama.cpp t{t}", LLAMA_API, f"n_threads={t}", lambda ids, n, t=t: llama.run(t, ids, n))
                    for t in args.peer_threads]
    try:
        for _, _, _, fn in engines:  # untimed: each path once
            fn(prompt_ids["plain"], 4)
        runs = {p: {name: [] for name, *_ in engines} for p in PROMPTS}
        for r in range(args.single_rounds):
            order = engines[r % len(engines):] + engines[:r % len(engines)]
            for prompt, ids in prompt_ids.items():
                for name, _, _, fn in order:
                    runs[prompt][name].append(fn(ids, args.output_len))
            print(f"single-stream round {r + 1}/{args.single_rounds} done", flush=True)
    finally:
        if llama:
            llama.close()
    summary = {}
    for prompt, by_engine in runs.items():
        reference = by_engine[engines[-1][0]][0]["token_ids"] if llama else None
        summary[prompt] = {}
        for name, engine, setting, _ in engines:
            rs = by_engine[name]
            decode = [(len(x["token_ids"]) - 1) / x["decode_s"] for x in rs]
            summary[prompt][name] = {
                "engine": engine, "setting": setting, "prompt_tokens": len(prompt_ids[prompt]),
                "decode_tok_s": statistics.median(decode), "decode_tok_s_rounds": decode,
                "ttft_s": statistics.median(x["ttft_s"] for x in rs),
                "tokens": len(rs[0]["token_ids"]),
                "same_greedy_prefix_as_llama_cpp": _common_prefix(rs[0]["token_ids"], reference) if reference else None,
            }
    return {"llama_cpp_python": llama.version if llama else None, "prompts": PROMPTS, "summary": summary}
