"""The plain oracle of ragged paged attention: a dense softmax every kernel is checked against.

Contract (shared with the Pallas kernels and the tuned jnp path): q [T, N, H]; k_pages, v_pages
[P, S, K, H]; kv_lens [B] include this step's tokens, already written to the pages; page_table
[B, W]; cu_q_lens [B + 1]; num_seqs []. Token i of sequence b sits at position
kv_lens[b] - q_len_b + i and attends to KV 0..position (and > position - sliding_window); scores
are sm_scale * q.k, soft-capped to soft_cap * tanh(score / soft_cap) when soft_cap is set.
8-bit pages (int8, float8_e4m3fn, float8_e5m2) come with k_scales, v_scales [P, S, K] float32,
and hold the values pages * scales (jaxserve/kv_cache_dtype.py); bf16 pages may be packed as
uint16 (jaxserve/precision.py). Padding tokens give zeros. Returns [T, N, H] in q's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxserve.kv_cache_dtype import dequantize
from jaxserve.precision import unpack


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                                     *, sm_scale: float, sliding_window: int | None = None,
                                     soft_cap: float | None = None, k_scales=None, v_scales=None):
    """Dense softmax of every token over its sequence's whole page-table row (W * S keys).

    Deliberately shares no code with the kernels or the chunked jnp path, so the tests compare
    independent derivations of the contract. Slow: test oracle only.
    """
    T, N, H = q.shape
    _, S, K, _ = k_pages.shape
    B, W = page_table.shape
    token = jnp.arange(T)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], token, side="right"), B - 1)  # [T]
    valid = token < cu_q_lens[num_seqs]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (token - cu_q_lens[seq])  # [T]
    if k_scales is not None:  # every page dequantized whole, in float32
        k_pages, v_pages = dequantize(k_pages, k_scales), dequantize(v_pages, v_scales)
    k = unpack(k_pages[page_table[seq]]).reshape(T, W * S, K, H)
    v = unpack(v_pages[page_table[seq]]).reshape(T, W * S, K, H)
    qg = q.reshape(T, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("TKGH,TLKH->TKGL", qg, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        s = jnp.tanh(s / soft_cap) * soft_cap
    kv_idx = jnp.arange(W * S)
    mask = kv_idx[None, :] <= pos[:, None]  # [T, W*S]
    if sliding_window is not None:
        mask &= kv_idx[None, :] > pos[:, None] - sliding_window
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("TKGL,TLKH->TKGH", p, v.astype(jnp.float32)).reshape(T, N, H)
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)
