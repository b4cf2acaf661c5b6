"""Frozen engine configuration, one small dataclass per concern (cache, scheduler, compilation).

Each is validated when built; derived runtime values (page count, buckets) are computed by the
components that own them, not stored here. The defaults live in one place, jaxserve/engine_args.py,
which builds these; so the fields here have none.
"""
from __future__ import annotations

import dataclasses
import os

from jaxserve.engine_args import KV_CACHE_DTYPES, default_cache_root


def _check(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int                     # tokens per KV page
    kv_cache_memory: int | None         # bytes for K+V of all layers (scales included); None = platform default
    kv_cache_dtype: str                 # what the pages store: "auto" (the model's dtype) or a KV_CACHE_DTYPES name
    gpu_memory_utilization: float       # share of accelerator memory for weights + KV (ignored on CPU)
    enable_prefix_caching: bool         # share full pages of identical prefixes between requests

    def __post_init__(self):
        _check(isinstance(self.block_size, int) and self.block_size >= 1 and
               self.block_size & (self.block_size - 1) == 0,
               "block_size", self.block_size, "a power of two >= 1")
        _check(self.kv_cache_memory is None or (isinstance(self.kv_cache_memory, int) and self.kv_cache_memory > 0),
               "kv_cache_memory", self.kv_cache_memory, "a positive number of bytes or None")
        _check(self.kv_cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", self.kv_cache_dtype,
               f"one of {', '.join(KV_CACHE_DTYPES)}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               "gpu_memory_utilization", self.gpu_memory_utilization, "in (0, 1]")


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_model_len: int                  # longest prompt + output a request may reach
    max_num_seqs: int                   # sequences in one step (decode batch size)
    max_num_batched_tokens: int         # tokens in one step: the chunked-prefill budget

    def __post_init__(self):
        _check(isinstance(self.max_model_len, int) and self.max_model_len >= 1,
               "max_model_len", self.max_model_len, "an integer >= 1")
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
               "max_num_seqs", self.max_num_seqs, "an integer >= 1")
        _check(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= self.max_num_seqs,
               "max_num_batched_tokens", self.max_num_batched_tokens,
               f"an integer >= max_num_seqs ({self.max_num_seqs})")


@dataclasses.dataclass(frozen=True, slots=True)
class CompileConfig:
    compilation_cache_dir: str | None   # JAX persistent compilation cache; None = <cache root>/xla
    warmup: bool                        # compile every bucket pair at start-up

    def resolved_cache_dir(self) -> str:
        return self.compilation_cache_dir or os.path.join(default_cache_root(), "xla")


@dataclasses.dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    draft_model: str | None             # the draft model (a path or name as --model takes); None: n-gram prompt lookup
    num_speculative_tokens: int         # k, the drafts proposed (and verified) per step and request
    ngram_max: int                      # longest n-gram looked up (n-gram lookup; 0 for a draft model)
    ngram_min: int                      # shortest n-gram looked up

    def __post_init__(self):
        _check(isinstance(self.num_speculative_tokens, int) and self.num_speculative_tokens >= 1,
               "num_speculative_tokens", self.num_speculative_tokens, "an integer >= 1")
        if self.draft_model is None:
            _check(self.ngram_max >= 1, "ngram_prompt_lookup_max", self.ngram_max, "an integer >= 1")
            _check(1 <= self.ngram_min <= self.ngram_max, "ngram_prompt_lookup_min", self.ngram_min,
                   f"an integer in [1, ngram_prompt_lookup_max = {self.ngram_max}]")
