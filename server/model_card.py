"""`ModelCard`: what the model-listing routes say about the served model (/v1/models, /api/tags,
/api/show, /api/ps), gathered once at start-up from the loaded model's config and files.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re

from jaxserve.models import registry

_QUANT = re.compile(r"(?i)\b(IQ\d\w*|Q\d(?:_[A-Z0-9]+)*|F16|F32|BF16)\b")


def _parameter_size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}".rstrip("0").rstrip(".") + unit
    return str(n)


def _files_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


@dataclasses.dataclass(frozen=True)
class ModelCard:
    names: tuple[str, ...]          # served model names, the first is the main one
    source: str                     # absolute path of the .gguf file or HF folder
    family: str                     # "llama", "qwen2", ...
    format: str                     # "gguf" or "safetensors"
    num_params: int
    quantization: str               # "Q4_1", "F32", ...
    size_bytes: int                 # bytes of the model files
    digest: str                     # sha256 of (path, size, mtime): identifies the files cheaply
    modified_at: str                # RFC 3339 mtime of the model files
    created: int                    # unix mtime of the model files (OpenAI "created")
    max_model_len: int
    chat_template: str | None
    model_info: dict                # Ollama /api/show model_info, GGUF-style keys
    stop: tuple[str, ...]           # the tokens that end generation, as text (Ollama "parameters")
    capabilities: tuple[str, ...] = ("generate",)  # what the served engine does: "generate" or "embed"

    @classmethod
    def build(cls, names, *, source: str, model_config, num_params: int, dtype_name: str, max_model_len: int,
              chat_template: str | None, stop: tuple[str, ...],
              capabilities: tuple[str, ...] = ("generate",)) -> "ModelCard":
        family = registry.get(model_config.architecture).family
        is_gguf = source.endswith(".gguf")
        found = _QUANT.search(os.path.basename(source)) if is_gguf else None
        quant = found.group(1).upper() if found else {"float32": "F32", "bfloat16": "BF16",
                                                      "float16": "F16"}.get(dtype_name, dtype_name.upper())
        stat = os.stat(source)
        size = _files_size(source)
        digest = hashlib.sha256(f"{source}:{size}:{stat.st_mtime_ns}".encode()).hexdigest()
        modified = datetime.datetime.fromtimestamp(stat.st_mtime, datetime.timezone.utc)
        c = model_config
        info = {
            "general.architecture": family,
            "general.parameter_count": num_params,
            f"{family}.context_length": c.max_position_embeddings,
            f"{family}.embedding_length": c.hidden_size,
            f"{family}.feed_forward_length": c.intermediate_size,
            f"{family}.block_count": c.num_layers,
            f"{family}.attention.head_count": c.num_heads,
            f"{family}.attention.head_count_kv": c.num_kv_heads,
            f"{family}.attention.key_length": c.head_dim,
            f"{family}.attention.value_length": c.head_dim,
            f"{family}.vocab_size": c.vocab_size,
        }
        if family == "bert":  # LayerNorms and learned positions (GGUF's bert keys)
            info[f"{family}.attention.layer_norm_epsilon"] = c.rms_norm_eps
        else:
            info[f"{family}.attention.layer_norm_rms_epsilon"] = c.rms_norm_eps
            info[f"{family}.rope.freq_base"] = c.rope_theta
        return cls(names=tuple(names), source=source, family=family, format="gguf" if is_gguf else "safetensors",
                   num_params=num_params, quantization=quant, size_bytes=size, digest=digest,
                   modified_at=modified.isoformat().replace("+00:00", "Z"), created=int(stat.st_mtime),
                   max_model_len=max_model_len, chat_template=chat_template, model_info=info, stop=tuple(stop),
                   capabilities=tuple(capabilities))

    @property
    def parameter_size(self) -> str:
        return _parameter_size(self.num_params)

    def matches(self, name: str) -> bool:
        """Whether a client's "model" names this model (Ollama clients may add the ":latest" tag)."""
        return name in self.names or (name.endswith(":latest") and name[:-len(":latest")] in self.names)
