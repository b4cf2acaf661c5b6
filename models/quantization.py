"""Weights kept quantized on the device: `--quantization int8` (W8A8, as vLLM's int8 schemes).

The decoder layers' projections (q/k/v/o and the gated MLP's gate/up/down) are stored as int8
with one float32 scale per output channel (symmetric, absmax / 127, over the axes the matmul
contracts). Each activation row is quantized as it goes, one scale per token (dynamic), after its
4 largest-magnitude entries are split out (LLM.int8()-style, a fixed count instead of a threshold):
those few are multiplied in float32 with their int8 weight rows, and the rest runs an int8 x int8
-> int32 dot scaled back to float32. A quarter of fp32's weight bytes, and more products per
cycle on a CPU.

Why the split: SmolLM2's RMSNorm outputs carry a few channels far above the rest of each token
(the largest 3-12x the token's 99th percentile at the median token, up to 90x; the same channels
at every token), and the down_proj input a few of its own (up to 760x); one scale per token
spends its 8 bits on them. With it, perplexity on tests/test_quantization.py's text is +1.3% over
float32 and next-token agreement 0.973 (one scale per token: +3.3%, 0.926); on XLA:CPU it costs
about 8% of one stream's decode speed, 15% of 32 streams' and 18% of a prefill's
(benchmarks/README.md). o_proj's input (the heads' outputs) has no such channels and keeps one
plain scale per token.

What stays in the model's float dtype: the embedding table and lm_head (the logits lose the most
to int8 activations: on SmolLM2 and a 50-token text, perplexity moved 5% with them quantized, 0.3%
without), norms, biases, MoE experts and routers (their grouped matmul has no int8 path here),
LoRA adapters. A SmoothQuant-style migration of each RMSNorm's scale into the weights lowered the
agreement with float32 on SmolLM2 instead of raising it, so it is not done.

A quantized weight is a `QuantizedWeight` pytree node where the float array was, so the params
keep their paths (sharding, LoRA, the layer scan are unchanged); `dense` in models/layers.py
dispatches on it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

QUANTIZATION_METHODS = ("int8",)

# The params quantized, by their last path name: how many axes the step's matmul contracts (the
# leading ones after the layer axis: [D, N, H] contracts D; o_proj [N, H, D] contracts N, H), and
# how many of each token's activations the product keeps out of their int8 scale (int8_einsum;
# on SmolLM2 2 gave +0.25% perplexity on a longer text where 4 gave +0.07%, and splitting o_proj's
# input too changed nothing).
_PROJECTIONS = {"q_proj": (1, 4), "k_proj": (1, 4), "v_proj": (1, 4), "o_proj": (2, 0),
                "gate_proj": (1, 4), "up_proj": (1, 4), "down_proj": (1, 4)}
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
    # Each token's largest-magnitude activations the product takes in float32 (int8_einsum).
    outliers: int = dataclasses.field(default=0, metadata=dict(static=True))

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


@functools.partial(jax.jit, static_argnums=(1, 2))  # one graph per weight shape (cached across starts), not op by op
def quantize_int8(w: jax.Array, contracted: tuple[int, ...], outliers: int = 0) -> QuantizedWeight:
    """Symmetric int8 of `w` with one scale per slice over `contracted` (all-zero slices get scale 1)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contracted)
    scale = jnp.where(amax > 0, amax / _INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(w32 / jnp.expand_dims(scale, contracted)), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return QuantizedWeight(q=q, scale=scale.astype(jnp.float32), contracted=contracted, outliers=outliers)


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
        if path[0] == "layers" and name in _PROJECTIONS:
            leading, outliers = _PROJECTIONS[name]
            return quantize_int8(tree, tuple(range(1, 1 + leading)), outliers)
        return tree

    return walk(params, ())


def _quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [R, C]'s dynamic int8 form: one scale per row [R, 1]."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.maximum(amax, jnp.finfo(jnp.float32).tiny) / _INT8_MAX
    return jnp.clip(jnp.round(x / scale), -_INT8_MAX, _INT8_MAX).astype(jnp.int8), scale


def _split_outliers(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [R, C] less each row's k largest-magnitude entries, those entries [R, k] and their
    channels [R, k]. Per row, so a token's product never depends on the others in its batch."""
    _, channels = jax.lax.top_k(jnp.abs(x), k)  # [R, k]
    picked = jnp.any(jnp.arange(x.shape[-1])[:, None] == channels[:, None, :], axis=-1)  # [R, C]
    return jnp.where(picked, 0.0, x), jnp.take_along_axis(x, channels, axis=-1), channels


def int8_einsum(spec: str, x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """einsum(spec, x, w) for a spec "<x axes>,<w axes>-><x's kept axes><w's kept axes>" whose
    contracted axes are x's last and w's first (every projection's), in x's dtype.

    Each token's w.outliers largest-magnitude activations are multiplied in float32 with their
    int8 weight rows (LLM.int8()'s outlier split, with a fixed count per token instead of a
    threshold); the rest of the token, whose scale they no longer set, is quantized to int8 and
    runs the int8 x int8 -> int32 dot. Both parts then take the weight's per-channel scales."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    n = sum(a not in out for a in x_axes)  # contracted axes
    assert x_axes[-n:] == w_axes[:n] and out == x_axes[:-n] + w_axes[n:], \
        f"int8_einsum needs x's kept axes, then w's: {spec}"
    rows = x.reshape(-1, math.prod(x.shape[-n:])).astype(jnp.float32)  # [R, C]
    q = w.q.reshape(rows.shape[-1], -1)  # [C, O]
    outlier_part = 0.0
    if w.outliers:
        rows, outliers, channels = _split_outliers(rows, min(w.outliers, rows.shape[-1]))
        # One [R, O] gather of weight rows per outlier rank, multiplied and summed in one fused
        # loop: about half XLA:CPU's time for a gather to [R, k, O] and a batched dot.
        for j in range(channels.shape[-1]):
            # channels' column j as a masked sum, not a slice: XLA:CPU runs top_k as its TopK kernel
            # only while nothing slices into its result, and otherwise sorts whole rows (6x slower);
            # an optimization_barrier around top_k aborts XLA's SPMD partitioner (tensor parallel).
            rank_j = jnp.sum(jnp.where(jnp.arange(channels.shape[-1]) == j, channels, 0), axis=-1)  # [R]
            outlier_part = outlier_part + outliers[:, j, None] * q[rank_j].astype(jnp.float32)  # [R, O]
    rows_q, row_scale = _quantize_rows(rows)
    y = jnp.dot(rows_q, q, preferred_element_type=jnp.int32).astype(jnp.float32) * row_scale + outlier_part  # [R, O]
    return (y * w.scale.reshape(-1)).reshape(x.shape[:-n] + w.q.shape[n:]).astype(x.dtype)


def weights_dtype(params) -> jnp.dtype:
    """The dtype the model's float params are stored in (its --dtype, or packed bf16), whether or
    not its projections are quantized: what the KV cache and adapters follow."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return next(x.dtype for x in leaves if not isinstance(x, QuantizedWeight))


def param_bytes(params) -> int:
    """Device bytes of the params, int8 values and their scales included."""
    return sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
