"""Weights kept quantized on the device: `--quantization int8` (W8A8, as vLLM's int8 schemes).

The decoder layers' projections (q/k/v/o and the gated MLP's gate/up/down) are stored as int8
with one float32 scale per output channel (symmetric, absmax / 127, over the axes the matmul
contracts). Each activation row is quantized the same way as it goes (one scale per token,
dynamic), so a projection is an int8 x int8 -> int32 dot scaled back to float32: a quarter of
fp32's weight bytes, and more products per cycle on a CPU.

What stays in the model's float dtype: the embedding table and lm_head (the logits lose the most
to int8 activations: on SmolLM2 and a 50-token text, perplexity moved 5% with them quantized, 0.3%
without; tests/test_quantization.py measures 3.3% on a longer one),
norms, biases, MoE experts and routers (their grouped matmul has no int8 path here), LoRA
adapters. A SmoothQuant-style migration of each RMSNorm's scale into the weights lowered the
agreement with float32 on SmolLM2 instead of raising it, so it is not done.

A quantized weight is a `QuantizedWeight` pytree node where the float array was, so the params
keep their paths (sharding, LoRA, the layer scan are unchanged); `dense` in models/layers.py
dispatches on it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

QUANTIZATION_METHODS = ("int8",)

# The params quantized, by their last path name, and how many axes the step's matmul contracts:
# the leading ones after the layer axis ([D, N, H] contracts D; o_proj [N, H, D] contracts N, H).
_LEADING_CONTRACTED = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2,
                       "gate_proj": 1, "up_proj": 1, "down_proj": 1}
_INT8_MAX = 127.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """An int8 weight and its per-output-channel scales: weight ~= q * scale (scale broadcast
    over the contracted axes)."""

    q: jax.Array      # int8, the float weight's shape
    scale: jax.Array  # float32, the weight's shape without its contracted axes
    # Axes of q the scale drops, as stored (a stacked layer weight's start at 1; int8_einsum
    # reads the axes from its spec instead, so a layer's slice of the stack works the same).
    contracted: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def ndim(self) -> int:
        return self.q.ndim

    @property
    def size(self) -> int:  # weights, not their scales
        return self.q.size

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * jnp.expand_dims(self.scale, self.contracted)).astype(dtype)


@functools.partial(jax.jit, static_argnums=1)  # one graph per weight shape (cached across starts), not op by op
def quantize_int8(w: jax.Array, contracted: tuple[int, ...]) -> QuantizedWeight:
    """Symmetric int8 of `w` with one scale per slice over `contracted` (all-zero slices get scale 1)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contracted)
    scale = jnp.where(amax > 0, amax / _INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w32 / jnp.expand_dims(scale, contracted)), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale.astype(jnp.float32), contracted=contracted)


def quantize_params(params: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The params with the decoder layers' projections quantized by `method` (None: as they are).
    Layer params are stacked on axis 0, so their contracted axes start at 1."""
    if method is None:
        return params
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}; expected one of: {', '.join(QUANTIZATION_METHODS)}")

    def walk(tree, path):
        if isinstance(tree, dict):
            return {k: walk(v, path + (k,)) for k, v in tree.items()}
        name = path[-1]
        if path[0] == "layers" and name in _LEADING_CONTRACTED:
            return quantize_int8(tree, tuple(range(1, 1 + _LEADING_CONTRACTED[name])))
        return tree

    return walk(params, ())


def _quantize_rows(x: jax.Array, contracted: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """x's dynamic int8 form: one scale per slice over `contracted` (kept as size-1 axes)."""
    amax = jnp.max(jnp.abs(x), axis=contracted, keepdims=True)
    scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / _INT8_MAX
    return jnp.clip(jnp.round(x / scale), -_INT8_MAX, _INT8_MAX).astype(jnp.int8), scale


def int8_einsum(spec: str, x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """einsum(spec, x, w) for a spec "<x axes>,<w axes>-><x's kept axes><w's kept axes>" (every
    projection's), in x's dtype: x quantized per row, an int32 dot, both scales applied to it."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    x_contracted = tuple(i for i, a in enumerate(x_axes) if a not in out)
    kept_w = "".join(a for a in w_axes if a in out)
    assert out == "".join(a for a in x_axes if a in out) + kept_w, f"int8_einsum needs x's axes, then w's: {spec}"
    xq, x_scale = _quantize_rows(x.astype(jnp.float32), x_contracted)
    acc = jnp.einsum(spec, xq, w.q, preferred_element_type=jnp.int32).astype(jnp.float32)  # [out]
    kept_shape = tuple(d for i, d in enumerate(x.shape) if i not in x_contracted)
    x_scale = x_scale.reshape(kept_shape + (1,) * len(kept_w))  # x's scales, then size 1 over w's axes
    return (acc * x_scale * w.scale).astype(x.dtype)


def weights_dtype(params) -> jnp.dtype:
    """The dtype the model's float params are stored in (its --dtype, or packed bf16), whether or
    not its projections are quantized: what the KV cache and adapters follow."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return next(x.dtype for x in leaves if not isinstance(x, QuantizedWeight))


def param_bytes(params) -> int:
    """Device bytes of the params, int8 values and their scales included."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
