"""Every family, loaded from a tiny random safetensors checkpoint, gives transformers' logits on a
ragged paged batch, in one step or over two steps (chunked prefill plus a decode reading the cache).
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxserve.models import load_model

NUM_PAGES = 12
TOL = 1e-4
_rng = np.random.default_rng(0)
# Three prompts of different lengths: 11 and 9 tokens cross page boundaries (page size 4).
PROMPTS = [list(_rng.integers(3, 300, n)) for n in (11, 6, 9)]


@pytest.fixture(scope="module")
def family(tiny_checkpoint):
    """kind -> (LoadedModel, transformers model, jitted forward+logits) loaded once per module."""
    loaded = {}

    def get(kind):
        if kind not in loaded:
            folder, hf_model = tiny_checkpoint(kind)
            lm = load_model(folder, "float32")

            @jax.jit
            def step(params, tokens, cache, md):
                hidden, cache = lm.model.forward(params, tokens, cache, md)
                return lm.model.compute_logits(params, hidden), cache

            loaded[kind] = (lm, hf_model, step)
        return loaded[kind]

    return get


def hf_logits(hf_model, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([list(map(int, tokens))])).logits[0].numpy()  # [len, V]


def test_ragged_batch_matches_transformers(tiny_kind, family, ragged_batch, kv_cache_factory):
    lm, hf_model, step = family(tiny_kind)
    # Scattered, out-of-order pages so a wrong page-table lookup cannot pass by accident.
    page_tables = [[5, 2, 9], [7, 3], [1, 11, 4]]
    batch = ragged_batch([(p, 0) for p in PROMPTS], page_tables)
    cache = kv_cache_factory(lm.config, NUM_PAGES)

    logits, cache = step(lm.params, batch.tokens, cache, batch.md)
    logits = np.asarray(logits)
    assert logits.shape == (32, lm.config.vocab_size) and logits.dtype == np.float32

    for prompt, rows in zip(PROMPTS, batch.q_slices):
        ref = hf_logits(hf_model, prompt)
        assert np.abs(ref).max() > 1.0  # the comparison is meaningful only if logits are not ~0
        np.testing.assert_allclose(logits[rows], ref, atol=TOL, rtol=0)
    # Padding wrote only into page 0; pages nobody owns are untouched.
    unowned = sorted(set(range(1, NUM_PAGES)) - {p for t in page_tables for p in t})
    assert unowned and not np.asarray(cache.k[:, unowned]).any() and not np.asarray(cache.v[:, unowned]).any()


def test_chunked_prefill_and_decode_match_transformers(tiny_kind, family, ragged_batch, kv_cache_factory):
    lm, hf_model, step = family(tiny_kind)
    long_prompt, short_prompt, next_token = PROMPTS[0] + PROMPTS[2][:2], PROMPTS[1][:5], 17
    tables = [[3, 8, 6, 10], [2, 7]]
    cache = kv_cache_factory(lm.config, NUM_PAGES)

    # Step 1: first 7 tokens of the long prompt beside the whole short prompt.
    first = ragged_batch([(long_prompt[:7], 0), (short_prompt, 0)], tables)
    logits1, cache = step(lm.params, first.tokens, cache, first.md)
    # Step 2: the remaining 6 tokens attend to the 7 cached ones; the short one decodes one token.
    second = ragged_batch([(long_prompt[7:], 7), ([next_token], len(short_prompt))], tables)
    logits2, cache = step(lm.params, second.tokens, cache, second.md)

    logits1, logits2 = np.asarray(logits1), np.asarray(logits2)
    long_ours = np.concatenate([logits1[first.q_slices[0]], logits2[second.q_slices[0]]])
    np.testing.assert_allclose(long_ours, hf_logits(hf_model, long_prompt), atol=TOL, rtol=0)
    short_ours = np.concatenate([logits1[first.q_slices[1]], logits2[second.q_slices[1]]])
    np.testing.assert_allclose(short_ours, hf_logits(hf_model, short_prompt + [next_token]), atol=TOL, rtol=0)


def test_model_objects_are_hashable_static_closures(family):
    lm, _, _ = family("llama")
    twin = type(lm.model)(lm.config)
    assert hash(twin) == hash(lm.model) and twin == lm.model
    assert {lm.model: 1}[twin] == 1


def test_attention_fn_receives_all_layers_pages(family, ragged_batch, kv_cache_factory):
    from jaxserve.pallas_kernels import ragged_paged_attention_jnp
    lm, _, step = family("mistral")
    seen = []

    def spy(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale, sliding_window, soft_cap):
        seen.append((q.shape, k_pages.shape, page_table.shape, sm_scale, sliding_window, soft_cap))
        return ragged_paged_attention_jnp(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                          num_seqs, sm_scale=sm_scale, sliding_window=sliding_window)

    batch = ragged_batch([(PROMPTS[0], 0)], [[4, 1, 6]])
    cache = kv_cache_factory(lm.config, NUM_PAGES)
    hidden, _ = jax.jit(lambda p, t, c, md: lm.model.forward(p, t, c, md, attention_fn=spy))(
        lm.params, batch.tokens, cache, batch.md)
    expected, _ = step(lm.params, batch.tokens, cache, batch.md)
    cfg = lm.config
    # Traced once inside the layer scan, with every layer's pages flattened to [L*P, S, K, H].
    assert seen == [((32, cfg.num_heads, cfg.head_dim), (cfg.num_layers * NUM_PAGES, 4, cfg.num_kv_heads,
                                                          cfg.head_dim), (4, 8), cfg.head_dim ** -0.5, 5, None)]
    np.testing.assert_allclose(np.asarray(lm.model.compute_logits(lm.params, hidden)), np.asarray(expected),
                               atol=1e-6)


def test_phi3_longrope_takes_the_long_factors_when_the_engine_context_passes_pretraining(
        tiny_checkpoint, ragged_batch, kv_cache_factory):
    """As vLLM, the factors are chosen once by the engine's context length: past the pre-training
    length (64 here) every sequence takes the long ones, which transformers uses for a prompt
    longer than that; within it, the short ones (the tests above)."""
    folder, hf_model = tiny_checkpoint("phi3")
    lm = load_model(folder, "float32").for_max_model_len(256)
    assert lm.config.rope_scaling.long and not load_model(folder, "float32").config.rope_scaling.long
    prompt = list(_rng.integers(3, 300, 70))  # 70 > 64: transformers switches to the long factors
    pages = list(range(1, 19))  # 18 pages of 4
    batch = ragged_batch([(prompt, 0)], [pages], num_tokens=72, max_seqs=1, width=18)
    hidden, _ = jax.jit(lm.model.forward)(lm.params, batch.tokens, kv_cache_factory(lm.config, 19), batch.md)
    logits = np.asarray(lm.model.compute_logits(lm.params, hidden))[batch.q_slices[0]]
    np.testing.assert_allclose(logits, hf_logits(hf_model, prompt), atol=TOL, rtol=0)
