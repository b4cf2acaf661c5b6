"""The bundled SmolLM2-135M-Instruct Q4_1 GGUF loads with the right config and tokenizer, and its
logits and greedy continuation match transformers' own GGUF loader (same dequantised weights).
"""
from __future__ import annotations


import jax
import numpy as np
import pytest
import torch

from jaxserve.models import bundled_model_path

MAX_NEW_TOKENS = 8


@pytest.fixture(scope="session")
def smollm2(smollm2_llm, smollm2_hf):
    """(LoadedModel, transformers model, prompt ids), shared with the engine tests (tests/conftest.py)."""
    lm, hf = smollm2_llm.loaded, smollm2_hf
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(prompt, add_special_tokens=False).input_ids
    return lm, hf, [int(i) for i in ids]


def test_bundled_gguf_config_and_tokenizer(smollm2):
    lm, _, ids = smollm2
    cfg = lm.config
    assert lm.source == bundled_model_path() and lm.name == "SmolLM2-135M-Instruct.Q4_1"
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == \
        ("LlamaForCausalLM", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and "lm_head" not in lm.params
    assert cfg.rope_theta == 100000.0 and cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert lm.tokenizer.chat_template and "<|im_start|>" in lm.tokenizer.chat_template
    assert lm.tokenizer.decode(ids).startswith("<|im_start|>system")
    assert lm.params["embed"].dtype == np.float32


def test_bundled_gguf_matches_transformers(smollm2, ragged_batch, kv_cache_factory):
    lm, hf, ids = smollm2
    num_tokens = 64
    assert len(ids) + MAX_NEW_TOKENS <= num_tokens
    table = [list(range(1, 1 + num_tokens // 4))]
    cache = kv_cache_factory(lm.config, 1 + num_tokens // 4)

    @jax.jit
    def step(params, tokens, cache, md):
        hidden, cache = lm.model.forward(params, tokens, cache, md)
        return lm.model.compute_logits(params, hidden), cache

    prefill = ragged_batch([(ids, 0)], table, num_tokens=num_tokens, max_seqs=2, width=16)
    logits, cache = step(lm.params, prefill.tokens, cache, prefill.md)
    ours = np.asarray(logits)[prefill.q_slices[0]]

    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(ref).max()
    max_abs = np.abs(ours - ref).max()
    print(f"\nSmolLM2 GGUF prompt logits: max |ours - transformers| = {max_abs:.3g} "
          f"(logit scale {scale:.3g})")
    assert max_abs <= 1e-3 * scale

    # Greedy decode through the paged cache, one token per step, against transformers' generate.
    generated = [int(np.argmax(ours[-1]))]
    for _ in range(MAX_NEW_TOKENS - 1):
        n = len(ids) + len(generated)
        decode = ragged_batch([([generated[-1]], n - 1)], table, num_tokens=8, max_seqs=2, width=16)
        logits, cache = step(lm.params, decode.tokens, cache, decode.md)
        generated.append(int(np.argmax(np.asarray(logits)[decode.q_slices[0]][-1])))
    with torch.no_grad():
        expected = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
    print(f"SmolLM2 greedy continuation: {lm.tokenizer.decode(generated)!r}")
    assert generated == expected.tolist(), (lm.tokenizer.decode(generated), lm.tokenizer.decode(expected))
