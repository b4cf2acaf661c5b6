"""The sampler alone at a large decode batch: top-p drawn in its nucleus (sampling/core.py
`_draw_in_nuclei`) against the exact-threshold sampler of `--baseline-rev`, beside transformers'
logits warpers (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, then
torch.multinomial, as `generate(do_sample=True)` samples) on the same logits.

`sample()` on [B, V] logits (default 256 x SmolLM2's 49,152), no top logprobs, for two kinds of
rows: "flat" (std 0.05: a random-weight model's, where top_p 0.95 keeps most of the vocabulary)
and "zipf" (model-like: p ~ rank^-1.1, ranks shuffled over the vocabulary), and four settings
(temperature alone, top_p 0.95, top_p 0.5, top_k 40 with top_p 0.9). Every variant is timed in
turn inside each repeat, in an order that flips every other repeat (interleaved: a noisy
neighbour slows all alike); the table gives the median and each median over the baseline's.

    .venv/bin/python benchmarks/nucleus_sampling.py                      # B = 256, 6 repeats
    .venv/bin/python benchmarks/nucleus_sampling.py --batch 64 --repeats 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from host_overhead import cpu_name
from sampler_overhead import load_baseline_sampler
from jaxserve.sampling.core import SamplingRow, build_sampling_tensors, sample
from jaxserve.sampling_params import SamplingParams

SETTINGS = {"temperature 0.8": dict(temperature=0.8), "top_p 0.95": dict(temperature=0.8, top_p=0.95),
            "top_p 0.5": dict(temperature=0.8, top_p=0.5), "top_k 40, top_p 0.9": dict(temperature=0.8, top_k=40, top_p=0.9)}


def logits_of(kind: str, B: int, V: int, rng) -> np.ndarray:
    if kind == "flat":
        return (0.05 * rng.standard_normal((B, V))).astype(np.float32)
    ranks = np.argsort(rng.random((B, V)), axis=-1) + 1
    return (-1.1 * np.log(ranks) + 0.1 * rng.standard_normal((B, V))).astype(np.float32)


def torch_sampler(setting: dict):
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(setting["temperature"])]
    if setting.get("top_k"):
        warpers.append(TopKLogitsWarper(setting["top_k"]))
    if setting.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(setting["top_p"]))

    def run(logits):
        with torch.no_grad():
            x = logits
            for warp in warpers:
                x = warp(None, x)
            return torch.multinomial(torch.softmax(x, dim=-1), 1)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--baseline-rev", default="27db080", help="the sampler before top-p was drawn in its nucleus")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    B, V = args.batch, args.vocab
    baseline = load_baseline_sampler(args.baseline_rev)
    rng = np.random.default_rng(0)
    now_sample = jax.jit(lambda logits, t: sample(logits, t, num_top_logprobs=0))
    old_sample = jax.jit(lambda logits, t: baseline.sample(logits, t, num_top_logprobs=0))
    variants = {}
    for kind in ("flat", "zipf"):
        logits = logits_of(kind, B, V, rng)
        on_device, on_torch = jax.device_put(logits), torch.from_numpy(logits)
        for name, setting in SETTINGS.items():
            params = SamplingParams(**setting)
            rows = [SamplingRow(params, 1000 + i, 3, [1, 2, 3], [4, 5, 6], ()) for i in range(B)]
            old_rows = [baseline.SamplingRow(params, 1000 + i, 3, [1, 2, 3], [4, 5, 6], ()) for i in range(B)]
            variants[(kind, name)] = {
                f"jaxserve {args.baseline_rev}": (old_sample, (on_device, baseline.build_sampling_tensors(old_rows, B, 8, 16))),
                "jaxserve now": (now_sample, (on_device, build_sampling_tensors(rows, B, 8, 16))),
                "transformers": (torch_sampler(setting), (on_torch,)),
            }
    for runs in variants.values():
        for fn, a in runs.values():
            jax.block_until_ready(fn(*a))  # compiled (jax) and warm
    times = {key: {label: [] for label in runs} for key, runs in variants.items()}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for key, runs in variants.items():
            # Each variant's predecessor changes its caches: the order flips every other repeat.
            for label, (fn, a) in list(runs.items())[::-1 if repeat % 2 else 1]:
                start = time.perf_counter()
                jax.block_until_ready(fn(*a))
                times[key][label].append(time.perf_counter() - start)
    print(f"{cpu_name()}, jax {jax.__version__}, torch {torch.__version__} (2 threads): sample() on [{B}, {V}] "
          f"logits, {args.repeats} interleaved repeats ({time.perf_counter() - started:.0f} s); median ms, "
          f"and / {args.baseline_rev}")
    labels = list(next(iter(times.values())))
    print(f"{'logits':6s} {'setting':22s}" + "".join(f"{label:>18s}" for label in labels)
          + "".join(f"{label.split()[-1] + ' / ' + args.baseline_rev:>24s}" for label in labels[1:]))
    for (kind, name), by_label in times.items():
        medians = [statistics.median(by_label[label]) * 1e3 for label in labels]
        print(f"{kind:6s} {name:22s}" + "".join(f"{m:18.1f}" for m in medians)
              + "".join(f"{m / medians[0]:24.2f}" for m in medians[1:]))


if __name__ == "__main__":
    main()
