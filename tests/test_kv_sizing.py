"""How many KV pages an engine gets: on an accelerator, what its memory (x gpu_memory_utilization)
leaves after the weights and the largest step's own buffers, the latter from XLA's memory analysis
of the compiled graphs. CPUs have no device memory limit: the accelerator path runs here with one
given to it."""
from __future__ import annotations

import jax
import pytest

from jaxserve import LLM, engine as engine_module
from jaxserve.engine import kv_page_bytes
from jaxserve.kv_cache_dtype import kv_cache_dtype
from jaxserve.pallas_kernels import attention_backend
from jaxserve.runner import step_memory_bytes
from testlib import PAGE_SIZE

ARGS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=PAGE_SIZE)


def test_accelerator_pages_are_what_weights_and_the_step_leave(tiny_checkpoint, monkeypatch):
    folder = tiny_checkpoint("llama")[0]
    limit = 64 << 20
    monkeypatch.setattr(engine_module, "accelerator_memory_limit", lambda: limit)
    llm = LLM(folder, gpu_memory_utilization=0.5, **ARGS)
    engine = llm.engine
    leaves = jax.tree_util.tree_leaves(llm.loaded.params)
    step = step_memory_bytes(llm.loaded.model, llm.loaded.params, block_size=PAGE_SIZE, max_model_len=64,
                             max_num_seqs=4, max_num_batched_tokens=16, attention_fn=attention_backend("jnp"),
                             mesh=engine.runner.mesh)
    assert step > 0
    page = kv_page_bytes(llm.loaded.config, PAGE_SIZE, llm.engine.runner.kv_cache_dtype)
    want = (limit // 2 - sum(x.nbytes for x in leaves) - step) // page + 1
    assert engine.pool.num_pages == engine.runner.kv_cache.k.shape[1] == want
    # The step's share counts: without it the cache would be larger by its worth in pages.
    assert step // page >= 1
    out = llm.generate(["w5 w6 w7"], use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) > 0


def test_step_memory_counts_the_largest_buckets_own_buffers(tiny_checkpoint):
    from jaxserve.models import load_model

    loaded = load_model(tiny_checkpoint("llama")[0], "float32")
    args = dict(block_size=PAGE_SIZE, max_model_len=64, attention_fn=attention_backend("jnp"), mesh=None)
    small = step_memory_bytes(loaded.model, loaded.params, max_num_seqs=4, max_num_batched_tokens=16, **args)
    large = step_memory_bytes(loaded.model, loaded.params, max_num_seqs=64, max_num_batched_tokens=256, **args)
    vocab = loaded.config.vocab_size
    # At least the [B, V] float32 logits of the largest batch bucket come out of a step.
    assert large > small >= 8 * vocab * 4 and large >= 64 * vocab * 4


def test_a_memory_limit_too_small_for_the_cache_is_refused_naming_the_numbers(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(engine_module, "accelerator_memory_limit", lambda: 1 << 16)  # below the weights
    with pytest.raises(ValueError, match="no device memory left for the KV cache: 0.00 GiB x "
                                         "gpu_memory_utilization 0.9 leaves"):
        LLM(tiny_checkpoint("llama")[0], **ARGS)


def test_explicit_kv_cache_memory_skips_the_measurement(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(engine_module, "accelerator_memory_limit", lambda: 1 << 16)  # would be refused
    llm = LLM(tiny_checkpoint("llama")[0], kv_cache_memory=1 << 20, **ARGS)
    page = kv_page_bytes(llm.loaded.config, PAGE_SIZE, kv_cache_dtype("auto", "float32"))
    assert page == 2 * 2 * PAGE_SIZE * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads, head dim 16, float32
    assert llm.engine.pool.num_pages == (1 << 20) // page + 1
