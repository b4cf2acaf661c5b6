"""What multi-LoRA costs: output tok/s of a batch mixing two adapters with base-model rows, against the
same batch on the same model without LoRA, in one process, step by step in alternation.

Four engines of one model (default: the bundled SmolLM2), one per workload: a plain one, and three
with `enable_lora` (`--max-loras 2`, `--max-lora-rank 16`). Two PEFT-format adapters are written
with random weights (rank 8 on q/v, rank 16 on all seven projections; throughput does not depend
on what they say). N seeded synthetic prompts (default 32) each make exactly `--output-len`
tokens, greedy, as
- "base": the plain engine, no adapters;
- "LoRA on, base rows": a LoRA engine, no row with an adapter (what enabling LoRA costs alone);
- "mixed": a LoRA engine, half the rows base, a quarter each adapter;
- "all adapter": a LoRA engine, every row with the rank-16 adapter.
All four are queued at once and stepped in turn, one `LLMEngine.step()` each, so the host's load
(it moves by 2x within a minute on a shared 2-core VM) falls on all four alike; a workload's rate
is its tokens over the sum of its own steps' wall time. Each round starts from an empty prefix
cache; the result is the median over `--rounds` of each rate and of its ratio to "base".

    .venv/bin/python benchmarks/lora.py                       # SmolLM2, 32 x 128 tokens, 3 rounds
    .venv/bin/python benchmarks/lora.py --num-prompts 8 --output-len 32 --rounds 1   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

ADAPTERS = {"small": (8, ("q_proj", "v_proj")),
            "large": (16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def write_adapter(folder: str, model_config, rank: int, targets: tuple[str, ...], seed: int) -> None:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) with small random A and B."""
    from safetensors.numpy import save_file

    from jaxserve.models.lora import module_shapes

    rng = np.random.default_rng(seed)
    shapes, tensors = module_shapes(model_config), {}
    for layer in range(model_config.num_layers):
        for module in targets:
            fan_in, fan_out = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = (0.02 * rng.standard_normal((rank, fan_in))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.02 * rng.standard_normal((fan_out, rank))).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}, f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-prompt-len", type=int, default=16)
    p.add_argument("--max-prompt-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from jaxserve import LLM, SamplingParams
    from jaxserve.lora import LoRARequest

    shape = dict(model=args.model, dtype=args.dtype, max_num_seqs=args.num_prompts, max_num_batched_tokens=512,
                 max_model_len=args.max_prompt_len + args.output_len + 16)
    folder = tempfile.mkdtemp(prefix="jaxserve-lora-bench-")
    engines = {"base": LLM(**shape)}
    for name in ("LoRA on, base rows", "mixed", "all adapter"):
        engines[name] = LLM(**shape, enable_lora=True, max_loras=2, max_lora_rank=16)
    config = engines["base"].loaded.config
    adapters = {}
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        write_adapter(os.path.join(folder, name), config, rank, targets, seed=i)
        adapters[name] = LoRARequest(name, i + 1, os.path.join(folder, name))
    rng = np.random.default_rng(args.seed)
    n = args.num_prompts
    prompts = [rng.integers(100, config.vocab_size, size=int(rng.integers(args.min_prompt_len,
                                                                          args.max_prompt_len + 1))).tolist()
               for _ in range(n)]
    rows = {"base": [None] * n, "LoRA on, base rows": [None] * n,
            "mixed": [None if i % 2 == 0 else adapters["small" if i % 4 == 1 else "large"] for i in range(n)],
            "all adapter": [adapters["large"]] * n}
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    for name, llm in engines.items():  # every path once, the adapters into their slots
        llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False,
                     lora_request=rows[name][:2])
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        seconds = dict.fromkeys(engines, 0.0)
        for name, llm in engines.items():
            llm.reset_prefix_cache()
            for i, (prompt, lora) in enumerate(zip(prompts, rows[name])):
                llm.engine.add_request(f"{r}-{i}", prompt, params, lora_request=lora)
        while any(llm.engine.has_unfinished_requests() for llm in engines.values()):
            for name, llm in engines.items():
                if llm.engine.has_unfinished_requests():
                    start = time.perf_counter()
                    llm.engine.step()
                    seconds[name] += time.perf_counter() - start
        for name in engines:
            rates[name].append(n * args.output_len / seconds[name])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    print(f"\n{n} prompts x {args.output_len} tokens, dtype {args.dtype}, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.2f}; median output tok/s, median of the per-round ratios to base:")
    print("| workload | output tok/s | ratio to base | per-round ratios |\n| --- | --- | --- | --- |")
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, rates["base"])]
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(ratios):.2f} | "
              f"{', '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
