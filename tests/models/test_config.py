"""ModelConfig parsing (transformers 4 and 5 layouts), validation messages, and RoPE inverse
frequencies against transformers' own rotary embedding.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from jaxserve.models import ModelConfig, RopeScaling
from jaxserve.models.layers import rope_inv_freq

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def test_rope_parameters_and_legacy_rope_scaling_agree():
    v5 = ModelConfig.from_hf_config({**_BASE, "architectures": ["LlamaForCausalLM"], "rope_theta": None,
                                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                         "factor": 32.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8192}})
    v4 = ModelConfig.from_hf_config({**_BASE, "model_type": "llama", "rope_theta": 500000.0,
                                     "rope_scaling": {"type": "llama3", "factor": 32.0,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}})
    assert v4 == v5 and hash(v4) == hash(v5)
    assert v5.rope_theta == 500000.0 and v5.rope_scaling.rope_type == "llama3"
    assert v5.head_dim == 16 and v5.architecture == "LlamaForCausalLM"


def test_family_specific_fields():
    qwen2 = ModelConfig.from_hf_config({**_BASE, "architectures": ["Qwen2ForCausalLM"],
                                        "use_sliding_window": False, "sliding_window": 4096,
                                        "tie_word_embeddings": True, "eos_token_id": [7, 8]})
    assert qwen2.attention_bias and not qwen2.qk_norm and qwen2.sliding_window is None
    assert qwen2.tie_word_embeddings and qwen2.eos_token_ids == (7, 8)
    qwen3 = ModelConfig.from_hf_config({**_BASE, "architectures": ["Qwen3ForCausalLM"], "head_dim": 32})
    assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.attention_bias
    with pytest.raises(ValueError, match="LlamaForCausalLM with attention_bias=True"):
        ModelConfig.from_hf_config({**_BASE, "architectures": ["LlamaForCausalLM"], "attention_bias": True})
    mistral = ModelConfig.from_hf_config({**_BASE, "architectures": ["MistralForCausalLM"],
                                          "sliding_window": 4096, "eos_token_id": 2})
    assert mistral.sliding_window == 4096 and mistral.eos_token_ids == (2,)
    # Qwen slides from max_window_layers on: per layer, one traced body per kind of layer.
    partial = ModelConfig.from_hf_config({**_BASE, "architectures": ["Qwen2ForCausalLM"],
                                          "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1})
    assert partial.layer_types == ("full_attention", "sliding_attention") and partial.sliding_window == 64
    assert [s.sliding_window for s in partial.layer_specs()] == [None, 64]


def test_validation_names_bad_values():
    good = ModelConfig.from_hf_config({**_BASE, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match=r"num_heads \(6\).*num_kv_heads \(4\)"):
        dataclasses.replace(good, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="hidden_size.*-1"):
        dataclasses.replace(good, hidden_size=-1)
    with pytest.raises(ValueError, match="'GPTNeoXForCausalLM'.*LlamaForCausalLM"):
        dataclasses.replace(good, architecture="GPTNeoXForCausalLM")
    with pytest.raises(ValueError, match="'yarn'"):
        ModelConfig.from_hf_config({**_BASE, "architectures": ["LlamaForCausalLM"],
                                    "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
])
def test_rope_inv_freq_matches_transformers(rope):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                                  rope_theta=500000.0, rope_scaling=rope)
    ours = ModelConfig.from_hf_config(hf.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    expected = LlamaRotaryEmbedding(hf).inv_freq.numpy()
    got = rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_llama_cpp_freq_factors_reproduce_llama3():
    # llama.cpp's converter stores llama3 scaling as one divisor per frequency (rope_freqs.weight).
    head_dim, theta, factor, low, high, old = 128, 500000.0, 8.0, 1.0, 4.0, 8192
    plain = rope_inv_freq(head_dim, theta, None)
    divisors = []
    for freq in plain:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            divisors.append(1.0)
        elif wavelen > old / low:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    from_factors = rope_inv_freq(head_dim, theta, RopeScaling("freq_factors", freq_factors=tuple(divisors)))
    llama3 = rope_inv_freq(head_dim, theta, RopeScaling("llama3", factor, low, high, old))
    assert not np.allclose(llama3, plain)
    np.testing.assert_allclose(from_factors, llama3, rtol=1e-6)


def test_phi3_longrope_in_the_legacy_su_form_and_the_engines_choice():
    """Phi-3-mini-128k's config.json: rope_scaling {"type": "su", ...} beside a top-level
    original_max_position_embeddings; cos / sin scaled by sqrt(1 + ln(128k / 4k) / ln 4k); the long
    factors only for an engine whose context passes 4k."""
    import math

    hf = {**_BASE, "architectures": ["Phi3ForCausalLM"], "max_position_embeddings": 131072,
          "original_max_position_embeddings": 4096,
          "rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    cfg = ModelConfig.from_hf_config(hf)
    scaling = cfg.rope_scaling
    assert scaling.rope_type == "longrope" and scaling.original_max_position_embeddings == 4096
    assert math.isclose(scaling.attention_factor, math.sqrt(1 + math.log(32) / math.log(4096)))
    assert not scaling.long and not cfg.for_max_model_len(4096).rope_scaling.long
    assert cfg.for_max_model_len(4097).rope_scaling.long
    with pytest.raises(ValueError, match="short_factor has 3 entries, expected the rotary dim / 2 = 8"):
        ModelConfig.from_hf_config({**hf, "rope_scaling": {"type": "su", "short_factor": [1.0] * 3,
                                                           "long_factor": [2.0] * 3}})
