"""Flax model families and weight loading: ``load_model`` turns an HF folder or a GGUF file into a
ModelConfig, a stateless family model (``forward`` / ``compute_logits``), params and a tokenizer.
Which architectures exist, and what implements each, is models/registry.py.

The names below load on first use, so `jaxserve.models.registry` and `jaxserve.models.config`
import without JAX (the server reads the registry and imports no JAX of its own).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ModelConfig": "config", "RopeScaling": "config",
    "DecoderLM": "decoder",
    "DecoderModel": "loader", "LoadedModel": "loader", "bundled_model_path": "loader", "load_model": "loader",
    "load_model_config": "loader", "model_class": "loader", "resolve_dtype": "loader",
    "AttentionMetadata": "metadata", "KVCache": "metadata",
}
__all__ = sorted([*_EXPORTS, "registry"])


def __getattr__(name: str):
    if name == "registry":
        return importlib.import_module(f"{__name__}.registry")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
