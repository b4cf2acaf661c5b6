"""Every architecture jaxserve runs, in one table: its HF class and `model_type` names, its GGUF
`general.architecture` names, the family name Ollama shows for it, the class that implements it,
what it can do (generate, embed), and what the architecture implies about the config.

The rest of the code asks this table instead of keeping a list of its own: config.json parsing
(`find`), the GGUF loader (`from_gguf`), `model_class`, and the model card the server shows.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

GENERATE, EMBED = "generate", "embed"


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str                             # HF class name (config.json "architectures"[0]); ModelConfig.architecture
    family: str                           # Ollama's family name (details.family, model_info key prefix)
    model_class: str                      # "module:Class" under jaxserve.models that implements it
    model_types: tuple[str, ...] = ()     # config.json "model_type" values naming it when "architectures" is absent
    gguf_names: tuple[str, ...] = ()      # GGUF general.architecture values loaded as it
    capabilities: tuple[str, ...] = (GENERATE,)
    # ModelConfig fields every checkpoint of this architecture has (Qwen2's q/k/v bias, Gemma's norms).
    implies: tuple[tuple[str, Any], ...] = ()
    gguf_tokenizer: str = "TokenizersBackend"  # the transformers class AutoTokenizer picks for its GGUFs
    # Every this-many-th layer attends globally, the others through the sliding window, where a
    # config does not list layer_types (Gemma 2: 2, Gemma 3: 6); None: every layer alike.
    sliding_pattern: int | None = None

    def load_class(self) -> type:
        module, _, cls = self.model_class.partition(":")
        return getattr(importlib.import_module(f"jaxserve.models.{module}"), cls)


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("LlamaForCausalLM", "llama", "decoder:DecoderLM", ("llama",), ("llama",)),
    # Ollama shows Mistral models as family "llama" (llama.cpp converts them to that architecture).
    Architecture("MistralForCausalLM", "llama", "decoder:DecoderLM", ("mistral",), ("mistral",)),
    # Qwen2 always has a q/k/v bias (and no o_proj bias).
    Architecture("Qwen2ForCausalLM", "qwen2", "decoder:DecoderLM", ("qwen2",), ("qwen2",),
                 implies=(("attention_bias", True),), gguf_tokenizer="Qwen2Tokenizer"),
    Architecture("Qwen3ForCausalLM", "qwen3", "decoder:DecoderLM", ("qwen3",), ("qwen3",),
                 implies=(("qk_norm", True),), gguf_tokenizer="Qwen2Tokenizer"),
    # Mixtral renormalises its top-k routing weights always; llama.cpp converts it to "llama" with
    # experts (models/loader_gguf.py tells them apart).
    Architecture("MixtralForCausalLM", "llama", "mixtral:MixtralLM", ("mixtral",),
                 implies=(("norm_topk_prob", True),)),
    Architecture("Qwen2MoeForCausalLM", "qwen2moe", "qwen_moe:QwenMoeLM", ("qwen2_moe",), ("qwen2moe",),
                 implies=(("attention_bias", True),), gguf_tokenizer="Qwen2Tokenizer"),
    Architecture("Qwen3MoeForCausalLM", "qwen3moe", "qwen_moe:QwenMoeLM", ("qwen3_moe",), ("qwen3moe",),
                 implies=(("qk_norm", True),), gguf_tokenizer="Qwen2Tokenizer"),
    Architecture("Phi3ForCausalLM", "phi3", "phi3:Phi3LM", ("phi3",), ("phi3",), gguf_tokenizer="LlamaTokenizer"),
    Architecture("Gemma2ForCausalLM", "gemma2", "gemma:GemmaLM", ("gemma2",), ("gemma2",),
                 implies=(("scale_embeddings", True), ("sandwich_norms", True)),
                 gguf_tokenizer="GemmaTokenizer", sliding_pattern=2),
    Architecture("Gemma3ForCausalLM", "gemma3", "gemma:GemmaLM", ("gemma3_text",), ("gemma3",),
                 implies=(("scale_embeddings", True), ("sandwich_norms", True), ("qk_norm", True)),
                 gguf_tokenizer="GemmaTokenizer", sliding_pattern=6),
    # Encoders embed only (sentence-transformers checkpoints such as all-MiniLM-L6-v2).
    Architecture("BertModel", "bert", "bert:BertEncoder", ("bert",), capabilities=(EMBED,)),
)
_BY_NAME = {a.name: a for a in ARCHITECTURES}
_BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}
_BY_GGUF = {g: a for a in ARCHITECTURES for g in a.gguf_names}


def supported() -> str:
    return ", ".join(_BY_NAME)


def get(name: str) -> Architecture:
    """The architecture of an HF class name, or a ValueError listing what is supported."""
    arch = _BY_NAME.get(name)
    if arch is None:
        raise ValueError(f"architecture {name!r} is not supported; supported: {supported()}")
    return arch


def find(hf_config: dict) -> Architecture:
    """The architecture a config.json names: its "architectures", else its "model_type"."""
    names = hf_config.get("architectures") or []
    if names:
        return get(names[0])
    model_type = hf_config.get("model_type")
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(f"config.json has no 'architectures' and its model_type {model_type!r} is not "
                         f"supported; supported: {', '.join(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


def from_gguf(gguf_name: str) -> Architecture:
    arch = _BY_GGUF.get(gguf_name)
    if arch is None:
        raise ValueError(f"GGUF architecture {gguf_name!r} is not supported; supported: {', '.join(_BY_GGUF)}")
    return arch


def can(name: str, capability: str) -> bool:
    """Whether an architecture can `capability` (GENERATE, EMBED) as it is."""
    return capability in get(name).capabilities


def model_class(name: str) -> type:
    """The class implementing an architecture (imported on first use)."""
    return get(name).load_class()
