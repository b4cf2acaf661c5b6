"""The mixture-of-experts MLP block (Mixtral, Qwen2-MoE, Qwen3-MoE) and the checkpoint names of
its experts.

Routing: softmax over the experts in float32, the top k per token, renormalised where the model
does (Mixtral always, Qwen where norm_topk_prob). The T x k (token, expert) assignments are sorted
by expert, so every expert's tokens are contiguous rows, and each projection is one grouped matmul
over those rows (`grouped_matmul`): no Python loop over experts, one graph for any routing. Qwen2-MoE
adds a shared expert, gated per token by a sigmoid.

The grouped matmul is `jax.lax.ragged_dot` on accelerators (a grouped GEMM there). XLA:CPU lowers
ragged_dot to a dense product of every row with every expert (E times the work: 8x for Mixtral,
16x for Qwen3-MoE's 128 experts at k = 8), so on CPU the rows go through in blocks of one expert
each, a loop that runs only over blocks holding rows: a decode step reads each expert it routes to
once.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.models.layers import ACTIVATIONS, GatedMLP, HFTensor, _kernel_init, dense
from jaxserve.precision import target_platform, unpack

# Rows per block of the CPU grouped matmul: large enough for an efficient product, small enough
# that a group's last, partly filled block wastes little.
CPU_BLOCK_ROWS = 16


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] with group g's rows contiguous and in group order, w [G, K, N] -> [M, N] with
    row i of group g multiplied by w[g]; rows past sum(group_sizes) give zeros."""
    w = unpack(w)
    if target_platform() != "cpu":
        return jax.lax.ragged_dot(x.astype(w.dtype), w, group_sizes, preferred_element_type=x.dtype)
    return _blocked_grouped_matmul(x, w, group_sizes)


def _blocked_grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """grouped_matmul as a loop over blocks of CPU_BLOCK_ROWS rows, each within one group."""
    M, _ = x.shape
    G, _, N = w.shape
    R = CPU_BLOCK_ROWS
    group_end = jnp.cumsum(group_sizes)  # [G]
    group_start = group_end - group_sizes
    blocks = (group_sizes + R - 1) // R  # [G] blocks of each group
    block_end = jnp.cumsum(blocks)
    x = jnp.pad(x, ((0, R), (0, 0)))  # a block read never leaves x

    def block(j, out):
        g = jnp.searchsorted(block_end, j, side="right")  # the group block j belongs to
        start = group_start[g] + (j - (block_end[g] - blocks[g])) * R
        rows = jax.lax.dynamic_slice_in_dim(x, start, R)  # [R, K]
        product = jnp.einsum("RK,KN->RN", rows.astype(w.dtype), w[g], preferred_element_type=x.dtype)
        # Rows past the group's end belong to the next group (computed by a later block): keep them.
        own = (start + jnp.arange(R) < group_end[g])[:, None]
        current = jax.lax.dynamic_slice_in_dim(out, start, R)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(own, product, current), start, axis=0)

    out = jax.lax.fori_loop(0, block_end[-1], block, jnp.zeros((M + R, N), x.dtype))
    return out[:M]


class SparseMoE(nn.Module):
    """top-k routed experts (each a gated MLP), plus Qwen2-MoE's sigmoid-gated shared expert."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    activation: str
    normalize_top_k: bool
    shared_intermediate_size: int = 0  # 0: no shared expert

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [T, D] -> [T, D]
        T, D = x.shape
        E, k, F = self.num_experts, self.top_k, self.intermediate_size
        router = self.param("router", _kernel_init, (D, E))
        gate = self.param("experts_gate", _kernel_init, (E, D, F))
        up = self.param("experts_up", _kernel_init, (E, D, F))
        down = self.param("experts_down", _kernel_init, (E, F, D))
        with jax.named_scope("moe"):
            probs = jax.nn.softmax(dense("TD,DE->TE", x, router).astype(jnp.float32), axis=-1)
            weights, experts = jax.lax.top_k(probs, k)  # [T, k]
            if self.normalize_top_k:
                weights = weights / weights.sum(axis=-1, keepdims=True)
            weights = weights.astype(x.dtype)
            # Assignments sorted by expert: each expert's rows contiguous, in expert order.
            order = jnp.argsort(experts.reshape(-1), stable=True)  # [T*k]
            token = order // k
            group_sizes = jnp.bincount(experts.reshape(-1), length=E).astype(jnp.int32)  # [E]
            rows = x[token]  # [T*k, D]
            h = ACTIVATIONS[self.activation](grouped_matmul(rows, gate, group_sizes))
            h = h * grouped_matmul(rows, up, group_sizes)  # [T*k, F]
            y = grouped_matmul(h, down, group_sizes) * weights.reshape(-1)[order][:, None]  # [T*k, D]
            out = jnp.zeros_like(x).at[token].add(y)
        if self.shared_intermediate_size:
            shared = GatedMLP(self.shared_intermediate_size, self.activation, name="shared_expert")(x)
            shared_gate = self.param("shared_expert_gate", _kernel_init, (D, 1))
            out = out + jax.nn.sigmoid(dense("TD,DO->TO", x, shared_gate)) * shared
        return out


def without_dense_mlp(names: dict) -> dict:
    """A tensor map without the dense MLP's entries, which an MoE layer replaces."""
    return {path: t for path, t in names.items() if path[:2] != ("layers", "mlp")}


def expert_tensors(cfg, moe: str, names: dict[str, str]) -> dict[tuple[str, ...], HFTensor]:
    """Our MoE params -> HF per-expert tensors ("{e}" stacks over the experts). `moe` is the
    block's HF prefix; names maps gate / up / down to the experts' HF projection names."""
    D, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    experts = f"model.layers.{{l}}.{moe}.experts.{{e}}"
    return {
        ("layers", "mlp", "router"): HFTensor(f"model.layers.{{l}}.{moe}.gate.weight", (E, D), True),
        ("layers", "mlp", "experts_gate"): HFTensor(f"{experts}.{names['gate']}.weight", (F, D), True),
        ("layers", "mlp", "experts_up"): HFTensor(f"{experts}.{names['up']}.weight", (F, D), True),
        ("layers", "mlp", "experts_down"): HFTensor(f"{experts}.{names['down']}.weight", (D, F), True),
    }
