"""Picks the attention implementation a model calls: the tuned jnp path or a Pallas kernel.

All take the same arguments (the contract in reference.py); the choice is made once, outside jit,
for the platform the engine runs on:

- "auto": the Pallas kernel on GPUs, the jnp path elsewhere (on CPU the kernel only interprets);
- "pallas": the kernel for the platform: the Triton kernel on GPUs
  (ragged_paged_attention_gpu.py), the block kernel on TPUs, and the block kernel interpreted
  on CPU (the only way Pallas runs there);
- "jnp": the chunked jnp path tuned for XLA:CPU (ragged_paged_attention_jnp.py), the CPU
  serving path.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax

from jaxserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxserve.pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu
from jaxserve.pallas_kernels.ragged_paged_attention_jnp import ragged_paged_attention_jnp
from jaxserve.precision import target_platform

BACKENDS = ("auto", "pallas", "jnp")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def attention_backend(name: str, platform: str | None = None) -> Callable[..., jax.Array]:
    """The attention function of backend `name` on `platform` (default: the target platform,
    jaxserve/precision.py)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    platform = platform or target_platform()
    if name == "auto":
        name = "pallas" if platform in _GPU_PLATFORMS else "jnp"
    if name == "jnp":
        return ragged_paged_attention_jnp
    if platform in _GPU_PLATFORMS:
        return ragged_paged_attention_gpu
    return functools.partial(ragged_paged_attention, interpret=platform == "cpu")
