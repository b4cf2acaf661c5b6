"""`--quantization int8` beside bf16 on the bundled SmolLM2: one stream, a batch and a prefill, one
engine per mode, all in this process, each round running every engine in turn (the host's noise
comes and goes: compare the per-round ratios to the first mode, and their medians).

Modes: "bf16" (dtype auto: packed bf16 on CPUs with bf16 products), "int8" (each token's outlier
activations split out, models/quantization.py) and "int8-per-token" (the same int8 weights with
every projection's outlier count at 0: one int8 scale per token, the scheme before the split).
Accuracy against float32 is tests/test_quantization.py's (`pytest -s` prints it).

    .venv/bin/python benchmarks/int8.py                     # 6 rounds of all three
    .venv/bin/python benchmarks/int8.py --rounds 1 --modes int8,bf16
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np

MODES = ("int8", "int8-per-token", "bf16")


@contextlib.contextmanager
def outliers_off(on: bool):
    """Quantize with every projection's outlier count at 0 while the engine loads (on=True)."""
    from jaxserve.models import quantization

    table = quantization._PROJECTIONS
    if on:
        quantization._PROJECTIONS = {name: (leading, 0) for name, (leading, _) in table.items()}
    try:
        yield
    finally:
        quantization._PROJECTIONS = table


def workloads(seed: int = 0) -> dict[str, tuple[list[list[int]], int]]:
    """name -> (prompts, new tokens each); random ids past SmolLM2's special tokens."""
    rng = np.random.default_rng(seed)
    ids = lambda n, length: [rng.integers(100, 49000, size=length).tolist() for _ in range(n)]
    return {"single stream, 128 tokens": (ids(1, 16), 128),
            "batch of 32, 64 tokens each": (ids(32, 32), 64),
            "prefill, 8 x 250 tokens": (ids(8, 250), 1)}


def timed(llm, prompts: list[list[int]], new_tokens: int) -> float:
    """tok/s: generated tokens, or for one new token each the prompt tokens (a prefill)."""
    from jaxserve import SamplingParams

    llm.reset_prefix_cache()  # every round computes all its prompts in full
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True), use_tqdm=False)
    elapsed = time.perf_counter() - start
    return (sum(len(o.outputs[0].token_ids) for o in outs) if new_tokens > 1 else sum(map(len, prompts))) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    from jaxserve import LLM

    modes = args.modes.split(",")
    llms = {}
    for mode in modes:
        with outliers_off(mode == "int8-per-token"):
            llms[mode] = LLM(max_num_seqs=32, max_num_batched_tokens=256, max_model_len=512,
                             quantization=None if mode == "bf16" else "int8")
    loads = workloads()
    rates = {(mode, name): [] for mode in modes for name in loads}
    for _ in range(args.rounds):
        for mode, llm in llms.items():
            for name, (prompts, new_tokens) in loads.items():
                rates[(mode, name)].append(timed(llm, prompts, new_tokens))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; medians of {args.rounds} rounds")
    for name in loads:
        base = np.array(rates[(modes[0], name)])
        for mode in modes:
            got = np.array(rates[(mode, name)])
            print(f"{name:28s} {mode:15s} {np.median(got):7.1f} tok/s  {np.median(got / base):.2f}x {modes[0]} "
                  f"(rounds {', '.join(f'{r:.1f}' for r in got)})")


if __name__ == "__main__":
    main()
