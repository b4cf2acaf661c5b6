"""The model configuration: one frozen, hashable dataclass shared by every model family.

Built from an HF ``config.json`` dict (both the transformers 4 ``rope_theta``/``rope_scaling`` form
and the transformers 5 ``rope_parameters`` form) or, by the GGUF loader, from GGUF metadata.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.models import registry

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


@dataclasses.dataclass(frozen=True, slots=True)
class RopeScaling:
    """How RoPE inverse frequencies are rescaled; hashable so the config can be a static jit arg."""

    rope_type: str  # "linear", "llama3" or "freq_factors" (llama.cpp's per-frequency divisors)
    factor: float = 1.0  # linear / llama3: context extension factor
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / this are divided by factor
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / this are kept as is
    original_max_position_embeddings: int = 8192  # llama3: pre-training context length
    freq_factors: tuple[float, ...] = ()  # freq_factors: inv_freq[i] is divided by freq_factors[i]

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3", "freq_factors"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.rope_type in ("linear", "llama3") and not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > "
                             f"low_freq_factor ({self.low_freq_factor})")
        if self.rope_type == "freq_factors" and not self.freq_factors:
            raise ValueError("rope_type 'freq_factors' needs a non-empty freq_factors tuple")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and numerics of a transformer: a decoder (Llama / Mistral / Qwen2 / Qwen3) or a BERT
    encoder (which has no RoPE, biases everywhere and LayerNorms: see models/bert.py)."""

    architecture: str  # HF class name, an entry of models/registry.py; selects the family
    vocab_size: int  # V, rows of the embedding table
    hidden_size: int  # D, model width
    intermediate_size: int  # F, SwiGLU hidden width
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
    sliding_window: int | None = None  # attend to the last this-many positions only (Mistral)
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
        if (self.rope_scaling is not None and self.rope_scaling.rope_type == "freq_factors"
                and len(self.rope_scaling.freq_factors) != self.head_dim // 2):
            raise ValueError(f"rope freq_factors has {len(self.rope_scaling.freq_factors)} entries, "
                             f"expected head_dim // 2 = {self.head_dim // 2}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids must be a tuple, got {self.eos_token_ids!r}")

    @property
    def num_queries_per_kv(self) -> int:
        """G = N / K."""
        return self.num_heads // self.num_kv_heads

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
        rope_theta, rope_scaling = _parse_rope(hf)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
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
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=implied.get("attention_bias", False),
            qk_norm=implied.get("qk_norm", False),
            sliding_window=_parse_sliding_window(architecture, hf),
            max_position_embeddings=hf.get("max_position_embeddings") or 4096,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(int(i) for i in eos_ids),
        )


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


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 nests everything under rope_parameters (and leaves rope_theta None at the top);
    # transformers 4 has rope_theta at the top and an optional rope_scaling dict ("type" or "rope_type").
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling("linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return float(theta), RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")


def _parse_sliding_window(architecture: str, hf: dict[str, Any]) -> int | None:
    window = hf.get("sliding_window")
    if architecture == "MistralForCausalLM":
        return window
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        # Qwen only slides when use_sliding_window is set, and then per layer (layer_types, by default
        # layers >= max_window_layers); the layer scan runs one attention graph for every layer, so
        # only all-or-nothing sliding is supported.
        if not hf.get("use_sliding_window") or window is None:
            return None
        num_layers = hf["num_hidden_layers"]
        first_sliding = hf.get("max_window_layers", 28)
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
        if len(set(layer_types)) > 1:
            raise ValueError(f"{architecture} with a sliding window on some layers only "
                             f"(layer_types={sorted(set(layer_types))}) is not supported")
        return window if layer_types[0] == "sliding_attention" else None
    return None
