"""Building blocks shared by every model family: RMSNorm and LayerNorm, RoPE, the gated MLP, the
paged attention block, the encoders' attention within each text of a ragged batch, the decoder
driver that scans stacked layers with the whole KV cache in the carry, and the HF checkpoint
mapping entry.

Axis legend: B batch/sequences, T tokens, N heads, K kv heads, G = N/K, H head dim, D model dim,
F MLP hidden dim, V vocab, P pages, S page size, L layers, W page-table width.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.config import LayerSpec, ModelConfig, RopeScaling
from jaxserve.models.lora import LoRALayer, LoRAWeights, add_lora, token_slot_mask
from jaxserve.models.metadata import AttentionMetadata, KVCache, kv_page_shape
from jaxserve.models.quantization import QuantizedWeight, int8_einsum
from jaxserve.pallas_kernels.ragged_batch import cap_scores
from jaxserve.kv_cache_dtype import QUANT_MAX, quantize
from jaxserve.precision import PACKED, activation_dtype, unpack

# (q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, sm_scale, sliding_window, soft_cap,
# [k_scales, v_scales]) -> out, see pallas_kernels/reference.py for the contract.
AttentionFn = Callable[..., jax.Array]
Params = dict[str, Any]

_kernel_init = nn.initializers.normal(stddev=0.02)


# ----------------------------------------------------------------------------- precision

def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """einsum(spec, x, w) in x's dtype. A lower-precision (or packed) weight is used as stored:
    x is cast down to it and the products accumulate in x's dtype, so the weight is never
    converted per step. An int8 weight (models/quantization.py) runs an int8 dot."""
    if isinstance(w, QuantizedWeight):
        return int8_einsum(spec, x, w)
    w = unpack(w)
    if w.dtype == x.dtype:
        return jnp.einsum(spec, x, w)
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=x.dtype)


# ----------------------------------------------------------------------------- norms, RoPE, MLP

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale * normed.astype(x.dtype)).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        return rms_norm(x, unpack(scale).astype(x.dtype), self.eps)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 (BERT's norms)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D] -> [..., D]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return layer_norm(x, unpack(scale), unpack(bias), self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse RoPE frequencies [H/2] (H: the rotated dims), float32, computed step by step as
    transformers does; longrope's with its short or long factors, as scaling.long says."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [H/2]
    if scaling is not None and scaling.rope_type == "longrope":
        factors = np.asarray(scaling.long_factor if scaling.long else scaling.short_factor, dtype=np.float32)
        return (1.0 / (factors * np.float32(theta) ** exponents)).astype(np.float32)
    inv_freq = 1.0 / (np.float32(theta) ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / np.float32(scaling.factor)
    if scaling.rope_type == "freq_factors":
        # llama.cpp stores llama3-style scaling as per-frequency divisors (the rope_freqs tensor).
        return inv_freq / np.asarray(scaling.freq_factors, dtype=np.float32)
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * inv_freq_llama / np.float32(factor) + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_factor: float = 1.0) -> jax.Array:
    """Rotate the first 2 * len(inv_freq) dims of [T, N, H] by each token's position, HF
    "rotate_half" layout (pairs i and i + R/2); the rest pass through (partial rotary). cos and
    sin are scaled by attention_factor (longrope's)."""
    R = 2 * inv_freq.shape[-1]
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, R/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, R]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    # transformers casts cos/sin to the activation dtype before rotating; do the same.
    cos = cos.astype(x.dtype)[:, None, :]  # [T, 1, R]
    sin = sin.astype(x.dtype)[:, None, :]  # [T, 1, R]
    x_rot, x_pass = x[..., :R], x[..., R:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)  # [T, N, R/2] each
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # [T, N, R]
    out = x_rot * cos + rotated * sin
    return out if R == x.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


# The gated MLP's activations (ModelConfig.hidden_activation): SwiGLU's SiLU, GeGLU's tanh GELU.
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with SiLU, GeGLU with GELU (Gemma)."""

    intermediate_size: int
    activation: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array, lora: LoRALayer | None = None) -> jax.Array:  # [T, D] -> [T, D]
        D, F = x.shape[-1], self.intermediate_size
        gate = self.param("gate_proj", _kernel_init, (D, F))
        up = self.param("up_proj", _kernel_init, (D, F))
        down = self.param("down_proj", _kernel_init, (F, D))
        with jax.named_scope("mlp"):
            h = (ACTIVATIONS[self.activation](add_lora(dense("TD,DF->TF", x, gate), lora, "gate_proj", x))
                 * add_lora(dense("TD,DF->TF", x, up), lora, "up_proj", x))
            return add_lora(dense("TF,FD->TD", h, down), lora, "down_proj", h)


# ----------------------------------------------------------------------------- paged attention

def write_kv(cache: KVCache, layer: jax.Array, slot_mapping: jax.Array,
             k: jax.Array, v: jax.Array) -> KVCache:
    """Scatter this step's k/v [T, K, H] into layer `layer` at `slot_mapping` (flat page * S + offset),
    in the cache's own form: packed bf16 bits, or 8-bit values with their scales [T, K] where the
    cache has scales (jaxserve/kv_cache_dtype.py).

    Writing through the flat all-layers slot view keeps it a single in-place scatter when the
    engine donates the cache (a dynamic_update_slice of one layer would copy it). A cache of one
    KV head has no K axis (`kv_page_shape`), nor does its view: its scales are a vector.
    """
    L, P, S = cache.k.shape[:3]
    slots = layer * (P * S) + slot_mapping  # [T] slot in the flat [L*P*S] view

    def scatter(pages: jax.Array, new: jax.Array) -> jax.Array:
        # A packed cache takes the bits of the bf16 values.
        new = (jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), PACKED) if pages.dtype == PACKED
               else new.astype(pages.dtype))
        # [L*P*S, K, H] pages, [L*P*S, K] scales; one head's: [L*P*S, H], [L*P*S].
        per_slot = pages.shape[3:]
        flat = pages.reshape(L * P * S, *per_slot)
        return flat.at[slots].set(new.reshape(new.shape[0], *per_slot)).reshape(pages.shape)

    if cache.k_scale is None:
        return KVCache(k=scatter(cache.k, k), v=scatter(cache.v, v))
    quant_max = QUANT_MAX[cache.k.dtype]
    k_values, k_scale = quantize(k, cache.k.dtype, quant_max)  # [T, K, H], [T, K]
    v_values, v_scale = quantize(v, cache.v.dtype, quant_max)
    return KVCache(k=scatter(cache.k, k_values), v=scatter(cache.v, v_values),
                   k_scale=scatter(cache.k_scale, k_scale), v_scale=scatter(cache.v_scale, v_scale))


class PagedAttention(nn.Module):
    """q/k/v projection (optional bias, optional per-head q/k RMSNorm), RoPE, KV write, attention."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    attention_fn: AttentionFn
    qkv_bias: bool = False
    qk_norm_eps: float | None = None  # set -> Qwen3-style RMSNorm on each q and k head
    sliding_window: int | None = None
    sm_scale: float | None = None  # None: head_dim ** -0.5
    soft_cap: float | None = None  # scores soft-capped at this (Gemma 2)
    rotary_dim: int | None = None  # dims of each head RoPE rotates; None: all of them

    @nn.compact
    def __call__(self, x: jax.Array, kv_cache: KVCache, layer: jax.Array,
                 md: AttentionMetadata, lora: LoRALayer | None = None) -> tuple[jax.Array, KVCache]:
        D, N, K, H = x.shape[-1], self.num_heads, self.num_kv_heads, self.head_dim
        with jax.named_scope("attention"):
            with jax.named_scope("qkv_proj"):
                q = self._project(x, "q", N, lora)  # [T, N, H]
                k = self._project(x, "k", K, lora)  # [T, K, H]
                v = self._project(x, "v", K, lora)  # [T, K, H]
            if self.qk_norm_eps is not None:
                # Qwen3 normalises each head before RoPE.
                q = RMSNorm(self.qk_norm_eps, name="q_norm")(q)
                k = RMSNorm(self.qk_norm_eps, name="k_norm")(k)
            with jax.named_scope("rope"):
                inv_freq = rope_inv_freq(self.rotary_dim or H, self.rope_theta, self.rope_scaling)
                factor = self.rope_scaling.attention_factor if self.rope_scaling is not None else 1.0
                q = apply_rope(q, md.positions, inv_freq, factor)
                k = apply_rope(k, md.positions, inv_freq, factor)
            with jax.named_scope("kv_write"):
                kv_cache = write_kv(kv_cache, layer, md.slot_mapping, k, v)
            L, P, S = kv_cache.k.shape[:3]
            # All layers' pages as one [L*P, S, K, H] array (a free reshape); this layer's pages are
            # the page ids offset by layer * P.
            with jax.named_scope("paged_attention"):
                # 8-bit pages come with their scales, [L*P, S, K] alike.
                scales = ({} if kv_cache.k_scale is None else
                          dict(k_scales=kv_cache.k_scale.reshape(L * P, S, K),
                               v_scales=kv_cache.v_scale.reshape(L * P, S, K)))
                out = self.attention_fn(
                    q, kv_cache.k.reshape(L * P, S, K, H), kv_cache.v.reshape(L * P, S, K, H),
                    md.kv_lens, md.page_table + layer * P, md.cu_q_lens, md.num_seqs,
                    sm_scale=self.sm_scale or H ** -0.5, sliding_window=self.sliding_window,
                    soft_cap=self.soft_cap, **scales)  # [T, N, H]
            o_proj = self.param("o_proj", _kernel_init, (N, H, D))
            with jax.named_scope("o_proj"):
                y = dense("TNH,NHD->TD", out, o_proj)
                return add_lora(y, lora, "o_proj", out.reshape(out.shape[0], N * H)), kv_cache

    def _project(self, x: jax.Array, name: str, heads: int, lora: LoRALayer | None) -> jax.Array:
        kernel = self.param(f"{name}_proj", _kernel_init, (x.shape[-1], heads, self.head_dim))
        y = add_lora(dense("TD,DNH->TNH", x, kernel), lora, f"{name}_proj", x)
        if self.qkv_bias:
            y = y + unpack(self.param(f"{name}_bias", nn.initializers.zeros, (heads, self.head_dim))).astype(x.dtype)
        return y


# ----------------------------------------------------------------------------- encoder attention

def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      sm_scale: float) -> jax.Array:
    """Bidirectional attention over a ragged batch of whole texts: every token attends to every
    token of its own text (a block-diagonal mask over the flat batch), padding to padding.

    q, k, v [T, N, H]; segment_ids [T] (the text of each token) -> [T, N, H]. Dense in T: the
    pooling runner keeps T to its token budget, so the wasted off-diagonal blocks stay bounded.
    """
    scores = jnp.einsum("TNH,SNH->NTS", q, k, preferred_element_type=jnp.float32) * sm_scale
    same_text = segment_ids[:, None] == segment_ids[None, :]  # [T, S]
    scores = jnp.where(same_text[None], scores, -jnp.inf)  # the diagonal is always allowed: no empty row
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("NTS,SNH->TNH", probs, v)


# ----------------------------------------------------------------------------- decoder driver

def layer_period(specs: tuple[LayerSpec, ...]) -> int:
    """The shortest p with specs[i] == specs[i % p] for every layer: 1 when all layers are alike,
    2 for Gemma 2's alternating layers, 6 for Gemma 3's five local to one global."""
    return next(p for p in range(1, len(specs) + 1) if all(s == specs[i % p] for i, s in enumerate(specs)))


def decoder_forward(make_layer: Callable[[LayerSpec], nn.Module], specs: tuple[LayerSpec, ...], params: Params,
                    tokens: jax.Array, kv_cache: KVCache, md: AttentionMetadata, *, rms_norm_eps: float,
                    scale_embeddings: bool = False, lora: LoRAWeights | None = None,
                    lora_slots: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """embed -> the layers -> final norm. `make_layer(spec)` is a linen module called as
    layer(x, kv_cache, layer_index, md, lora); params["layers"] are stacked on axis 0.

    The layers run as a lax.scan over whole periods of their specs (one traced body per distinct
    spec in a period, so a model whose layers alternate compiles each kind once), then the layers
    past the last whole period. The cache rides in the scan carry: as xs/ys it would be sliced and
    re-stacked (copied) every layer. With `lora` (every slot's adapters, stacked like the layers)
    and `lora_slots` ([T] the slot of each token), each layer gets its slice and the step's token
    mask (models/lora.py).
    """
    embed = params["embed"]
    x = embed[tokens].astype(activation_dtype(embed.dtype))  # [T, D]
    if scale_embeddings:  # Gemma: by sqrt(D) rounded to the weights' dtype, as transformers does
        x = x * jnp.asarray(x.shape[-1] ** 0.5, embed.dtype).astype(x.dtype)
    layers = params["layers"]
    num_layers = len(specs)
    period = layer_period(specs)
    modules = [make_layer(spec) for spec in specs[:period]]
    token_mask = None if lora is None else token_slot_mask(lora_slots, lora.num_slots, x.dtype)  # [T, S]

    def run(j, layer_params, layer_lora, x, cache, index):
        lora_layer = None if layer_lora is None else LoRALayer(layer_lora.a, layer_lora.b, token_mask)
        with jax.named_scope("decoder_layer"):
            return modules[j].apply({"params": layer_params}, x, cache, index, md, lora_layer)

    if period == 1:
        def body(carry, xs):
            layer_params, index, layer_lora = xs
            return run(0, layer_params, layer_lora, *carry, index), None

        (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache),
                                        (layers, jnp.arange(num_layers, dtype=jnp.int32), lora))
    else:
        num_periods, tail = divmod(num_layers, period)

        def at(tree, index):
            return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)

        def body(carry, first):
            for j in range(period):
                carry = run(j, at(layers, first + j), at(lora, first + j), *carry, first + j)
            return carry, None

        firsts = jnp.arange(num_periods, dtype=jnp.int32) * period
        (x, kv_cache), _ = jax.lax.scan(body, (x, kv_cache), firsts)
        for j in range(tail):
            index = num_periods * period + j
            x, kv_cache = run(j, at(layers, index), at(lora, index), x, kv_cache, jnp.int32(index))
    x = rms_norm(x, params["final_norm"]["scale"].astype(x.dtype), rms_norm_eps)
    return x, kv_cache


def decoder_logits(params: Params, hidden: jax.Array, tie_word_embeddings: bool,
                   soft_cap: float | None = None) -> jax.Array:
    """[R, D] -> [R, V] float32, through lm_head or the tied embedding table; soft-capped at
    soft_cap (Gemma 2's final_logit_softcapping) where set."""
    weight = params["embed"] if tie_word_embeddings else params["lm_head"]
    # In the weight's dtype, float32 result: a bf16 table is never converted per step.
    spec = "RD,VD->RV" if tie_word_embeddings else "RD,DV->RV"
    return cap_scores(jnp.einsum(spec, hidden.astype(weight.dtype), weight, preferred_element_type=jnp.float32),
                      soft_cap)


def init_decoder_params(layer: nn.Module, config: ModelConfig, rng: jax.Array,
                        dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms, zero biases), layers stacked on axis 0."""
    K, H = config.num_kv_heads, config.head_dim
    # One token on a one-page cache is enough to make every layer create its parameters.
    x = jnp.zeros((1, config.hidden_size), dtype)
    cache = KVCache(k=jnp.zeros(kv_page_shape(1, 1, 1, K, H), dtype), v=jnp.zeros(kv_page_shape(1, 1, 1, K, H), dtype))
    md = AttentionMetadata(
        positions=jnp.zeros((1,), jnp.int32), slot_mapping=jnp.zeros((1,), jnp.int32),
        cu_q_lens=jnp.array([0, 1], jnp.int32), kv_lens=jnp.ones((1,), jnp.int32),
        page_table=jnp.zeros((1, 1), jnp.int32), num_seqs=jnp.array(1, jnp.int32))
    rng_layers, rng_embed, rng_head = jax.random.split(rng, 3)
    layer_rngs = jax.random.split(rng_layers, config.num_layers)
    layers = jax.vmap(lambda r: layer.init(r, x, cache, jnp.int32(0), md)["params"])(layer_rngs)
    params = {
        "embed": _kernel_init(rng_embed, (config.vocab_size, config.hidden_size)),
        "layers": layers,
        "final_norm": {"scale": jnp.ones((config.hidden_size,))},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = _kernel_init(rng_head, (config.hidden_size, config.vocab_size))
    return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)


# ----------------------------------------------------------------------------- checkpoint mapping

@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where one of our parameters lives in an HF checkpoint.

    `name` has "{l}" for per-layer tensors (stacked on axis 0 of ours); `shape` is the HF shape
    (checked on load); `transpose` turns an HF Linear weight [out, in] into our [in, out] order
    before it is reshaped to our shape (e.g. [N*H, D] -> [D, N*H] -> [D, N, H]); `offset` is
    added to the values (Gemma stores its RMSNorm scales minus one); `rows` takes rows [start,
    stop) of a fused HF tensor (Phi-3's qkv_proj and gate_up_proj) before that.
    """

    name: str
    shape: tuple[int, ...]
    transpose: bool = False
    offset: float = 0.0
    rows: tuple[int, int] | None = None
