"""`PoolingParams`: what one embedding request asks of a pooling model beyond its text, as vLLM's
(`dimensions`, `truncate_prompt_tokens`), plus the side truncation cuts from. Pure Python: the
engine checks what depends on the model (its input limit, whether it may be truncated).
"""
from __future__ import annotations

import dataclasses

TRUNCATION_SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True, slots=True)
class PoolingParams:
    # Matryoshka truncation: keep the first `dimensions` values (renormalised when the model
    # normalises). None: the model's full size. Only Matryoshka models take it (models/pooling.py).
    dimensions: int | None = None
    # vLLM's truncate_prompt_tokens: a longer input keeps only this many tokens; -1: the model's
    # input limit; None: a longer input is refused. Special tokens ([CLS], [SEP], BOS) are kept.
    truncate_prompt_tokens: int | None = None
    # Which end truncation cuts: "left" keeps the last tokens (vLLM), "right" the first (Ollama,
    # sentence-transformers).
    truncation_side: str = "left"

    def __post_init__(self):
        for name in ("dimensions", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{name} must be an integer or None, got {value!r}")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be >= 1, got {self.dimensions}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens != -1 \
                and self.truncate_prompt_tokens < 1:
            raise ValueError(f"truncate_prompt_tokens must be -1 (the model's limit) or >= 1, "
                             f"got {self.truncate_prompt_tokens}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side must be one of {', '.join(TRUNCATION_SIDES)}, "
                             f"got {self.truncation_side!r}")
