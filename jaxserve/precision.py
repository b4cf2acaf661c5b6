"""How arrays are stored and computed per backend: bfloat16 on CPU is stored packed.

XLA:CPU runs a bf16 dot natively (bf16 inputs, float32 result: about 1.7x the float32 rate on
CPUs with AVX512-BF16), but it upcasts nearly every other bf16 op to float32 by converting the
op's whole operand: slicing one layer out of the stacked weights converts all of them, and a KV
write converts the whole cache, every step (measured: a 30-layer step went from 70 ms to 3 s).
So on CPU bf16 weights and KV pages are *stored* as their uint16 bit patterns (integer slices,
gathers and scatters run as they are), turned back into bf16 only where they are used
(`unpack`, just before a dot), and activations flow in float32 between the matmuls. uint16 is
never a real weight or cache dtype, so a uint16 array always means packed bf16.

Every choice here follows the *target* platform: JAX's default backend, or the one `targeting`
names while graphs are built for another machine (`jaxserve lower --platform cuda` on a CPU).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

PACKED = jnp.dtype(jnp.uint16)
# x86 CPU flags (Linux /proc/cpuinfo names) of native bf16 products, the ones XLA:CPU's bf16 dots
# use. Both host kinds measured here have avx512_bf16; there packed bf16 runs a step 1.3-1.4x
# faster than float32. Other CPUs (no flag, or not x86/Linux) keep float32, which is faster there.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


_target_platform: str | None = None


def target_platform() -> str:
    """The platform arrays are stored and graphs are built for."""
    return _target_platform or jax.default_backend()


@contextlib.contextmanager
def targeting(platform: str) -> Iterator[None]:
    """Build for `platform` instead of the default backend (storage dtypes, activation dtype,
    dtype "auto", the attention backend), e.g. to export a CUDA graph on a CPU. Process-wide:
    meant for one thread building graphs, not for a serving engine."""
    global _target_platform
    previous, _target_platform = _target_platform, platform
    try:
        yield
    finally:
        _target_platform = previous


def read_cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def auto_dtype(backend: str | None = None,
               cpu_flags: Callable[[], frozenset[str]] = read_cpu_flags) -> tuple[str, str]:
    """What dtype="auto" means here, and why: bfloat16 on accelerators, bfloat16 (stored packed)
    on a CPU with native bf16 products, float32 on other CPUs."""
    backend = backend or target_platform()
    if backend != "cpu":
        return "bfloat16", f"auto: bfloat16 on {backend}"
    native = sorted(set(NATIVE_BF16_FLAGS) & cpu_flags())
    if native:
        return "bfloat16", f"auto: this CPU multiplies bf16 natively ({', '.join(native)}); stored packed"
    return "float32", f"auto: this CPU has no native bf16 products ({' / '.join(NATIVE_BF16_FLAGS)})"


def packs_bfloat16() -> bool:
    """Whether bf16 weights and KV pages are stored packed here (on CPU)."""
    return target_platform() == "cpu"


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
    if target_platform() == "cpu":
        return jnp.dtype(jnp.float32)
    return jnp.dtype(weight_dtype)
