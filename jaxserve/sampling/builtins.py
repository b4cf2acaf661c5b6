"""Ollama's extra samplers as pluggable JAX samplers: locally typical (typical_p), tail-free (tfs_z)
and Mirostat 1 and 2 (mu kept as per-row state), built on the core sampler's public primitives;
`BUILTINS` is what the registry lists first. Each reads its own parameters from
`t.sampler_params` (`Sampler.params` packs them: typical_p; tfs_z; mirostat_tau, mirostat_eta).

Each follows llama.cpp's rules on the temperature-scaled penalised logits (temperature first, as
on the default path) and draws with the default path's per-row uniform, so a seed gives one
stream whatever the sampler. Sorting a [64, 49152] batch costs ~0.9 s on the 2-core CPU, so the
sorted orders they need come from one `lax.top_k` prefix; a row the prefix cannot settle is
sorted alone (a few ms). The prefix is only ever read by gathers (`_columns`): on XLA:CPU a
static slice of `lax.top_k`'s output turns it back into a full sort (0.4-0.8 s at that size).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.sampling import core
from jaxserve.sampling.core import SamplingTensors
from jaxserve.sampling.registry import DEFAULT_SAMPLER, Sampler

# llama.cpp's m: how many of the most likely tokens Mirostat 1 fits its Zipf exponent on.
MIROSTAT_M = 100


def typical(logits: jax.Array, t: SamplingTensors, state: jax.Array, keys: jax.Array):
    """Locally typical sampling: keep the tokens whose surprise -log p is closest to the entropy,
    in that order, up to and including the one whose cumulative mass first exceeds typical_p."""
    x, greedy, best, row_max, weights = _scaled(logits, t)
    B, V = x.shape
    typical_p = t.sampler_params[:, 0]
    logp = x - (row_max + jnp.log(jnp.sum(weights, -1)))[:, None]  # [B, V]
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), -1)  # [B]
    score = jnp.abs(-logp - entropy[:, None])  # [B, V]; inf for impossible tokens
    off = greedy | (typical_p >= 1.0)

    cap = min(core.TOP_K_CAP, V)
    neg_score, ids = lax.top_k(-score, cap)  # [B, cap], most typical first
    cum = jnp.cumsum(jnp.take_along_axis(p, ids, -1), -1)
    num_kept = _num_kept(cum, typical_p)
    theta = -jnp.take_along_axis(neg_score, (num_kept - 1)[:, None], -1)[:, 0]
    settled = off | (num_kept < cap) | (cap == V)

    # Rows whose typical set is wider than the prefix: the threshold is the largest score key t
    # with mass(score < t) <= typical_p, found for all of them at once by bisection (32 passes
    # over [B, V]; sorting them one by one cost ~6 ms a row, and real steps have dozens).
    score_keys = core.ordered_key(score)  # [B, V]
    below_reaches = lambda k: jnp.sum(jnp.where(score_keys < k[:, None], p, 0.0), -1) <= typical_p
    theta = lax.cond(jnp.all(settled), lambda: theta, lambda: jnp.where(settled, theta, core.from_ordered_key(
        core.bisect(below_reaches, jnp.where(settled, 0, jnp.min(score_keys, -1)),
                     jnp.where(settled, 0, jnp.max(score_keys, -1))))))
    keep = off[:, None] | (score <= theta[:, None])
    return _draw(weights, keep, greedy, best, keys), state


def tail_free(logits: jax.Array, t: SamplingTensors, state: jax.Array, keys: jax.Array):
    """Tail-free sampling: over the probabilities sorted in descending order, normalise the
    |second differences| to sum 1 and cut where their running sum first exceeds tfs_z."""
    x, greedy, best, row_max, weights = _scaled(logits, t)
    B, V = x.shape
    lse = row_max + jnp.log(jnp.sum(weights, -1))
    tfs_z = t.sampler_params[:, 0]
    off = greedy | (tfs_z >= 1.0) | (V <= 2)

    cap = min(core.TOP_K_CAP, V)
    top = lax.top_k(x, cap)[0]  # [B, cap], descending
    p = lambda start, stop: jnp.exp(_columns(top, start, stop) - lse[:, None])
    d2 = jnp.abs(p(0, cap - 2) - 2.0 * p(1, cap - 1) + p(2, cap))  # [B, cap - 2]
    head = jnp.sum(d2, -1)
    # The second differences past the prefix sum to at most 2 * p[cap - 2] (the sorted first
    # differences are >= 0 and telescope), so the cut is exact when both ends agree on it.
    tail_bound = 2.0 * p(cap - 2, cap - 1)[:, 0] if cap < V else jnp.zeros(B)
    cut_low = _tail_free_cut(d2, head, tfs_z)
    cut_high = _tail_free_cut(d2, head + tail_bound, tfs_z)
    settled = off | ((cut_low == cut_high) & (cut_low < cap - 2) & (head > 1e-6)) | (cap == V)
    num_kept = jnp.where(cut_low < d2.shape[1], jnp.maximum(cut_low, 1), V)
    theta = jnp.take_along_axis(top, (jnp.minimum(num_kept, cap) - 1)[:, None], -1)[:, 0]

    def exact_row(r):
        desc = jnp.sort(x[r])[::-1]
        q = jnp.exp(desc - lse[r])
        row_d2 = jnp.abs(q[:-2] - 2.0 * q[1:-1] + q[2:])[None]
        cut = _tail_free_cut(row_d2, jnp.sum(row_d2, -1), tfs_z[r][None])[0]
        kept = jnp.where(cut < V - 2, jnp.maximum(cut, 1), V)
        return desc[kept - 1]

    theta = _settle(settled, theta, exact_row)
    keep = off[:, None] | (x >= theta[:, None])
    return _draw(weights, keep, greedy, best, keys), state


def mirostat(logits: jax.Array, t: SamplingTensors, state: jax.Array, keys: jax.Array):
    """Mirostat 1: fit the Zipf exponent s on the top MIROSTAT_M probabilities, keep the top k
    tokens with k = (eps * 2^mu / (1 - V^-eps))^(1/s), eps = s - 1, then draw and move mu."""
    x, greedy, best, row_max, weights = _scaled(logits, t)
    B, V = x.shape
    mu = state[:, 0]
    m = min(MIROSTAT_M, V)
    top = lax.top_k(x, max(min(core.TOP_K_CAP, V), m))[0]  # [B, >= m], descending
    i = jnp.arange(m - 1, dtype=jnp.float32)
    t_i = jnp.log((i + 2.0) / (i + 1.0))  # [m - 1]
    b_i = _columns(top, 0, m - 1) - _columns(top, 1, m)  # log(p_i / p_{i+1}), [B, m - 1]
    # Tokens of zero probability (banned ids) carry no information on the slope: skip them.
    valid = jnp.isfinite(b_i)
    s_hat = (jnp.sum(jnp.where(valid, t_i * b_i, 0.0), -1)
             / jnp.sum(jnp.where(valid, t_i * t_i, 0.0), -1))
    eps = s_hat - 1.0
    k = (eps * jnp.exp2(mu) / (1.0 - jnp.power(float(V), -eps))) ** (1.0 / s_hat)
    k = jnp.clip(jnp.nan_to_num(k, nan=V, posinf=V), 1, V).astype(jnp.int32)  # int(k), at least 1
    top_k = jnp.where(greedy | (k >= V), 0, k)
    cutoff = core.top_k_top_p_cutoff(x, weights, row_max, top_k, jnp.ones(B), prefix=top)
    keep = x >= cutoff[:, None]
    tokens = _draw(weights, keep, greedy, best, keys)
    return tokens, _update_mu(state, weights, keep, tokens, greedy, t)


def mirostat2(logits: jax.Array, t: SamplingTensors, state: jax.Array, keys: jax.Array):
    """Mirostat 2: keep the tokens whose surprise -log2 p is at most mu (the top one always),
    draw from them renormalised, and move mu towards tau."""
    x, greedy, best, row_max, weights = _scaled(logits, t)
    B, V = x.shape
    lse = row_max + jnp.log(jnp.sum(weights, -1))
    surprise = (lse[:, None] - x) / math.log(2.0)  # [B, V], bits
    keep = (surprise <= state[:, :1]) | (jnp.arange(V)[None, :] == best[:, None])
    tokens = _draw(weights, keep, greedy, best, keys)
    return tokens, _update_mu(state, weights, keep, tokens, greedy, t)


def mirostat_init_state(params) -> list[float]:
    return [2.0 * params.mirostat_tau]  # mu starts at twice the target surprise, as in the paper


def _typical_params(params) -> tuple[float]:
    return (params.typical_p,)


def _tail_free_params(params) -> tuple[float]:
    return (params.tfs_z,)


def _mirostat_params(params) -> tuple[float, float]:
    return (params.mirostat_tau, params.mirostat_eta)


# In registry.BUILTIN_NAMES order. Neutral parameters: filters off, mu left alone.
BUILTINS = (
    Sampler(DEFAULT_SAMPLER, core.default_sampler, builtin=True),
    Sampler("typical", typical, params=_typical_params, neutral=(1.0,), builtin=True),
    Sampler("tfs", tail_free, params=_tail_free_params, neutral=(1.0,), builtin=True),
    Sampler("mirostat", mirostat, 1, mirostat_init_state, _mirostat_params, (1.0, 0.0), builtin=True),
    Sampler("mirostat2", mirostat2, 1, mirostat_init_state, _mirostat_params, (1.0, 0.0), builtin=True),
)


# ---------------------------------------------------------------------------------- helpers

def _columns(a, start, stop):
    """a[:, start:stop] as a gather (see the module docstring for why not a slice)."""
    idx = jnp.broadcast_to(jnp.arange(start, stop), (a.shape[0], stop - start))
    return jnp.take_along_axis(a, idx, -1)


def _scaled(logits, t):
    """Temperature-scaled logits and what every sampler here needs from them."""
    greedy = t.temperature <= 0.0
    x = logits / jnp.where(greedy, 1.0, t.temperature)[:, None]  # [B, V]
    best = core.argmax(x)
    row_max = jnp.take_along_axis(x, best[:, None], -1)[:, 0]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    return x, greedy, best, row_max, jnp.exp(x - row_max[:, None])


def _draw(weights, keep, greedy, best, keys):
    V = weights.shape[1]
    drawn = core.inverse_cdf(jnp.where(keep, weights, 0.0), core.uniforms(keys))
    return jnp.minimum(jnp.where(greedy, best, drawn), V - 1).astype(jnp.int32)


def _update_mu(state, weights, keep, tokens, greedy, t):
    kept_mass = jnp.sum(jnp.where(keep, weights, 0.0), -1)
    p = jnp.take_along_axis(weights, tokens[:, None], -1)[:, 0] / kept_mass  # renormalised
    tau, eta = t.sampler_params[:, 0], t.sampler_params[:, 1]
    mu = state[:, 0] - eta * (-jnp.log2(p) - tau)
    return state.at[:, 0].set(jnp.where(greedy, state[:, 0], mu))  # greedy rows do not run mirostat


def _num_kept(cum, mass):
    """Tokens kept when each is kept until the running mass first exceeds `mass` (it included)."""
    return 1 + jnp.sum(cum[:, :-1] <= mass[:, None], -1)


def _tail_free_cut(d2, total, z):
    """First index where the running sum of d2 / total exceeds z (d2.shape[1] if none); llama.cpp
    falls back to uniform weights when the total is ~0."""
    n = d2.shape[1]
    normalised = jnp.where((total > 1e-6)[:, None], d2 / total[:, None], 1.0 / n)
    return jnp.sum(jnp.cumsum(normalised, -1) <= z[:, None], -1)


def _settle(settled, values, exact_row):
    """`values` [B], with the rows not settled replaced by exact_row(r), one row at a time."""
    def fallback():
        order = jnp.argsort(settled)  # unsettled rows first
        one = lambda j, vals: vals.at[order[j]].set(exact_row(order[j]))
        return lax.fori_loop(0, jnp.sum(~settled), one, values)
    return lax.cond(jnp.all(settled), lambda: values, fallback)
