"""How arrays are stored and computed per backend: bfloat16 on CPU is stored packed.

XLA:CPU runs a bf16 dot natively (bf16 inputs, float32 result: about 1.7x the float32 rate on
CPUs with AVX512-BF16), but it upcasts nearly every other bf16 op to float32 by converting the
op's whole operand: slicing one layer out of the stacked weights converts all of them, and a KV
write converts the whole cache, every step (measured: a 30-layer step went from 70 ms to 3 s).
So on CPU bf16 weights and KV pages are *stored* as their uint16 bit patterns (integer slices,
gathers and scatters run as they are), turned back into bf16 only where they are used
(`unpack`, just before a dot), and activations flow in float32 between the matmuls. uint16 is
never a real weight or cache dtype, so a uint16 array always means packed bf16.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PACKED = jnp.dtype(jnp.uint16)


def packs_bfloat16() -> bool:
    """Whether bf16 weights and KV pages are stored packed here (on CPU)."""
    return jax.default_backend() == "cpu"


def pack(x: jax.Array) -> jax.Array:
    """The storage form of an array: bf16 as uint16 bits where packs_bfloat16(), else x itself."""
    if x.dtype == jnp.bfloat16 and packs_bfloat16():
        return jax.lax.bitcast_convert_type(x, PACKED)
    return x


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype an array of `dtype` is stored in here."""
    dtype = jnp.dtype(dtype)
    return PACKED if dtype == jnp.bfloat16 and packs_bfloat16() else dtype


def unpack(x: jax.Array) -> jax.Array:
    """The inverse of pack: packed bits back to bf16; any other array as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == PACKED else x


def activation_dtype(weight_dtype) -> jnp.dtype:
    """The dtype activations flow in between the matmuls, for (unpacked) weights of `weight_dtype`:
    float32 on CPU (see above), elsewhere the weights' own dtype."""
    if jax.default_backend() == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(weight_dtype)
