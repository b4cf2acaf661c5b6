"""The decoder every generating family runs: one pre-norm layer driven by the ModelConfig and its
layer's LayerSpec (q/k/v bias, q/k norm, sliding window and RoPE base per layer, score scale and
soft-capping, sandwich norms, a gated MLP or a mixture of experts), the model API the engine calls
(`DecoderLM`), and the HF tensor names of the Llama layout that Mistral and Qwen checkpoints share.

A family that differs only in what its config says (Llama, Mistral, Qwen2, Qwen3) is a registry
entry pointing at `DecoderLM`; a family file holds only what really differs.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.models.config import LayerSpec, ModelConfig
from jaxserve.models.layers import (AttentionFn, GatedMLP, HFTensor, PagedAttention, Params, RMSNorm,
                                    decoder_forward, decoder_logits, init_decoder_params)
from jaxserve.models.lora import LoRALayer, LoRAWeights
from jaxserve.models.metadata import AttentionMetadata, KVCache
from jaxserve.models.moe import SparseMoE
from jaxserve.pallas_kernels.ragged_paged_attention_jnp import ragged_paged_attention_jnp
from jaxserve.precision import pack


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)), each branch normed again on its way out
    where the config has sandwich norms (Gemma); what varies between families is in `config`,
    what varies between layers in `spec`."""

    config: ModelConfig
    spec: LayerSpec
    attention_fn: AttentionFn

    @nn.compact
    def __call__(self, x: jax.Array, kv_cache: KVCache, layer: jax.Array, md: AttentionMetadata,
                 lora: LoRALayer | None = None) -> tuple[jax.Array, KVCache]:  # x [T, D]
        cfg, spec = self.config, self.spec
        h = RMSNorm(cfg.rms_norm_eps, name="attn_norm")(x)
        h, kv_cache = PagedAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            rope_theta=spec.rope_theta, rope_scaling=spec.rope_scaling, qkv_bias=cfg.attention_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None, sliding_window=spec.sliding_window,
            sm_scale=cfg.sm_scale, soft_cap=cfg.attn_logit_softcap, rotary_dim=cfg.rotary_dim,
            attention_fn=self.attention_fn, name="attn")(h, kv_cache, layer, md, lora)
        if cfg.sandwich_norms:
            h = RMSNorm(cfg.rms_norm_eps, name="post_attn_norm")(h)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, name="mlp_norm")(x)
        if cfg.num_experts:  # adapters reach the attention projections only (models/lora.py)
            h = SparseMoE(cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.hidden_activation,
                          cfg.norm_topk_prob, cfg.shared_expert_intermediate_size, name="mlp")(h)
        else:
            h = GatedMLP(cfg.intermediate_size, cfg.hidden_activation, name="mlp")(h, lora)
        if cfg.sandwich_norms:
            h = RMSNorm(cfg.rms_norm_eps, name="post_mlp_norm")(h)
        return x + h, kv_cache


@dataclasses.dataclass(frozen=True)
class DecoderLM:
    """What the engine calls on every generating family: stateless and hashable (all weights live
    in the params pytree passed to each call)."""

    config: ModelConfig
    supports_lora = True  # its projections take per-token LoRA updates (models/lora.py)

    def decoder_layer(self, attention_fn: AttentionFn, spec: LayerSpec | None = None) -> nn.Module:
        """The layer module of `spec` (default: the first layer's; every spec has the same params)."""
        return DecoderLayer(self.config, spec or self.config.layer_specs()[0], attention_fn)

    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        return decoder_tensor_map(self.config)

    def init_params(self, rng: jax.Array, dtype=jnp.float32) -> Params:
        return init_decoder_params(self.decoder_layer(ragged_paged_attention_jnp), self.config, rng, dtype)

    def forward(self, params: Params, tokens: jax.Array, kv_cache: KVCache, md: AttentionMetadata,
                *, attention_fn: AttentionFn = ragged_paged_attention_jnp, lora: LoRAWeights | None = None,
                lora_slots: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """tokens [T] int32 -> hidden [T, D] after the final norm, and the cache with this step's K/V.
        lora / lora_slots: the resident adapters and each token's slot (models/lora.py)."""
        return decoder_forward(lambda spec: self.decoder_layer(attention_fn, spec), self.config.layer_specs(),
                               params, tokens, kv_cache, md, rms_norm_eps=self.config.rms_norm_eps,
                               scale_embeddings=self.config.scale_embeddings, lora=lora, lora_slots=lora_slots)

    def storage_form(self, params: Params) -> Params:
        """The params as the step reads them: the stacked layers packed where bf16 is (see
        jaxserve/precision.py: the scan slices them). The embedding stays as it is: XLA:CPU fuses
        its bf16 row gather and runs the bf16 logits dot natively."""
        return {**params, "layers": jax.tree_util.tree_map(pack, params["layers"])}

    def compute_logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """hidden [R, D] -> logits [R, V] float32."""
        return decoder_logits(params, hidden, self.config.tie_word_embeddings, self.config.final_logit_softcap)


def decoder_tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], HFTensor]:
    """Our parameter path -> HF checkpoint tensor, in the names LlamaForCausalLM, Mistral and Qwen
    checkpoints share, with the optional pieces the config asks for."""
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
    if cfg.attention_bias:
        for proj, heads in (("q", N), ("k", K), ("v", K)):
            names[("layers", "attn", f"{proj}_bias")] = HFTensor(f"{layer}.self_attn.{proj}_proj.bias",
                                                                 (heads * H,))
    if cfg.qk_norm:
        names[("layers", "attn", "q_norm", "scale")] = HFTensor(f"{layer}.self_attn.q_norm.weight", (H,))
        names[("layers", "attn", "k_norm", "scale")] = HFTensor(f"{layer}.self_attn.k_norm.weight", (H,))
    if not cfg.tie_word_embeddings:
        names[("lm_head",)] = HFTensor("lm_head.weight", (V, D), True)
    return names
