"""BERT encoders (BertModel: all-MiniLM-L6-v2 and other sentence-transformers checkpoints): learned
absolute positions, post-norm layers with biases everywhere and exact GELU, bidirectional attention
within each text of a ragged batch. They embed; they do not generate.

`BertEncoder.encode` maps a flat batch of whole texts (tokens, positions, the text of each token)
to the last layer's hidden states; pooling them into one vector per text is the pooling runner's
(models/pooling.py). The HF tensor names are at the bottom.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.models.config import ModelConfig
from jaxserve.models.layers import HFTensor, LayerNorm, Params, dense, layer_norm, segment_attention
from jaxserve.precision import activation_dtype, pack, unpack

_kernel_init = nn.initializers.normal(stddev=0.02)


def _bias(module: nn.Module, name: str, shape: tuple[int, ...], like: jax.Array) -> jax.Array:
    return unpack(module.param(name, nn.initializers.zeros, shape)).astype(like.dtype)


class SelfAttention(nn.Module):
    """q/k/v projections with biases, attention within each text, output projection with bias."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:  # x [T, D]
        D, N, H = x.shape[-1], self.num_heads, self.head_dim
        with jax.named_scope("attention"):
            q, k, v = (dense("TD,DNH->TNH", x, self.param(f"{p}_proj", _kernel_init, (D, N, H)))
                       + _bias(self, f"{p}_bias", (N, H), x) for p in "qkv")  # [T, N, H] each
            out = segment_attention(q, k, v, segment_ids, sm_scale=H ** -0.5)  # [T, N, H]
            o_proj = self.param("o_proj", _kernel_init, (N, H, D))
            return dense("TNH,NHD->TD", out, o_proj) + _bias(self, "o_bias", (D,), x)


class GeluMLP(nn.Module):
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        D, F = x.shape[-1], self.intermediate_size
        with jax.named_scope("mlp"):
            h = dense("TD,DF->TF", x, self.param("up_proj", _kernel_init, (D, F))) + _bias(self, "up_bias", (F,), x)
            h = jax.nn.gelu(h, approximate=False)  # BERT's "gelu" is the exact erf form
            return dense("TF,FD->TD", h, self.param("down_proj", _kernel_init, (F, D))) + _bias(self, "down_bias",
                                                                                                  (D,), x)


class BertLayer(nn.Module):
    """norm(x + attention(x)), then norm(x + mlp(x)): BERT normalises after each residual."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:  # x [T, D]
        cfg = self.config
        x = LayerNorm(cfg.rms_norm_eps, name="attn_norm")(
            x + SelfAttention(cfg.num_heads, cfg.head_dim, name="attn")(x, segment_ids))
        return LayerNorm(cfg.rms_norm_eps, name="mlp_norm")(x + GeluMLP(cfg.intermediate_size, name="mlp")(x))


@dataclasses.dataclass(frozen=True)
class BertEncoder:
    """What the pooling runner calls on a BERT model: stateless and hashable, as DecoderLM."""

    config: ModelConfig
    # BertModel checkpoints carry a pooler (a tanh dense over [CLS] for next-sentence prediction)
    # that sentence-transformers never uses, and old ones a position_ids buffer.
    ignored_tensors: ClassVar[tuple[str, ...]] = ("pooler.", "embeddings.position_ids")

    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        return bert_tensor_map(self.config)

    def init_params(self, rng: jax.Array, dtype=jnp.float32) -> Params:
        """Random parameters (normal(0.02) kernels, unit norms, zero biases), layers stacked on axis 0."""
        cfg = self.config
        x, segments = jnp.zeros((1, cfg.hidden_size), dtype), jnp.zeros((1,), jnp.int32)
        rng_layers, rng_embed, rng_pos, rng_type = jax.random.split(rng, 4)
        layer = BertLayer(cfg)
        layers = jax.vmap(lambda r: layer.init(r, x, segments)["params"])(
            jax.random.split(rng_layers, cfg.num_layers))
        params = {
            "embed": _kernel_init(rng_embed, (cfg.vocab_size, cfg.hidden_size)),
            "position_embed": _kernel_init(rng_pos, (cfg.max_position_embeddings, cfg.hidden_size)),
            "type_embed": _kernel_init(rng_type, (cfg.type_vocab_size, cfg.hidden_size)),
            "embed_norm": {"scale": jnp.ones((cfg.hidden_size,)), "bias": jnp.zeros((cfg.hidden_size,))},
            "layers": layers,
        }
        return jax.tree_util.tree_map(lambda p: p.astype(dtype), params)

    def storage_form(self, params: Params) -> Params:
        """The params as the graphs read them: stacked layers packed where bf16 is (precision.py)."""
        return {**params, "layers": jax.tree_util.tree_map(pack, params["layers"])}

    def encode(self, params: Params, tokens: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> jax.Array:
        """tokens, positions, segment_ids [T] int32 -> the last layer's hidden states [T, D]. Every
        token is of token type 0, as sentence-transformers encodes single texts."""
        dtype = activation_dtype(params["embed"].dtype)
        x = (params["embed"][tokens].astype(dtype) + params["position_embed"][positions].astype(dtype)
             + params["type_embed"][0].astype(dtype))  # [T, D]
        norm = params["embed_norm"]
        x = layer_norm(x, norm["scale"], norm["bias"], self.config.rms_norm_eps)
        layer = BertLayer(self.config)

        def body(x, layer_params):
            with jax.named_scope("encoder_layer"):
                return layer.apply({"params": layer_params}, x, segment_ids), None

        x, _ = jax.lax.scan(body, x, params["layers"])
        return x


def bert_tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], HFTensor]:
    """Our parameter path -> BertModel checkpoint tensor."""
    D, N, H, F = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
    layer = "encoder.layer.{l}"
    names = {
        ("embed",): HFTensor("embeddings.word_embeddings.weight", (cfg.vocab_size, D)),
        ("position_embed",): HFTensor("embeddings.position_embeddings.weight", (cfg.max_position_embeddings, D)),
        ("type_embed",): HFTensor("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, D)),
        ("embed_norm", "scale"): HFTensor("embeddings.LayerNorm.weight", (D,)),
        ("embed_norm", "bias"): HFTensor("embeddings.LayerNorm.bias", (D,)),
        ("layers", "attn", "o_proj"): HFTensor(f"{layer}.attention.output.dense.weight", (D, N * H), True),
        ("layers", "attn", "o_bias"): HFTensor(f"{layer}.attention.output.dense.bias", (D,)),
        ("layers", "attn_norm", "scale"): HFTensor(f"{layer}.attention.output.LayerNorm.weight", (D,)),
        ("layers", "attn_norm", "bias"): HFTensor(f"{layer}.attention.output.LayerNorm.bias", (D,)),
        ("layers", "mlp", "up_proj"): HFTensor(f"{layer}.intermediate.dense.weight", (F, D), True),
        ("layers", "mlp", "up_bias"): HFTensor(f"{layer}.intermediate.dense.bias", (F,)),
        ("layers", "mlp", "down_proj"): HFTensor(f"{layer}.output.dense.weight", (D, F), True),
        ("layers", "mlp", "down_bias"): HFTensor(f"{layer}.output.dense.bias", (D,)),
        ("layers", "mlp_norm", "scale"): HFTensor(f"{layer}.output.LayerNorm.weight", (D,)),
        ("layers", "mlp_norm", "bias"): HFTensor(f"{layer}.output.LayerNorm.bias", (D,)),
    }
    for proj, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
        names[("layers", "attn", f"{proj}_proj")] = HFTensor(f"{layer}.attention.self.{hf_name}.weight",
                                                             (N * H, D), True)
        names[("layers", "attn", f"{proj}_bias")] = HFTensor(f"{layer}.attention.self.{hf_name}.bias", (N * H,))
    return names
