"""int8 weights (models/quantization.py): the stored form reconstructs the weight to half a
quantization step, the int8 dot computes its float reference (each token's outliers split out, the
rest on its own scale) for every projection's einsum, only the decoder layers' projections are
quantized, and a quantized model computes (nearly) the float model's function."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.config import ModelConfig
from jaxserve.models.decoder import DecoderLM
from jaxserve.models.metadata import AttentionMetadata, KVCache
from jaxserve.models.quantization import (QuantizedWeight, int8_einsum, quantize_int8, quantize_params,
                                          weights_dtype)

# (spec, x shape, w shape, w's contracted axes): the projections of models/layers.py
PROJECTIONS = [("TD,DNH->TNH", (5, 32), (32, 4, 8), (0,)),
               ("TNH,NHD->TD", (5, 4, 8), (4, 8, 32), (0, 1)),
               ("TD,DF->TF", (5, 32), (32, 48), (0,)),
               ("TF,FD->TD", (5, 48), (48, 32), (0,))]


def test_int8_reconstructs_each_weight_to_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 32, 4, 8)) * jnp.arange(1, 9)  # channels of different ranges
    qw = quantize_int8(w, (1,))
    assert qw.q.dtype == jnp.int8 and qw.scale.shape == (3, 4, 8) and int(jnp.max(jnp.abs(qw.q))) == 127
    error = jnp.abs(qw.dequantize() - w)
    assert bool(jnp.all(error <= qw.scale[:, None] / 2 + 1e-6))


def test_an_all_zero_channel_stays_zero():
    w = jnp.zeros((16, 4)).at[:, 1].set(1.0)
    qw = quantize_int8(w, (0,))
    assert np.array_equal(np.asarray(qw.dequantize()), np.asarray(w))


def int8_einsum_reference(spec, x, qw):
    """int8_einsum in float, row by row: each token's qw.outliers largest-magnitude activations
    exact, the rest rounded to its own absmax / 127 grid, times the dequantized weight."""
    n = len(qw.contracted)
    rows = np.asarray(x, np.float64).reshape(-1, int(np.prod(x.shape[-n:])))
    kept = np.zeros_like(rows)
    for r, row in enumerate(rows):
        top = np.argsort(-np.abs(row), kind="stable")[:qw.outliers]
        rest = row.copy()
        rest[top] = 0.0
        scale = np.abs(rest).max() / 127
        kept[r] = np.round(rest / scale) * scale
        kept[r, top] = row[top]
    return jnp.einsum(spec, jnp.asarray(kept.reshape(x.shape), jnp.float32), qw.dequantize())


@pytest.mark.parametrize("outliers", [0, 4])
@pytest.mark.parametrize("spec,x_shape,w_shape,contracted", PROJECTIONS)
def test_int8_einsum_computes_its_reference(spec, x_shape, w_shape, contracted, outliers):
    kx, kw = jax.random.split(jax.random.key(1))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    qw = quantize_int8(w, contracted, outliers)
    got = int8_einsum(spec, x, qw)
    np.testing.assert_allclose(got, int8_einsum_reference(spec, x, qw), rtol=1e-4, atol=1e-4)
    # ... and close to the float product: int8 keeps about two decimal digits.
    exact = jnp.einsum(spec, x, w)
    assert float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)) < 0.02


def test_a_tokens_outliers_no_longer_set_its_scale():
    """One channel 100x the rest, as an RMSNorm output carries: on one scale per token the other
    channels round to a grid about as coarse as they are large; split out, to 1/127 of their own."""
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (5, 64)).at[:, 7].multiply(100.0)
    w = jax.random.normal(kw, (64, 48))
    others = x.at[:, 7].set(0.0) @ w  # the other channels' share of the product

    def activation_error(outliers):  # against the same int8 weights times the exact activations
        qw = quantize_int8(w, (0,), outliers)
        return float(jnp.linalg.norm(int8_einsum("TD,DF->TF", x, qw) - x @ qw.dequantize()) / jnp.linalg.norm(others))

    assert activation_error(0) > 0.1 and activation_error(4) < 0.01


TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=128, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)


def test_only_the_layer_projections_are_quantized():
    params = DecoderLM(TINY).init_params(jax.random.key(0))
    quantized = quantize_params(params, "int8")
    layers = quantized["layers"]
    for module, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            assert isinstance(layers[module][name], QuantizedWeight), name
            assert layers[module][name].shape == params["layers"][module][name].shape
    assert quantized["embed"] is params["embed"] and layers["attn_norm"]["scale"] is params["layers"]["attn_norm"]["scale"]
    assert layers["attn"]["o_proj"].scale.shape == (2, 64)  # [L, N, H, D] contracts N and H
    assert layers["attn"]["q_proj"].outliers == layers["mlp"]["down_proj"].outliers == 4
    assert layers["attn"]["o_proj"].outliers == 0
    assert weights_dtype(quantized) == jnp.float32
    assert quantize_params(params, None) is params
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_params(params, "int4")


def test_a_quantized_model_computes_the_float_models_function():
    model = DecoderLM(TINY)
    params = model.init_params(jax.random.key(0))
    T = 6
    md = AttentionMetadata(positions=jnp.arange(T, dtype=jnp.int32), slot_mapping=jnp.arange(T, dtype=jnp.int32) + 8,
                           cu_q_lens=jnp.array([0, T], jnp.int32), kv_lens=jnp.array([T], jnp.int32),
                           page_table=jnp.array([[1, 2]], jnp.int32), num_seqs=jnp.array(1, jnp.int32))
    cache = KVCache(k=jnp.zeros((2, 3, 4, 2, 16)), v=jnp.zeros((2, 3, 4, 2, 16)))
    tokens = jnp.array([3, 17, 5, 99, 64, 2], jnp.int32)
    exact, _ = model.forward(params, tokens, cache, md)
    got, _ = model.forward(quantize_params(params, "int8"), tokens, cache, md)
    cosine = jnp.sum(exact * got, axis=-1) / (jnp.linalg.norm(exact, axis=-1) * jnp.linalg.norm(got, axis=-1))
    assert float(jnp.min(cosine)) > 0.999
    assert not np.allclose(exact, got, atol=1e-6)  # it really ran the int8 path
