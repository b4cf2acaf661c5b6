"""The cost of tensor parallelism on forced host devices: step time and tok/s at TP 1, 2 and 4.

The host devices share this machine's cores, so a sharded run cannot be faster here: the numbers
show what the collectives and the split matmuls cost, not a speed-up. SmolLM2 has 9 heads and 3 KV
heads (TP 1 or 3 only), so TP 1/2/4 runs on a random-weight Llama of SmolLM2's size with 8 heads and
4 KV heads; SmolLM2 itself runs at TP 1 and 3.

    .venv/bin/python benchmarks/sharding.py                  # both models
    .venv/bin/python benchmarks/sharding.py --prompts 8 --output-len 16   # quick look
"""
from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import argparse  # noqa: E402
import collections  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def random_smollm2_sized_llama(folder: str) -> None:
    """SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, vocab 49152) with 8 heads of 72 and
    4 KV heads, so that 2 and 4 shards divide it; random weights and a toy word-level tokenizer."""
    import torch
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from testlib import save_tiny_tokenizer

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4,
                                      head_dim=72, max_position_embeddings=2048, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder, safe_serialization=True)
    save_tiny_tokenizer(folder)


def run(model, tp: int, prompts, output_len: int, args) -> dict:
    from jaxserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model, tensor_parallel_size=tp, max_num_seqs=args.prompts, max_num_batched_tokens=256,
              max_model_len=512)
    startup = time.perf_counter() - start
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    first = len(llm.engine.step_log)
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
                        use_tqdm=False)
    elapsed = time.perf_counter() - start
    by_bucket = collections.defaultdict(list)
    for record in list(llm.engine.step_log)[first:]:
        by_bucket[record.bucket].append(record.seconds)
    decode_bucket = max(by_bucket, key=lambda b: len(by_bucket[b]))
    return {"tp": tp, "tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / elapsed,
            "decode_bucket": decode_bucket, "decode_step_ms": 1000 * float(np.median(by_bucket[decode_bucket])),
            "startup_s": startup, "tokens": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--skip-smollm2", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 320, size=int(rng.integers(16, 64))).tolist() for _ in range(args.prompts)]

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        random_smollm2_sized_llama(folder)
        for tp in (1, 2, 4):
            rows.append(("random Llama, SmolLM2-sized (8 heads, 4 KV)", run(folder, tp, prompts, args.output_len, args)))
    if not args.skip_smollm2:
        for tp in (1, 3):
            rows.append(("SmolLM2-135M (9 heads, 3 KV)", run(None, tp, prompts, args.output_len, args)))

    print(f"\n{args.prompts} prompts x {args.output_len} tokens, greedy fp32, 4 forced host devices on "
          f"{os.cpu_count()} cores")
    print(f"{'model':<46}{'TP':>4}{'tok/s':>9}{'decode step ms':>16}{'vs TP 1':>9}{'same tokens':>13}")
    base = {}
    for name, r in rows:
        base.setdefault(name, r)
        b = base[name]
        print(f"{name:<46}{r['tp']:>4}{r['tok_s']:>9.1f}{r['decode_step_ms']:>16.1f}"
              f"{r['decode_step_ms'] / b['decode_step_ms']:>8.2f}x{str(r['tokens'] == b['tokens']):>13}")


if __name__ == "__main__":
    main()
