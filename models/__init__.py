"""Flax model families and weight loading: ``load_model`` turns an HF folder or a GGUF file into a
ModelConfig, a stateless family model (``forward`` / ``compute_logits``), params and a tokenizer.
Which architectures exist, and what implements each, is models/registry.py.
"""
from jaxserve.models import registry
from jaxserve.models.config import ModelConfig, RopeScaling
from jaxserve.models.decoder import DecoderLM
from jaxserve.models.loader import (DecoderModel, LoadedModel, bundled_model_path, load_model, load_model_config,
                                    model_class, resolve_dtype)
from jaxserve.models.metadata import AttentionMetadata, KVCache

__all__ = [
    "AttentionMetadata", "DecoderLM", "DecoderModel", "KVCache", "LoadedModel", "ModelConfig", "RopeScaling",
    "bundled_model_path", "load_model", "load_model_config", "model_class", "registry", "resolve_dtype",
]
