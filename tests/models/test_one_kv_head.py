"""A model with one KV head (multi-query attention: Gemma 3 270M and 1B) stores its pages without
a K axis, and its step graphs never copy the cache.

With a size-1 K axis, XLA:CPU laid the cache out with that axis outermost inside the layer loop
and copied all of it before the loop, in every iteration and after it (the same bytes in another
order): Gemma 3 270M's decode step ran several times slower than its work (benchmarks/README.md,
"One KV head"). Such a model's logits and greedy tokens against transformers: the tiny "gemma3"
kind (one KV head) in tests/models/test_families.py and tests/test_engine_parity.py.
"""
from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest

from jaxserve.kv_cache_dtype import kv_cache_dtype
from jaxserve.models import ModelConfig, model_class
from jaxserve.pallas_kernels import attention_backend
from jaxserve.runner import ModelRunner, forward_key

# A page count no other array of the step shares a size with.
NUM_PAGES = 37
COPY = re.compile(r"= \w+\[([\d,]*)\]\{[\d,]*\} copy\(")


def cache_sized_copies(hlo: str, num_elements: int) -> list[str]:
    """The copy instructions of a compiled module whose result has the cache's element count."""
    return [line.strip() for line in hlo.splitlines()
            if (m := COPY.search(line)) and math.prod(int(d) for d in m.group(1).split(",") if d) == num_elements]


@pytest.fixture(scope="module")
def gemma3_one_kv_head():
    """A tiny random Gemma 3 with one KV head in bf16 (stored packed on CPU, as a served Gemma is):
    six layers, two whole periods of (local, local, global), the shape in which the K axis was
    copied (a period with a tail of two layers was not)."""
    config = ModelConfig(architecture="Gemma3ForCausalLM", vocab_size=320, hidden_size=64, intermediate_size=96,
                         num_layers=6, num_heads=4, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6,
                         rope_theta=1e6, sliding_window=5,
                         layer_types=("sliding_attention", "sliding_attention", "full_attention") * 2,
                         local_rope_theta=1e4, hidden_activation="gelu_tanh", query_pre_attn_scalar=32,
                         scale_embeddings=True, sandwich_norms=True, qk_norm=True, tie_word_embeddings=True,
                         max_position_embeddings=256)
    family = model_class(config.architecture)(config)
    return family, jax.jit(family.init_params, static_argnums=1)(jax.random.key(0), np.dtype("bfloat16"))


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_one_kv_head_pages_have_no_k_axis_and_no_step_copies_them(gemma3_one_kv_head, kv):
    model, params = gemma3_one_kv_head
    cfg = model.config
    runner = ModelRunner(model, params, num_pages=NUM_PAGES, block_size=4, max_model_len=64, max_num_seqs=4,
                         max_num_batched_tokens=32, attention_fn=attention_backend("jnp"),
                         kv_cache_dtype=kv_cache_dtype(kv, "bfloat16"))
    cache = runner.kv_cache
    assert cache.k.shape == cache.v.shape == (cfg.num_layers, NUM_PAGES, 4, cfg.head_dim)
    if kv == "int8":
        assert cache.k_scale.shape == (cfg.num_layers, NUM_PAGES, 4)
    for bucket in ((4, 4), (32, 4)):  # a decode step, and a prefill step (two passes of attention)
        key = forward_key(bucket)
        hlo = runner._executable(key, runner._example_args(key)).as_text()
        assert "while" in hlo  # the layer scan, inside which the copies were
        assert cache_sized_copies(hlo, cache.k.size) == [], f"bucket {bucket} copies the KV cache"
