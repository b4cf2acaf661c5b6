"""Flax model families and weight loading: ``load_model`` turns an HF folder or a GGUF file into a
ModelConfig, a stateless family model (``forward`` / ``compute_logits``), params and a tokenizer.
"""
from jaxserve.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from jaxserve.models.llama import LlamaModel
from jaxserve.models.loader import (MODEL_CLASSES, DecoderModel, LoadedModel, bundled_model_path,
                                    load_model, load_model_config, model_class, resolve_dtype)
from jaxserve.models.metadata import AttentionMetadata, KVCache
from jaxserve.models.mistral import MistralModel
from jaxserve.models.qwen2 import Qwen2Model
from jaxserve.models.qwen3 import Qwen3Model

__all__ = [
    "AttentionMetadata", "DecoderModel", "KVCache", "LlamaModel", "LoadedModel", "MODEL_CLASSES",
    "MistralModel", "ModelConfig", "Qwen2Model", "Qwen3Model", "RopeScaling", "SUPPORTED_ARCHITECTURES",
    "bundled_model_path", "load_model", "load_model_config", "model_class", "resolve_dtype",
]
