"""Speculative verification on the device: which draft tokens the target model accepts, and the
token it adds, for every row of a step at once (the verify graph, jaxserve/runner.py).

Greedy rows accept the longest prefix of drafts equal to the target's argmax, then take the
argmax after it. Sampled rows use rejection sampling (Leviathan et al. 2023; Chen et al. 2023):
draft x at position j is accepted with probability min(1, p_j(x) / q_j(x)), p_j being the row's
distribution exactly as the sampler draws from it (temperature, top-k, top-p, min-p:
core.filtered_weights); at the first rejection the row draws from norm(max(p_j - q_j, 0)), and
when every draft is accepted it draws its bonus token from p. An n-gram draft is one token with
certainty (q one-hot), so acceptance is p_j(x) and the residual is p_j with x removed. Either way
the emitted tokens are distributed as the target alone would sample them.

Randomness stays per row and per output position: position j of a row uses the key the plain
sampler would use for that output (fold_in(key(seed), step + j)) for its draw, and a key folded
once more for its accept test, so a seeded request reproduces, and a row whose drafts are all
rejected draws its token exactly as without speculation.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.sampling.core import SamplingTensors, argmax, filtered_weights, inverse_cdf, row_keys, uniforms


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftInputs:
    """A speculative step's drafts, one row per sequence slot (B = batch bucket, K = drafts per row)."""

    tokens: jax.Array       # [B, K] i32, each row's draft tokens, 0-padded
    counts: jax.Array       # [B] i32, how many of them are real (0: the row does not speculate)
    # [B, K, V] f32, the draft model's probabilities q of each position (its draw's distribution);
    # None for n-gram drafts, which are certain (q one-hot).
    probs: jax.Array | None = None


def verify(logits: jax.Array, t: SamplingTensors, drafts: DraftInputs) -> tuple[jax.Array, jax.Array]:
    """logits [B, K+1, V]: the target's at each row's last token and at each of its drafts.

    Returns (tokens [B, K+1], num_accepted [B]): a row emits tokens[:num_accepted + 1], its
    accepted drafts and then the target's own token."""
    logits = logits.astype(jnp.float32)
    B, K1, V = logits.shape
    K = K1 - 1
    greedy = t.temperature <= 0.0  # [B]
    in_range = jnp.arange(K)[None, :] < drafts.counts[:, None]  # [B, K]

    def greedy_rows():
        best = argmax(logits.reshape(B * K1, V)).reshape(B, K1)
        return best, best[:, :K] == drafts.tokens

    # No filtering or RNG when every row is greedy (the usual n-gram deployment).
    target, accepted = lax.cond(jnp.all(greedy), greedy_rows, lambda: _rejection_sample(logits, t, drafts, greedy))
    accepted = accepted & in_range
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # [B], the accepted prefix
    # Drafts before the first rejection, then the target's token there; the rest is ignored.
    position = jnp.arange(K1)[None, :]
    padded = jnp.concatenate([drafts.tokens, jnp.zeros((B, 1), jnp.int32)], axis=1)  # [B, K+1]
    chosen = jnp.take_along_axis(target, num_accepted[:, None], axis=1)  # [B, 1]
    tokens = jnp.where(position < num_accepted[:, None], padded, chosen)
    return tokens.astype(jnp.int32), num_accepted.astype(jnp.int32)


def _rejection_sample(logits: jax.Array, t: SamplingTensors, drafts: DraftInputs,
                      greedy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(the target's token at each position if the row stops there [B, K+1], each draft's accept
    test [B, K]) for rows of any kind; greedy rows' distribution is one-hot at the argmax."""
    B, K1, V = logits.shape
    K = K1 - 1
    # Every position as a row of its own: the row's parameters, its output step moved on by j.
    per_position = lambda a: jnp.repeat(a, K1, axis=0)  # [B] -> [B * (K+1)]
    steps = per_position(t.steps) + jnp.tile(jnp.arange(K1, dtype=t.steps.dtype), B)
    flat_t = dataclasses.replace(t, temperature=per_position(t.temperature), top_p=per_position(t.top_p),
                                 top_k=per_position(t.top_k), min_p=per_position(t.min_p),
                                 seeds=per_position(t.seeds), steps=steps)
    flat_greedy = per_position(greedy)
    kept, best = filtered_weights(logits.reshape(B * K1, V), flat_t, flat_greedy)  # [B*(K+1), V], [B*(K+1)]
    p = kept / jnp.maximum(kept.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    p = jnp.where(flat_greedy[:, None], jax.nn.one_hot(best, V, dtype=p.dtype), p).reshape(B, K1, V)

    draft_one_hot = jax.nn.one_hot(drafts.tokens, V, dtype=p.dtype)  # [B, K, V]
    q = draft_one_hot if drafts.probs is None else drafts.probs
    p_draft = jnp.sum(p[:, :K] * draft_one_hot, axis=-1)  # [B, K]
    q_draft = jnp.sum(q * draft_one_hot, axis=-1)
    keys = row_keys(flat_t.seeds, flat_t.steps)  # [B*(K+1)]
    u_accept = uniforms(jax.vmap(lambda key: jax.random.fold_in(key, 1))(keys)).reshape(B, K1)[:, :K]
    # u < p / q, written without the division (q of a drawn draft is > 0).
    accepted = u_accept * q_draft < p_draft

    # Where a draft may be rejected the row draws from the residual, after the last from p itself.
    in_range = jnp.arange(K)[None, :] < drafts.counts[:, None]
    residual = jnp.where(in_range[..., None], jnp.maximum(p[:, :K] - q, 0.0), p[:, :K])
    residual = jnp.concatenate([residual, p[:, K:]], axis=1)  # [B, K+1, V]
    # p == q leaves nothing (and then never rejects); rounding must not leave an empty row to draw from.
    empty = jnp.sum(residual, axis=-1, keepdims=True) <= 0.0
    residual = jnp.where(empty, p, residual).reshape(B * K1, V)
    drawn = inverse_cdf(residual, uniforms(keys))
    target = jnp.minimum(jnp.where(flat_greedy, best, drawn), V - 1).reshape(B, K1)
    return target.astype(jnp.int32), accepted
