"""Real weights, as users download them: Gemma 3 270M (base) and Qwen2.5-Coder-0.5B-Instruct,
both Q4_K_M GGUFs. jaxserve's greedy tokens equal transformers' loading the same file (dequantised
to float32 by both) on English, code and Korean prompts, and the tokenizers agree.

Run by `make test-real` (and CI), not `make test`: the two files are 750 MB, and transformers
takes most of a minute to load each."""
from __future__ import annotations

import os

import pytest
import torch

from jaxserve import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "대한민국의 수도는"]
NEW_TOKENS = 24
ENGINE = dict(dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512)


def transformers_greedy(path: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            generated = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
            out.append(generated[0, len(ids):].tolist())
    return out


def assert_greedy_matches_transformers(llm, path: str, prompts: list[str]):
    tok = llm.get_tokenizer()
    ids = [tok(p).input_ids for p in prompts]
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), use_tqdm=False)
    ours = [o.outputs[0].token_ids for o in outs]
    theirs = transformers_greedy(path, ids)
    for prompt, mine, want in zip(prompts, ours, theirs):
        # An end-of-sequence token stops ours; transformers' generate stops there too.
        assert mine == want, f"{prompt!r}: {tok.decode(mine)!r} != {tok.decode(want)!r}"


def assert_tokenizer_matches_transformers(llm, path: str, texts: list[str]):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok = llm.get_tokenizer()
    for text in texts:
        assert tok(text).input_ids == ref(text).input_ids, text


def test_gemma3_270m_greedy_matches_transformers(gemma3_270m_gguf):
    llm = LLM(gemma3_270m_gguf, **ENGINE)
    assert_greedy_matches_transformers(llm, gemma3_270m_gguf, PROMPTS)
    assert llm.loaded.config.architecture == "Gemma3ForCausalLM" and llm.loaded.config.num_layers == 18
    assert_tokenizer_matches_transformers(llm, gemma3_270m_gguf, PROMPTS + ["  two  spaces\tand a tab"])


def test_qwen25_coder_greedy_matches_transformers(qwen25_coder_gguf):
    llm = LLM(qwen25_coder_gguf, **ENGINE)
    tok = llm.get_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in chat  # the file's own (tools-aware) chat template
    assert_greedy_matches_transformers(llm, qwen25_coder_gguf, PROMPTS + [chat])
    assert llm.loaded.config.architecture == "Qwen2ForCausalLM"
    assert_tokenizer_matches_transformers(llm, qwen25_coder_gguf, PROMPTS + ["  def f(x):\n\treturn x * 2"])
