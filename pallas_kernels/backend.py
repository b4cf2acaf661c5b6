"""Picks the attention implementation a model calls: the jnp reference or the Pallas kernel.

Both take the same arguments (see reference.py); the choice is made once, outside jit.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax

from jaxserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxserve.pallas_kernels.reference import ragged_paged_attention_reference

BACKENDS = ("reference", "pallas")


def attention_backend(name: str) -> Callable[..., jax.Array]:
    """"reference" -> the jnp reference; "pallas" -> the kernel, interpreted on CPU (the only
    way Pallas runs there) and compiled on GPU/TPU."""
    if name == "reference":
        return ragged_paged_attention_reference
    if name == "pallas":
        return functools.partial(ragged_paged_attention, interpret=jax.default_backend() == "cpu")
    raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
