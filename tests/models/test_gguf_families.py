"""GGUF files of the architectures no small real file exists for (experts, Gemma 2 / 3, Phi-3):
a tiny transformers model written as llama.cpp lays it out (tests/models/gguf_writer.py) loads as
the same model its safetensors checkpoint loads as: the same params and the same logits.

Where a GGUF cannot say what the tiny model's config does (Gemma's score scale, Gemma 3's layer
pattern), the tiny model takes what GGUF readers assume: a scale of 256 ** -0.5, one global
layer in six."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from gguf_writer import write_gguf
from jaxserve.models import load_model
from testlib import make_hf_model, save_tiny_tokenizer

CASES = {
    "mixtral": {},  # "llama" with experts, q/k rows permuted
    "qwen2_moe": {},
    "qwen3_moe": {},
    "gemma2": dict(query_pre_attn_scalar=256),
    "gemma3": dict(query_pre_attn_scalar=256, num_hidden_layers=6, layer_types=None),
    "phi3": {},
}


@pytest.mark.parametrize("kind", list(CASES))
def test_gguf_loads_as_the_same_model_as_safetensors(tmp_path, kind, ragged_batch, kv_cache_factory):
    hf_model = make_hf_model(kind, **CASES[kind])
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    save_tiny_tokenizer(tmp_path)
    write_gguf(hf_model, str(tmp_path), str(tmp_path / "model.gguf"))
    want = load_model(str(tmp_path), "float32")
    got = load_model(str(tmp_path / "model.gguf"), "float32", weight_cache=False)
    assert got.config.architecture == want.config.architecture
    assert (got.config.num_experts, got.config.layer_types) == (want.config.num_experts, want.config.layer_types)
    flat_want, flat_got = (traverse_util.flatten_dict(m.params) for m in (want, got))
    assert set(flat_got) == set(flat_want)
    for path in flat_want:
        np.testing.assert_allclose(np.asarray(flat_got[path]), np.asarray(flat_want[path]), atol=1e-6, rtol=0,
                                   err_msg="/".join(path))
    prompt = list(np.random.default_rng(1).integers(3, 300, 11))
    batch = ragged_batch([(prompt, 0)], [[3, 1, 5]])
    logits = []
    for lm in (want, got):
        hidden, _ = jax.jit(lm.model.forward)(lm.params, batch.tokens, kv_cache_factory(lm.config, 8), batch.md)
        logits.append(np.asarray(lm.model.compute_logits(lm.params, hidden))[batch.q_slices[0]])
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5, rtol=0)
