"""GGUF files (llama.cpp): model config from the metadata, dequantised tensors under their HF names
(llama q/k rows un-permuted back to HF's RoPE layout), and the tokenizer with its chat template
(built without torch, cached on disk).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from importlib import metadata
from typing import Any

import numpy as np

from jaxserve.models import registry
from jaxserve.models.config import ModelConfig, RopeScaling

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma's sandwich norms: llama.cpp's ffn_norm is the norm before the MLP, not after attention.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# Phi-3 keeps q/k/v and gate/up fused; llama.cpp's ffn_up is the fused gate_up.
_PHI3_BLOCK_NAMES = {**_BLOCK_NAMES, "attn_qkv.weight": "self_attn.qkv_proj.weight",
                     "ffn_up.weight": "mlp.gate_up_proj.weight"}
# Experts: the router, merged [E, ...] expert tensors (ffn_*_exps: one per projection, sliced per
# expert on read) and Qwen2-MoE's shared expert. Mixtral's HF names (block_sparse_moe, w1 / w3 / w2)
# replace Qwen's (mlp, gate / up / down_proj) where the GGUF is "llama" with experts.
_QWEN_MOE_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
    "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_MIXTRAL_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_gate_inp.weight": "block_sparse_moe.gate.weight",
    "ffn_gate_exps.weight": "block_sparse_moe.experts.{e}.w1.weight",
    "ffn_up_exps.weight": "block_sparse_moe.experts.{e}.w3.weight",
    "ffn_down_exps.weight": "block_sparse_moe.experts.{e}.w2.weight",
}
_BLOCK_NAMES_BY_ARCH = {"gemma2": _GEMMA_BLOCK_NAMES, "gemma3": _GEMMA_BLOCK_NAMES, "phi3": _PHI3_BLOCK_NAMES,
                        "qwen2moe": _QWEN_MOE_BLOCK_NAMES, "qwen3moe": _QWEN_MOE_BLOCK_NAMES,
                        "mixtral": _MIXTRAL_BLOCK_NAMES}
# llama.cpp stores Gemma's RMSNorm scales with the one its norm adds already added; HF does not.
_NORMS_PLUS_ONE = ("gemma2", "gemma3")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
# config.json fields a GGUF of the architecture does not store: what transformers' config classes
# default to (its GGUF loader leaves them so), or llama.cpp's fixed values (Gemma 3's local RoPE base).
_GGUF_CONFIG_DEFAULTS = {
    "gemma2": {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "gemma3": {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "rope_local_base_freq": 10000.0},
    # llama.cpp renormalises Qwen3-MoE's top-k weights (transformers' GGUF loader says so too),
    # not Qwen2-MoE's.
    "qwen3moe": {"norm_topk_prob": True},
}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp tensor name -> HF name, None for tensors without one (e.g. rope_freqs.weight).
    A merged expert tensor's name has "{e}" for the expert. arch "mixtral": "llama" with experts."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    block_names = _BLOCK_NAMES_BY_ARCH.get(arch, _BLOCK_NAMES)
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in block_names:
        return f"model.layers.{match.group(1)}.{block_names[match.group(2)]}"
    return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of llama q/k rows [heads*H, D].

    llama.cpp rotates interleaved pairs (2i, 2i+1); HF rotates halves (i, i + H/2), so the converter
    reorders each head's rows from [2, H/2] to [H/2, 2]; swapping back restores HF order.
    """
    half = weight.shape[0] // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # [heads, H/2, 2, D]
    return w.swapaxes(1, 2).reshape(weight.shape)  # [heads * H, D]


class GGUFTensors:
    """Dequantised float32 tensors of a GGUF file, by HF name and in HF layout. A merged expert
    tensor [E, ...] answers for each expert's HF tensor."""

    def __init__(self, reader: Any, config: ModelConfig, arch: str):
        self._tensors: dict[str, tuple[Any, int | None]] = {}  # HF name -> (tensor, expert or None)
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name, "mixtral" if arch == "llama" and config.num_experts else arch)
            if name is None:
                continue
            if "{e}" in name:
                for e in range(int(tensor.shape[-1])):  # GGUF lists the expert axis last
                    self._tensors[name.format(e=e)] = (tensor, e)
            else:
                self._tensors[name] = (tensor, None)
        self._merged: tuple[str, np.ndarray] | None = None  # the last merged tensor read, dequantised
        self._config = config
        # transformers un-permutes q/k for general.architecture "llama" only (qwen2/qwen3 use NeoX
        # RoPE, which llama.cpp stores unpermuted); follow it exactly.
        self._unpermute_qk = arch == "llama"
        self._norms_minus_one = arch in _NORMS_PLUS_ONE

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> np.ndarray:
        tensor, expert = self._tensors[name]
        if expert is None:
            weight = _dequantize(tensor)
        else:  # the loader asks for the experts in turn: dequantise the merged tensor once
            if self._merged is None or self._merged[0] != tensor.name:
                self._merged = (tensor.name, _dequantize(tensor))
            weight = self._merged[1][expert]
        if name.endswith("shared_expert_gate.weight"):  # GGUF keeps it as a vector, HF as [1, D]
            weight = weight.reshape(1, -1)
        if self._unpermute_qk and name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, self._config.num_heads)
        elif self._unpermute_qk and name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, self._config.num_kv_heads)
        elif self._norms_minus_one and name.endswith("norm.weight"):
            weight = weight - np.float32(1)
        return weight


def _dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (HF) axis order: GGUF lists the fastest axis first."""
    from gguf import quants
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)


def open_reader(path: str) -> Any:
    """gguf's GGUFReader of `path`, reading the mapped file through a plain ndarray view: its
    field parser slices the file about a million times for a 49k-token vocabulary, and np.memmap's
    Python-level __getitem__ / __array_finalize__ on every slice took 1.8 of its 2.7 s (SmolLM2)."""
    return _plain_array_reader_class()(path)


@functools.lru_cache(maxsize=1)
def _plain_array_reader_class() -> type:
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._data

        @data.setter
        def data(self, mapped: np.memmap) -> None:
            self._data = mapped.view(np.ndarray)  # still backed by the mapping, which it keeps alive

    return PlainArrayReader


def open_gguf(path: str) -> tuple[ModelConfig, GGUFTensors, Any]:
    """Read a GGUF file's config and tensor index: (config, tensors, the open reader, which
    load_gguf_tokenizer takes)."""
    reader = open_reader(path)
    config = config_from_gguf(reader)
    source = GGUFTensors(reader, config, _field(reader, "general.architecture"))
    return config, source, reader


def config_from_gguf(reader: Any) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    num_experts = meta("expert_count", 0)
    # llama.cpp converts Mixtral to "llama" with experts.
    architecture = registry.get("MixtralForCausalLM") if arch == "llama" and num_experts else registry.from_gguf(arch)
    num_heads = meta("attention.head_count")
    num_kv_heads = meta("attention.head_count_kv", num_heads)
    head_dim = meta("attention.key_length")
    if head_dim is None:  # llama.cpp omits key_length when it is D / N; q rows say it either way
        if "blk.0.attn_q.weight" in tensors:
            head_dim = int(tensors["blk.0.attn_q.weight"].shape[1]) // num_heads
        else:  # Phi-3's fused q/k/v rows
            head_dim = int(tensors["blk.0.attn_qkv.weight"].shape[1]) // (num_heads + 2 * num_kv_heads)
    vocab_size = meta("vocab_size") or int(tensors["token_embd.weight"].shape[1])
    # End of generation: eos, plus end-of-turn / end-of-message where the model has them (Llama 3).
    eos_ids = [_field(reader, f"tokenizer.ggml.{key}")
               for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
    hf = {
        "architectures": [architecture.name],
        "vocab_size": vocab_size,
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": meta("rope.freq_base", 10000.0),
        "max_position_embeddings": meta("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "sliding_window": meta("attention.sliding_window"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(i for i in eos_ids if i is not None)),
    }
    if meta("rope.dimension_count") not in (None, head_dim):  # partial rotary (Phi-3.5, Phi-4-mini)
        hf["partial_rotary_factor"] = meta("rope.dimension_count") / head_dim
    if num_experts:
        hf.update(num_local_experts=num_experts, num_experts_per_tok=meta("expert_used_count"),
                  moe_intermediate_size=meta("expert_feed_forward_length") or meta("feed_forward_length"),
                  shared_expert_intermediate_size=meta("expert_shared_feed_forward_length", 0))
    hf.update(_GGUF_CONFIG_DEFAULTS.get(arch, {}))
    # What newer files say themselves, over those defaults: Gemma 2's soft caps, which layers slide
    # (a period, or a flag per layer), the sliding layers' RoPE base.
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if meta(key) is not None:
            hf[key] = meta(key)
    pattern = meta("attention.sliding_window_pattern")
    if isinstance(pattern, int):
        hf["sliding_window_pattern"] = pattern
    elif pattern is not None:
        hf["layer_types"] = ["sliding_attention" if sliding else "full_attention" for sliding in pattern]
    if meta("rope.freq_base_swa") is not None:
        hf["rope_local_base_freq"] = meta("rope.freq_base_swa")
    scaling_type = meta("rope.scaling.type", "none")
    if "rope_factors_long.weight" in tensors:  # Phi-3's longrope keeps its factors as tensors
        hf["rope_scaling"] = {
            "rope_type": "longrope", "original_max_position_embeddings": meta("rope.scaling.original_context_length"),
            "short_factor": _dequantize(tensors["rope_factors_short.weight"]).tolist(),
            "long_factor": _dequantize(tensors["rope_factors_long.weight"]).tolist()}
        if meta("rope.scaling.attn_factor") is not None:
            hf["rope_scaling"]["attention_factor"] = meta("rope.scaling.attn_factor")
    elif scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": meta("rope.scaling.factor")}
    elif scaling_type not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported (supported: none, linear)")
    config = ModelConfig.from_hf_config(hf)
    if "rope_freqs.weight" in tensors:
        # llama.cpp stores llama3 RoPE scaling as per-frequency divisors rather than parameters.
        from gguf import quants
        freqs = tensors["rope_freqs.weight"]
        factors = quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        config = dataclasses.replace(config, rope_scaling=RopeScaling(
            "freq_factors", freq_factors=tuple(float(f) for f in factors)))
    return config


# The tokenizer. transformers builds it from GGUF metadata with its own reader, which imports torch;
# here gguf's reader supplies the same metadata to transformers' converter, which does not. Converting
# a vocabulary takes seconds, so the result is kept on disk under the jaxserve cache root.

# Special token name -> the tokenizer.ggml key holding its id.
_GGUF_SPECIAL_TOKEN_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# Bump when what goes into the cache folder changes.
_TOKENIZER_CACHE_FORMAT = 1


def gguf_tokenizer_metadata(reader: Any) -> tuple[str, dict, dict]:
    """(architecture, tokenizer_dict, tokenizer_config) exactly as transformers' get_gguf_tokenizer
    builds them, read through gguf's reader."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
    architecture = _field(reader, "general.architecture")
    grouped = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {name: _field(reader, f"tokenizer.{key}") for key, name in renames.items()
                          if f"tokenizer.{key}" in reader.fields}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _GGUF_SPECIAL_TOKEN_IDS.items():
        token_id = _field(reader, f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return architecture, tokenizer, tokenizer_config


_IDENTITY_SAMPLE = 1 << 20  # bytes hashed at each end of the file


def gguf_file_identity(path: str) -> str:
    """A hex digest naming this file as it is now, cheap to take on every start: its real path,
    size and modification time (which change when it is rewritten or replaced) and its first and
    last MiB (the metadata header and the last tensors, against a copy that kept both). Hashing the
    whole file would cost about 0.5 s per 100 MB. Keys the tokenizer and weight caches."""
    stat = os.stat(path)
    digest = hashlib.sha256(f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_IDENTITY_SAMPLE))
        f.seek(max(0, stat.st_size - _IDENTITY_SAMPLE))
        digest.update(f.read(_IDENTITY_SAMPLE))
    return digest.hexdigest()


# GGUF tokenizers load in background threads (models/loader.py); two at once raced on transformers
# 5.25's lazily imported attributes (AttributeError: ... 'TokenizersBackend'), so one at a time.
_TOKENIZER_LOAD = threading.Lock()


def load_gguf_tokenizer(path: str, reader: Any = None) -> Any:
    """The tokenizer (with its chat template) that AutoTokenizer.from_pretrained(folder,
    gguf_file=...) gives for this file, built without torch. The converted tokenizer is cached under
    <cache root>/gguf-tokenizers, keyed by the file's identity and the transformers and tokenizers
    versions; reader (an open gguf.GGUFReader of path) is only needed on a cache miss."""
    with _TOKENIZER_LOAD:
        return _load_gguf_tokenizer(path, reader)


def _load_gguf_tokenizer(path: str, reader: Any) -> Any:
    folder = _tokenizer_cache_folder(path)
    if not os.path.isfile(os.path.join(folder, "tokenizer_init.json")):
        if reader is None:
            reader = open_reader(path)
        fresh = _convert_gguf_tokenizer(reader)
        try:
            _write_tokenizer_cache(folder, *fresh)
        except OSError as error:  # a read-only cache root costs a conversion per start, nothing more
            logging.getLogger(__name__).warning("cannot cache the GGUF tokenizer in %s: %s", folder, error)
            return _tokenizer_from_parts(os.path.dirname(path), *fresh)
    return _tokenizer_from_cache(folder, os.path.dirname(path))


def _tokenizer_cache_folder(path: str) -> str:
    from jaxserve.config import default_cache_root
    key = "\0".join([gguf_file_identity(path), metadata.version("transformers"),
                     metadata.version("tokenizers"), str(_TOKENIZER_CACHE_FORMAT)])
    return os.path.join(default_cache_root(), "gguf-tokenizers", hashlib.sha256(key.encode()).hexdigest()[:32])


def _convert_gguf_tokenizer(reader: Any) -> tuple[Any, str, dict]:
    """(tokenizers.Tokenizer, tokenizer class name, its init kwargs) for a GGUF's metadata."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_metadata(reader)
    backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    init_kwargs = {**tokenizer_config, **extra_kwargs}
    # The class AutoTokenizer picks for the architecture (its TOKENIZER_MAPPING_NAMES imports torch).
    return backend, registry.from_gguf(architecture).gguf_tokenizer, init_kwargs


def _write_tokenizer_cache(folder: str, backend: Any, class_name: str, init_kwargs: dict) -> None:
    """Write tokenizer.json and tokenizer_init.json into a fresh folder, then rename it into place,
    so that a reader never sees half a cache entry (two processes converting at once both succeed)."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=os.path.dirname(folder))
    try:
        backend.save(os.path.join(staging, "tokenizer.json"))
        with open(os.path.join(staging, "tokenizer_init.json"), "w", encoding="utf-8") as f:
            json.dump({"class": class_name, "kwargs": init_kwargs}, f)
        try:
            os.rename(staging, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "tokenizer_init.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@functools.lru_cache(maxsize=4)
def _tokenizer_from_cache(folder: str, name_or_path: str) -> Any:
    with open(os.path.join(folder, "tokenizer_init.json"), encoding="utf-8") as f:
        init = json.load(f)
    return _tokenizer_class(init["class"])(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                           name_or_path=name_or_path, **init["kwargs"])


def _tokenizer_from_parts(name_or_path: str, backend: Any, class_name: str, init_kwargs: dict) -> Any:
    return _tokenizer_class(class_name)(tokenizer_object=backend, name_or_path=name_or_path, **init_kwargs)


def _tokenizer_class(name: str) -> type:
    import transformers
    return getattr(transformers, name)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value.decode() if isinstance(value, bytes) else value
