"""`--quantization int8` on the bundled SmolLM2: the layers' projections live on the device as
int8, nothing compiles after warm-up, `jaxserve generate` takes the flag, and the accuracy
figures of issue 15 against float32: teacher-forced greedy agreement >= 90% over 16 prompts x 64
tokens (measured 0.973), and perplexity within 2% on a fixed text of about 350 tokens (measured
+1.3%; with one int8 scale per token, before each token's outliers were split out, 0.926 and +3.3%).
On a text this short the figure moves with equally good roundings: a 1e-4 relative jitter of the
weights before quantizing gave +0.1% to +0.9% over three draws.

Agreement is teacher-forced: at every position of float32's greedy continuation, is int8's most
likely next token float32's? (Run free, the two part ways at the first near-tie and compare
unrelated text after it: with one scale per token, 17% of positions agreed on SmolLM2, though 92%
of next-token choices did.)
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from testlib import SMOLLM2_ENGINE_ARGS, compile_counter

COUNTER = compile_counter()
PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "Water boils at", "import numpy as np\n\n# compute the mean of a list",
    "The best way to learn a language is", "In 1969, the first humans", "A haiku about autumn:\n",
    "The theory of relativity says", "To make a cup of tea, first", "SELECT name FROM users WHERE",
    "The largest planet in the solar system is", "Dear hiring manager,\n", "The French Revolution began in",
    "Photosynthesis is the process by which"]
TEXT = """\
The quick brown fox jumps over the lazy dog. Scientists have long studied how animals communicate, and
recent work suggests that many species use complex signals to share information about food, danger and
social status. In the ocean, whales sing songs that travel for hundreds of kilometres, while bees dance
to tell their sisters where the flowers are. Language, in this wider sense, is everywhere in nature,
although only humans seem to combine words into an endless variety of sentences.

The history of writing is much shorter than the history of speech. The first written records, found in
Mesopotamia, were lists of goods: sheep, grain and beer, pressed into clay tablets with a reed. Over many
centuries these marks became a script that could record laws, letters and stories. Other peoples invented
writing on their own, in Egypt, in China and in Central America, and each system grew from the needs of
trade, religion and government.

Today most people read and write every day without thinking about it. Children learn their letters at
school, adults send messages on their phones, and computers translate between languages in a fraction of
a second. Yet reading remains a remarkable skill. The brain did not evolve to read; it borrows regions that
once served to recognise faces and objects, and trains them, through years of practice, to see words.

Teachers have argued for a long time about the best way to teach reading. Some favour phonics, in which
children learn how letters map to sounds and build words from those parts. Others prefer whole language,
in which children meet complete stories from the start and learn words by seeing them in context. Most
schools now mix the two, and research suggests that explicit teaching of sounds helps most children,
especially those who struggle.
"""
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def int8_llm():
    return LLM(quantization="int8", **SMOLLM2_ENGINE_ARGS)


def greedy(llm, prompts, n=NEW_TOKENS):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def next_token_choices(llm, token_lists):
    """Each position's most likely token given the ones before it (prompt_logprobs' rank 1)."""
    outs = llm.generate(token_lists, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    return [[None if d is None else next(t for t, lp in d.items() if lp.rank == 1) for d in o.prompt_logprobs]
            for o in outs]


def perplexity(llm, ids):
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return math.exp(-np.mean([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])]))


def test_the_projections_are_int8_on_the_device_and_nothing_compiles_after_warm_up(int8_llm):
    layers = int8_llm.engine.runner.params["layers"]
    for module, name in (("attn", "q_proj"), ("attn", "o_proj"), ("mlp", "down_proj")):
        assert layers[module][name].q.dtype == jnp.int8
    assert int8_llm.engine.runner.params["embed"].dtype == jnp.float32
    assert int8_llm.engine.runner.kv_cache.k.dtype == jnp.float32  # the model's dtype, not int8
    before = COUNTER.count
    greedy(int8_llm, PROMPTS[:3], n=8)
    assert COUNTER.count == before


def test_int8_agrees_with_float32_on_next_tokens_and_perplexity(smollm2_llm, int8_llm):
    tok = smollm2_llm.get_tokenizer()
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    reference = greedy(smollm2_llm, prompt_ids)
    choices = next_token_choices(int8_llm, [p + r for p, r in zip(prompt_ids, reference)])
    agreement = np.mean([choices[i][len(prompt_ids[i]) + j] == reference[i][j]
                         for i in range(len(PROMPTS)) for j in range(NEW_TOKENS)])
    text = tok(TEXT).input_ids
    fp32_ppl, int8_ppl = perplexity(smollm2_llm, text), perplexity(int8_llm, text)
    print(f"int8 vs float32: next-token agreement {agreement:.3f}, perplexity {int8_ppl:.3f} vs {fp32_ppl:.3f}")
    assert agreement >= 0.90
    assert abs(int8_ppl / fp32_ppl - 1) <= 0.02


def test_generate_command_takes_the_flag(int8_llm):
    prompt = "The capital of France is"
    want = int8_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    jaxserve = os.path.join(os.path.dirname(sys.executable), "jaxserve")
    done = subprocess.run([jaxserve, "generate", prompt, "--max-tokens", "12", "--quantization", "int8",
                           *[f"--{k.replace('_', '-')}={v}" for k, v in SMOLLM2_ENGINE_ARGS.items()]],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip("\n") == want.outputs[0].text
