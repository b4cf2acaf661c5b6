"""The model configuration: one frozen, hashable dataclass shared by every model family.

Built from an HF ``config.json`` dict (both the transformers 4 ``rope_theta``/``rope_scaling`` form
and the transformers 5 ``rope_parameters`` form) or, by the GGUF loader, from GGUF metadata.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxserve.models import registry

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors", "longrope")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_tanh")
# HF's names of the gated MLP's activation -> ours.
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """How RoPE inverse frequencies are rescaled; hashable so the config can be a static jit arg."""

    rope_type: str  # "linear", "llama3", "freq_factors" (llama.cpp's per-frequency divisors) or "longrope"
    factor: float = 1.0  # linear / llama3: context extension factor
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / this are kept as is
    original_max_position_embeddings: int = 8192  # llama3, longrope: pre-training context length
    freq_factors: tuple[float, ...] = ()  # freq_factors: inv_freq[i] is divided by freq_factors[i]
    # longrope (Phi-3): per-frequency divisors for contexts within original_max_position_embeddings
    # and for longer ones, which of them this engine uses (`long`), and the factor every cos / sin
    # is multiplied by. As vLLM, the choice is made once for the engine, by its max_model_len
    # (ModelConfig.for_max_model_len), not per sequence as transformers switches (recomputing the
    # cache): the KV cache and prefix cache then hold one kind of key.
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    long: bool = False
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES[1:]:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.rope_type in ("linear", "llama3") and not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > "
                             f"low_freq_factor ({self.low_freq_factor})")
        if self.rope_type == "freq_factors" and not self.freq_factors:
            raise ValueError("rope_type 'freq_factors' needs a non-empty freq_factors tuple")
        if self.rope_type == "longrope" and not (self.short_factor and len(self.short_factor) == len(self.long_factor)):
            raise ValueError("rope_type 'longrope' needs short_factor and long_factor of the same length")


@dataclasses.dataclass(frozen=True, slots=True)
class LayerSpec:
    """One layer's attention as far as it differs between layers: static, so layers with the same
    spec share one traced body (models/layers.py: decoder_forward)."""

    sliding_window: int | None  # attend to the last this-many positions only; None: all
    rope_theta: float
    rope_scaling: RopeScaling | None


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a transformer: what the shared decoder layer (models/decoder.py) reads
    to run any generating family the registry lists, or a BERT encoder (no RoPE, biases everywhere,
    LayerNorms: models/bert.py)."""

    architecture: str  # HF class name, an entry of models/registry.py; selects the family
    vocab_size: int  # V, rows of the embedding table
    hidden_size: int  # D, model width
    intermediate_size: int  # F, gated MLP hidden width
    num_layers: int  # L, decoder layers
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (GQA when K < N)
    head_dim: int  # H, per-head width (explicit in Qwen3, usually D / N elsewhere)
    rms_norm_eps: float = 1e-6  # epsilon inside every norm (BERT: its LayerNorms' layer_norm_eps)
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_scaling: RopeScaling | None = None  # None = plain RoPE ("default")
    tie_word_embeddings: bool = False  # logits reuse the embedding table (no lm_head)
    attention_bias: bool = False  # bias on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None = None  # attend to the last this-many positions only (Mistral; Gemma's local layers)
    # Per layer "full_attention" or "sliding_attention" (Gemma 2 / 3, Qwen with use_sliding_window);
    # () = every layer slides when sliding_window is set.
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None = rope_theta
    hidden_activation: str = "silu"  # the gated MLP's: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    partial_rotary_factor: float = 1.0  # RoPE rotates the first head_dim * this dims of each head
    query_pre_attn_scalar: float | None = None  # scores scale by this ** -0.5, not head_dim ** -0.5 (Gemma)
    attn_logit_softcap: float | None = None  # attention scores soft-capped at this (Gemma 2)
    final_logit_softcap: float | None = None  # logits soft-capped at this (Gemma 2)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # an RMSNorm after attention and after the MLP too (Gemma 2 / 3)
    # Mixture of experts (models/moe.py): 0 experts = a dense gated MLP in every layer.
    num_experts: int = 0  # E, routed experts per MoE layer
    num_experts_per_tok: int = 0  # k, experts each token goes to
    moe_intermediate_size: int = 0  # each expert's hidden width
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum to 1 (Mixtral always)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on, sigmoid-gated expert; 0: none
    max_position_embeddings: int = 4096  # longest context the model was trained for
    bos_token_id: int | None = None  # token prepended to prompts, if any
    eos_token_ids: tuple[int, ...] = ()  # tokens that end generation
    type_vocab_size: int = 0  # rows of BERT's token-type embedding (0: the model has none)

    def __post_init__(self):
        registry.get(self.architecture)  # raises for an architecture jaxserve does not run
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not (0 < self.partial_rotary_factor <= 1 and self.rotary_dim % 2 == 0):
            raise ValueError(f"partial_rotary_factor must be in (0, 1] and leave an even rotary dim, "
                             f"got {self.partial_rotary_factor} of head_dim {self.head_dim}")
        for name in ("freq_factors", "short_factor", "long_factor"):
            factors = getattr(self.rope_scaling, name, ())
            if factors and len(factors) != self.rotary_dim // 2:
                raise ValueError(f"rope {name} has {len(factors)} entries, expected the rotary dim / 2 = "
                                 f"{self.rotary_dim // 2}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            unknown = set(self.layer_types) - set(LAYER_TYPES)
            if unknown:
                raise ValueError(f"layer_types {sorted(unknown)} are not supported; supported: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported; "
                             f"supported: {', '.join(ACTIVATIONS)}")
        if self.num_experts and not (0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0):
            raise ValueError(f"an MoE model needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) <= "
                             f"num_experts ({self.num_experts}) and moe_intermediate_size > 0 "
                             f"(got {self.moe_intermediate_size})")
        for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 or None, got {value!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids must be a tuple, got {self.eos_token_ids!r}")

    @property
    def num_queries_per_kv(self) -> int:
        """G = N / K."""
        return self.num_heads // self.num_kv_heads

    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """What each layer's attention does differently, layer by layer."""
        if not self.layer_types:
            return (LayerSpec(self.sliding_window, self.rope_theta, self.rope_scaling),) * self.num_layers
        full = LayerSpec(None, self.rope_theta, self.rope_scaling)
        local = (LayerSpec(self.sliding_window, self.rope_theta, self.rope_scaling) if self.local_rope_theta is None
                 else LayerSpec(self.sliding_window, self.local_rope_theta, None))
        return tuple(local if t == "sliding_attention" else full for t in self.layer_types)

    def for_max_model_len(self, max_model_len: int) -> ModelConfig:
        """This config as an engine of that context length runs it: longrope takes its long
        factors when the engine may go past the pre-training length (vLLM's rule)."""
        scaling = self.rope_scaling
        if scaling is None or scaling.rope_type != "longrope":
            return self
        long = max_model_len > scaling.original_max_position_embeddings
        return dataclasses.replace(self, rope_scaling=dataclasses.replace(scaling, long=long))

    @property
    def rotary_dim(self) -> int:
        """How many dims of each head RoPE rotates (Phi-3.5 / Phi-4 rotate part of them)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def sm_scale(self) -> float:
        """The attention scores' scale."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF ``config.json`` (transformers 4 or 5 layout)."""
        arch = registry.find(hf)
        architecture = arch.name
        if arch.family == "bert":
            return _from_bert_config(architecture, hf)
        implied = dict(arch.implies)
        if hf.get("mlp_bias"):
            raise ValueError(f"{architecture} with mlp_bias=True is not supported")
        # Where the architecture implies a q/k/v bias (Qwen2) it has no o_proj bias. Elsewhere
        # attention_bias also adds an o_proj bias, which no released checkpoint uses and the layers
        # do not implement.
        if hf.get("attention_bias") and not implied.get("attention_bias"):
            raise ValueError(f"{architecture} with attention_bias=True is not supported")

        num_heads = hf["num_attention_heads"]
        rope_theta, rope_scaling, local_rope_theta = _parse_rope(hf)
        sliding_window, layer_types = _parse_layer_types(hf, arch.sliding_pattern)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if activation not in _HF_ACTIVATIONS:
            raise ValueError(f"{architecture} with activation {activation!r} is not supported; "
                             f"supported: {', '.join(_HF_ACTIVATIONS)}")
        fields = dict(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            local_rope_theta=local_rope_theta,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            layer_types=layer_types,
            hidden_activation=_HF_ACTIVATIONS[activation],
            partial_rotary_factor=float((hf.get("rope_parameters") or {}).get("partial_rotary_factor")
                                        or hf.get("partial_rotary_factor") or 1.0),
            query_pre_attn_scalar=_positive_or_none(hf.get("query_pre_attn_scalar")),
            attn_logit_softcap=_positive_or_none(hf.get("attn_logit_softcapping")),
            final_logit_softcap=_positive_or_none(hf.get("final_logit_softcapping")),
            max_position_embeddings=hf.get("max_position_embeddings") or 4096,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(i) for i in eos_ids),
            **_parse_experts(hf, architecture),
        )
        fields.update(implied)
        return cls(**fields)


def _parse_experts(hf: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The MoE fields: Mixtral names its experts num_local_experts, each as wide as
    intermediate_size; Qwen-MoE num_experts (transformers 5 saves Qwen3-MoE's as
    num_local_experts), each moe_intermediate_size wide, plus Qwen2-MoE's shared expert."""
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if not num_experts:
        return {}
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"{architecture} with dense MLP layers among the MoE ones (mlp_only_layers="
                         f"{hf.get('mlp_only_layers')}, decoder_sparse_step={hf.get('decoder_sparse_step')}) "
                         f"is not supported")
    return dict(num_experts=int(num_experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                moe_intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0))


def _positive_or_none(value) -> float | None:
    return float(value) if value else None


def _from_bert_config(architecture: str, hf: dict[str, Any]) -> ModelConfig:
    """A BERT config.json: post-norm layers with exact GELU and learned absolute positions."""
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{architecture} with hidden_act={act!r} is not supported (only 'gelu')")
    position = hf.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"{architecture} with position_embedding_type={position!r} is not supported "
                         f"(only 'absolute')")
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hf["hidden_size"] // num_heads,
        rms_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=hf.get("max_position_embeddings") or 512,
        type_vocab_size=hf.get("type_vocab_size", 2),
    )


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None, float | None]:
    """(rope_theta, rope_scaling, local_rope_theta) of a config.json. transformers 5 nests RoPE
    under rope_parameters (per layer type where they differ, as Gemma 3's: "full_attention" and
    "sliding_attention") and leaves rope_theta None at the top; transformers 4 has rope_theta at
    the top, an optional rope_scaling dict ("type" or "rope_type") for the global layers, and
    Gemma 3's rope_local_base_freq."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    local_theta = hf.get("rope_local_base_freq")
    if "full_attention" in params or "sliding_attention" in params:
        local = params.get("sliding_attention") or {}
        if (local.get("rope_type") or "default") != "default":
            raise ValueError(f"RoPE scaling on sliding layers ({local.get('rope_type')!r}) is not supported")
        local_theta = local.get("rope_theta", local_theta)
        params = dict(params.get("full_attention") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    local_theta = None if local_theta is None else float(local_theta)
    return theta, _parse_rope_scaling(params, hf), local_theta


def _parse_rope_scaling(params: dict[str, Any], hf: dict[str, Any]) -> RopeScaling | None:
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type in ("longrope", "su"):  # "su": Phi-3's first name for it
        # Phi-3 keeps the pre-training length beside rope_scaling; it wins, as in transformers.
        original = int(hf.get("original_max_position_embeddings") or params["original_max_position_embeddings"])
        factor = params.get("factor") or hf["max_position_embeddings"] / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # the LongRoPE paper's default
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeScaling("longrope", original_max_position_embeddings=original,
                           short_factor=tuple(map(float, params["short_factor"])),
                           long_factor=tuple(map(float, params["long_factor"])),
                           attention_factor=float(attention_factor))
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3, longrope")


def _parse_layer_types(hf: dict[str, Any], sliding_pattern: int | None) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types): which layers slide, and over how many positions. Mistral
    slides on every layer; Qwen only with use_sliding_window (then layers from max_window_layers
    on, unless layer_types says); Gemma has one full layer in every sliding_window_pattern (the
    architecture's sliding_pattern: 2 for Gemma 2, 6 for Gemma 3), unless layer_types says.
    Uniform layers give ()."""
    window = hf.get("sliding_window")
    num_layers = hf["num_hidden_layers"]
    layer_types = list(hf.get("layer_types") or ())
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None, ()
    if window is None:
        return None, ()
    if not layer_types and "max_window_layers" in hf:
        first = hf["max_window_layers"]
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    every = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or sliding_pattern
    if not layer_types and every:
        layer_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(num_layers)]
    if len(set(layer_types)) == 1:
        return (window if layer_types[0] == "sliding_attention" else None), ()
    return window, tuple(layer_types)
