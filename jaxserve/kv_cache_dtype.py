"""What the paged KV cache stores (--kv-cache-dtype): `KVCacheDtype`, and the 8-bit forms' quantizing
(as write_kv stores K and V) and dequantizing (as attention reads them).

"auto" keeps the model's dtype and "bfloat16" a 16-bit cache (packed on CPU, precision.py). "int8"
and "fp8" (float8_e4m3fn; "fp8_e5m2" too) store each token's K and V per KV head as 8-bit values
with a float32 scale, symmetric absmax: scale = max|x| / (the format's largest value), so every
(token slot, KV head) uses the format's whole range whatever its magnitude. The scales live beside
the pages (KVCache.k_scale / v_scale, [L, P, S, K]), 4 bytes per H values: 1.06 bytes a value at
H = 64 instead of 2 (bf16) or 4 (float32). fp8 takes per-slot scales too, not vLLM's default
per-tensor scale of 1.0: 1.0 needs calibrated activations to fit e4m3's range (448) and spends its
3 mantissa bits unevenly over small and large heads; one scheme keeps one code path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxserve.engine_args import KV_CACHE_DTYPES
from jaxserve.models.metadata import KVCache
from jaxserve.precision import storage_dtype, target_platform

SCALE_DTYPE = jnp.dtype(jnp.float32)

# The 8-bit forms: the stored dtype and the largest magnitude it holds. int8 keeps -128 out, so
# the range is symmetric.
_EIGHT_BIT = {
    "int8": (jnp.dtype(jnp.int8), 127.0),
    "fp8_e4m3": (jnp.dtype(jnp.float8_e4m3fn), float(jnp.finfo(jnp.float8_e4m3fn).max)),  # 448
    "fp8_e5m2": (jnp.dtype(jnp.float8_e5m2), float(jnp.finfo(jnp.float8_e5m2).max)),      # 57344
}
_ALIASES = {"fp8": "fp8_e4m3"}
# The 8-bit page dtypes and their largest value: what write_kv quantizes to, read off the pages.
QUANT_MAX = {dtype: quant_max for dtype, quant_max in _EIGHT_BIT.values()}


@dataclasses.dataclass(frozen=True, slots=True)
class KVCacheDtype:
    """How K and V values are stored: `dtype` as they are, or quantized to it with a float32
    scale per (token slot, KV head) when `quant_max` is set."""

    name: str                  # the mode, aliases resolved ("auto" becomes the model's dtype's name)
    dtype: jnp.dtype           # the values' dtype (bf16 here even where it is stored packed)
    quant_max: float | None    # largest stored magnitude of the 8-bit forms; None: no scales

    @property
    def scaled(self) -> bool:
        return self.quant_max is not None

    @property
    def storage_dtype(self) -> jnp.dtype:
        """The page arrays' dtype on the target platform (bf16 as uint16 on CPU)."""
        return storage_dtype(self.dtype)

    def bytes_per_token(self, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        """K and V of one token in every layer, scales included."""
        per_head = head_dim * self.dtype.itemsize + (SCALE_DTYPE.itemsize if self.scaled else 0)
        return 2 * num_layers * num_kv_heads * per_head

    def zeros(self, shape: tuple[int, ...]) -> KVCache:
        """An empty cache whose pages have `shape` (models.metadata.kv_page_shape: [L, P, S, K, H],
        or [L, P, S, H] for one KV head), with scales of that shape less its last axis where scaled."""
        pages = lambda: jnp.zeros(shape, self.storage_dtype)
        scales = lambda: jnp.zeros(shape[:-1], SCALE_DTYPE) if self.scaled else None
        return KVCache(k=pages(), v=pages(), k_scale=scales(), v_scale=scales())


def kv_cache_dtype(name: str, model_dtype) -> KVCacheDtype:
    """The KVCacheDtype of mode `name` for a model whose (unpacked) weights are `model_dtype`, on
    the target platform. fp8 is refused on CPU: XLA:CPU has no fp8 arithmetic and converts fp8
    in software (see benchmarks/README.md, KV cache dtype: int8 does the same job there)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    name = _ALIASES.get(name, name)
    if name == "auto":
        dtype = jnp.dtype(model_dtype)
        return KVCacheDtype(dtype.name, dtype, None)
    if name == "bfloat16":
        return KVCacheDtype(name, jnp.dtype(jnp.bfloat16), None)
    if name.startswith("fp8") and target_platform() == "cpu":
        raise ValueError(f"kv_cache_dtype {name} runs on accelerators only: XLA:CPU converts fp8 in software, "
                         f"slower than int8 at the same size; use int8 on CPU")
    dtype, quant_max = _EIGHT_BIT[name]
    return KVCacheDtype(name, dtype, quant_max)


def quantize(x: jax.Array, dtype, quant_max: float) -> tuple[jax.Array, jax.Array]:
    """[..., H] -> (values [..., H] of `dtype`, float32 scales [...]): symmetric absmax over the
    last axis, values * scale ~ x. An all-zero vector gets scale 0 (and zeros)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / quant_max  # [...]
    scaled = x / jnp.where(scale > 0, scale, 1.0)[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        scaled = jnp.round(scaled)
    # Clipped: x / (max|x| / m) can round a hair past m, and an fp8 cast of that is NaN, not m.
    return jnp.clip(scaled, -quant_max, quant_max).astype(dtype), scale


def dequantize(values: jax.Array, scales: jax.Array) -> jax.Array:
    """The inverse of quantize in float32: values [..., H] * scales [...]."""
    return values.astype(jnp.float32) * scales[..., None]
