"""jaxserve: LLM inference and serving on JAX/XLA.

The offline API mirrors vLLM's: ``from jaxserve import LLM, SamplingParams``.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy imports keep `import jaxserve.models` (and the CLI's --help) free of engine start-up.
    if name in ("LLM",):
        from jaxserve.llm import LLM
        return LLM
    if name in ("SamplingParams", "RequestOutputKind", "StructuredOutputsParams"):
        from jaxserve import sampling_params
        return getattr(sampling_params, name)
    if name == "LoRARequest":
        from jaxserve.lora import LoRARequest
        return LoRARequest
    if name in ("RequestOutput", "CompletionOutput"):
        from jaxserve import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
