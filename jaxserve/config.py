"""Frozen engine configuration, one small dataclass per concern (cache, scheduler, compilation).

Each is validated when built; derived runtime values (page count, buckets) are computed by the
components that own them, not stored here.
"""
from __future__ import annotations

import dataclasses
import os


def _check(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16                    # tokens per KV page
    kv_cache_memory: int | None = None      # bytes for K+V of all layers; None = platform default
    gpu_memory_utilization: float = 0.9     # share of accelerator memory for weights + KV (ignored on CPU)
    enable_prefix_caching: bool = True      # share full pages of identical prefixes between requests

    def __post_init__(self):
        _check(isinstance(self.block_size, int) and self.block_size >= 1 and
               self.block_size & (self.block_size - 1) == 0,
               "block_size", self.block_size, "a power of two >= 1")
        _check(self.kv_cache_memory is None or (isinstance(self.kv_cache_memory, int) and self.kv_cache_memory > 0),
               "kv_cache_memory", self.kv_cache_memory, "a positive number of bytes or None")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               "gpu_memory_utilization", self.gpu_memory_utilization, "in (0, 1]")


@dataclasses.dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_model_len: int                  # longest prompt + output a request may reach
    max_num_seqs: int = 64              # sequences in one step (decode batch size)
    max_num_batched_tokens: int = 512   # tokens in one step: the chunked-prefill budget

    def __post_init__(self):
        _check(isinstance(self.max_model_len, int) and self.max_model_len >= 1,
               "max_model_len", self.max_model_len, "an integer >= 1")
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1,
               "max_num_seqs", self.max_num_seqs, "an integer >= 1")
        _check(isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens >= self.max_num_seqs,
               "max_num_batched_tokens", self.max_num_batched_tokens,
               f"an integer >= max_num_seqs ({self.max_num_seqs})")


def default_cache_root() -> str:
    return os.environ.get("JAXSERVE_CACHE_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "jaxserve")


@dataclasses.dataclass(frozen=True, slots=True)
class CompileConfig:
    compilation_cache_dir: str | None = None  # JAX persistent compilation cache; None = <cache root>/xla
    warmup: bool = True                       # compile every bucket pair at start-up

    def resolved_cache_dir(self) -> str:
        return self.compilation_cache_dir or os.path.join(default_cache_root(), "xla")
