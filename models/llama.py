"""The Llama family (Llama 2, 3, 3.1, 3.2; SmolLM2): pre-norm decoder layers with grouped-query
attention, RoPE (optionally llama3-scaled) and a SwiGLU MLP; tied or separate output embedding.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from jaxserve.models.config import ModelConfig
from jaxserve.models.layers import (AttentionFn, DecoderLM, HFTensor, PagedAttention, RMSNorm, SwiGLU)
from jaxserve.models.metadata import AttentionMetadata, KVCache


class LlamaDecoderLayer(nn.Module):
    config: ModelConfig
    attention_fn: AttentionFn

    @nn.compact
    def __call__(self, x: jax.Array, kv_cache: KVCache, layer: jax.Array,
                 md: AttentionMetadata) -> tuple[jax.Array, KVCache]:  # x [T, D]
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, name="attn_norm")(x)
        h, kv_cache = PagedAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
            attention_fn=self.attention_fn, name="attn")(h, kv_cache, layer, md)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(x)
        return x + SwiGLU(cfg.intermediate_size, name="mlp")(h), kv_cache


@dataclasses.dataclass(frozen=True)
class LlamaModel(DecoderLM):
    def decoder_layer(self, attention_fn: AttentionFn) -> LlamaDecoderLayer:
        return LlamaDecoderLayer(self.config, attention_fn)

    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        return hf_tensor_map(self.config)


def hf_tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], HFTensor]:
    """Our parameter path -> HF checkpoint tensor (LlamaForCausalLM names)."""
    D, N, K, H, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.vocab_size)
    layer = "model.layers.{l}"
    names = {
        ("embed",): HFTensor("model.embed_tokens.weight", (V, D)),
        ("final_norm", "scale"): HFTensor("model.norm.weight", (D,)),
        ("layers", "attn_norm", "scale"): HFTensor(f"{layer}.input_layernorm.weight", (D,)),
        ("layers", "attn", "q_proj"): HFTensor(f"{layer}.self_attn.q_proj.weight", (N * H, D), True),
        ("layers", "attn", "k_proj"): HFTensor(f"{layer}.self_attn.k_proj.weight", (K * H, D), True),
        ("layers", "attn", "v_proj"): HFTensor(f"{layer}.self_attn.v_proj.weight", (K * H, D), True),
        ("layers", "attn", "o_proj"): HFTensor(f"{layer}.self_attn.o_proj.weight", (D, N * H), True),
        ("layers", "mlp_norm", "scale"): HFTensor(f"{layer}.post_attention_layernorm.weight", (D,)),
        ("layers", "mlp", "gate_proj"): HFTensor(f"{layer}.mlp.gate_proj.weight", (F, D), True),
        ("layers", "mlp", "up_proj"): HFTensor(f"{layer}.mlp.up_proj.weight", (F, D), True),
        ("layers", "mlp", "down_proj"): HFTensor(f"{layer}.mlp.down_proj.weight", (D, F), True),
    }
    if not cfg.tie_word_embeddings:
        names[("lm_head",)] = HFTensor("lm_head.weight", (V, D), True)
    return names
