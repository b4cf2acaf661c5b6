"""Speculative decoding: single-stream greedy decode tok/s with and without n-gram prompt lookup
(or a draft model).

Two engines of the same model (the bundled SmolLM2 by default) in one process, one plain and one
with ``--speculative-model "[ngram]"`` (``--draft-model PATH``: that draft model instead), decode
the same prompts in alternation for ``--rounds`` rounds: a repetitive one (rewrite a piece of code with one change: most of the answer is in the
prompt) and a plain one (little to look up). Reports the median tok/s of each, their ratio, the
acceptance rate (accepted / proposed drafts) and whether the greedy outputs were identical.

    .venv/bin/python benchmarks/speculative.py                      # 3 rounds, 128 tokens, k = 4
    .venv/bin/python benchmarks/speculative.py --rounds 1 --output-len 48   # quick look
    .venv/bin/python benchmarks/speculative.py --draft-model smollm2        # the model drafting for itself
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

CODE = '''def parse_config(path):
    with open(path) as f:
        lines = f.read().splitlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config
'''
PROMPTS = {
    "repetitive": f"Rewrite this code with one change: name the function read_config instead.\n"
                  f"```python\n{CODE}```\nHere is the rewritten code:\n```python\n",
    "plain": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def decode(llm, prompt: str, output_len: int) -> tuple[list[int], float, tuple[int, int]]:
    from jaxserve import SamplingParams

    before = llm.stats()
    drafted, accepted = before.spec_decode_num_draft_tokens, before.spec_decode_num_accepted_tokens
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    elapsed = time.perf_counter() - start
    after = llm.stats()
    return (out.token_ids, len(out.token_ids) / elapsed,
            (after.spec_decode_num_draft_tokens - drafted, after.spec_decode_num_accepted_tokens - accepted))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--draft-model", default=None,
                        help="speculate with this draft model (same vocabulary) instead of n-gram lookup")
    args = parser.parse_args()

    from jaxserve import LLM

    shape = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=1024)
    engines = {"plain": LLM(args.model, **shape),
               "ngram": LLM(args.model, **shape, speculative_model=args.draft_model or "[ngram]",
                            num_speculative_tokens=args.num_speculative_tokens,
                            **({} if args.draft_model else dict(ngram_prompt_lookup_max=args.ngram_max,
                                                                ngram_prompt_lookup_min=args.ngram_min)))}
    for llm in engines.values():  # one short run each: first-use costs out of the timings
        decode(llm, "Hi", 4)
    rates = {(p, e): [] for p in PROMPTS for e in engines}
    drafts = {p: [0, 0] for p in PROMPTS}
    identical = {p: True for p in PROMPTS}
    for _ in range(args.rounds):
        for prompt_name, prompt in PROMPTS.items():
            tokens = {}
            for name, llm in engines.items():
                tokens[name], rate, (drafted, accepted) = decode(llm, prompt, args.output_len)
                rates[prompt_name, name].append(rate)
                drafts[prompt_name][0] += drafted
                drafts[prompt_name][1] += accepted
            identical[prompt_name] &= tokens["plain"] == tokens["ngram"]
    report = {}
    for prompt_name in PROMPTS:
        plain = statistics.median(rates[prompt_name, "plain"])
        ngram = statistics.median(rates[prompt_name, "ngram"])
        drafted, accepted = drafts[prompt_name]
        report[prompt_name] = dict(plain_tok_s=round(plain, 1), ngram_tok_s=round(ngram, 1),
                                   speedup=round(ngram / plain, 2),
                                   acceptance_rate=round(accepted / drafted, 3) if drafted else None,
                                   drafts_per_round=drafted // args.rounds,
                                   greedy_identical=identical[prompt_name])
        label = "draft" if args.draft_model else "ngram"
        print(f"{prompt_name:>10}: plain {plain:7.1f} tok/s  {label} {ngram:7.1f} tok/s  x{ngram / plain:.2f}  "
              f"acceptance {report[prompt_name]['acceptance_rate']}  identical {identical[prompt_name]}")
    proposer = dict(draft_model=args.draft_model) if args.draft_model else dict(ngram=[args.ngram_min, args.ngram_max])
    print(json.dumps(dict(rounds=args.rounds, output_len=args.output_len, k=args.num_speculative_tokens,
                          **proposer, results=report)))


if __name__ == "__main__":
    main()
