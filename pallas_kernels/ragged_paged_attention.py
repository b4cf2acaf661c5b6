"""Ragged paged attention as a Pallas kernel: kernel -> pallas_call wrapper -> validated jitted API.

One program attends one q block (up to block_q tokens of one sequence) for one KV head, looping
over that sequence's pages pages_per_block at a time, so it reads only pages the sequence owns.
The dense oracle with the same contract lives in reference.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve.precision import unpack
from jaxserve.pallas_kernels.ragged_batch import (QBlocks, cap_scores, gather_token_outputs, page_values,
                                                  split_q_blocks, validate_attention_args)


def ragged_paged_attention_kernel(
    # inputs
    blocks_ref: QBlocks,  # each field [M] int32: the step's q blocks (see ragged_batch.QBlocks)
    page_table_ref,       # [B, W] int32
    q_ref,                # [T + block_q - 1, K, G, H], padded so a block read never leaves it
    k_pages_ref,          # [P, S, K, H]
    v_pages_ref,          # [P, S, K, H]
    *scale_and_out_refs,  # with 8-bit pages k_scales_ref, v_scales_ref [P, S, K] float32; then the output
                          # o_ref [block_q, G, H], this block's rows for this program's KV head
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    pages_per_block: int,
):
    *scale_refs, o_ref = scale_and_out_refs
    k_scales_ref, v_scales_ref = scale_refs or (None, None)
    i, h = pl.program_id(0), pl.program_id(1)
    block_q, G, H = o_ref.shape
    _, S, _, _ = k_pages_ref.shape
    C = pages_per_block
    seq, first_pos = blocks_ref.seq[i], blocks_ref.first_pos[i]
    lo_page, hi_page = blocks_ref.lo_page[i], blocks_ref.hi_page[i]

    q = q_ref[pl.ds(blocks_ref.q_start[i], block_q), h, :, :].reshape(block_q * G, H)  # [R*G, H]
    # Query rows are (token, group) pairs: all G heads of a KV head share its keys.
    row_pos = first_pos + lax.broadcasted_iota(jnp.int32, (block_q * G, 1), 0) // G  # [R*G, 1]

    def body(c, carry):
        m_prev, l_prev, acc_prev = carry  # [R*G, 1], [R*G, 1], [R*G, H]
        cols = lo_page + c * C + lax.broadcasted_iota(jnp.int32, (C,), 0)  # [C]
        # Clamped to the block's last page: never reads another sequence's page; the clamped
        # columns are masked through their unclamped KV indices.
        pages = page_table_ref[seq, jnp.clip(cols, lo_page, hi_page - 1)]  # [C]
        # 8-bit values convert exactly; their scales multiply the scores and the probabilities.
        k = page_values(k_pages_ref[pages, :, h, :], q.dtype).reshape(C * S, H)  # [C*S, H]
        v = page_values(v_pages_ref[pages, :, h, :], q.dtype).reshape(C * S, H)  # [C*S, H]
        kv_idx = (cols[:, None] * S + lax.broadcasted_iota(jnp.int32, (C, S), 1)).reshape(1, C * S)
        mask = kv_idx <= row_pos  # [R*G, C*S]
        if sliding_window is not None:
            mask &= kv_idx > row_pos - sliding_window
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if k_scales_ref is not None:
            s = s * k_scales_ref[pages, :, h].reshape(1, C * S)
        s = jnp.where(mask, cap_scores(s * sm_scale, soft_cap), -jnp.inf)  # [R*G, C*S]
        m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        # Rows with nothing visible yet (rows past the block's end, or a window that starts in a
        # later chunk) keep m = -inf: shift them by 0 to avoid inf - inf.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe)
        corr = jnp.exp(m_prev - m_safe)
        l_next = corr * l_prev + p.sum(axis=1, keepdims=True)
        if v_scales_ref is not None:
            p = p * v_scales_ref[pages, :, h].reshape(1, C * S)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [R*G, H]
        return m_next, l_next, corr * acc_prev + pv

    init = (jnp.full((block_q * G, 1), -jnp.inf, jnp.float32), jnp.zeros((block_q * G, 1), jnp.float32),
            jnp.zeros((block_q * G, H), jnp.float32))
    # Trip count from this block's own page range: empty blocks run no iteration at all.
    _, l, acc = lax.fori_loop(0, pl.cdiv(hi_page - lo_page, C), body, init)
    out = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
    o_ref[...] = out.reshape(block_q, G, H).astype(o_ref.dtype)


def ragged_paged_attention_blocks(q, k_pages, v_pages, page_table, blocks: QBlocks, *, sm_scale: float,
                                  sliding_window: int | None, soft_cap: float | None, block_q: int,
                                  pages_per_block: int, interpret, k_scales=None, v_scales=None) -> jax.Array:
    """Runs the kernel over a grid of (q blocks, KV heads) -> [M, block_q, N, H]."""
    T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    G = N // K
    M = blocks.seq.shape[0]
    q_padded = jnp.pad(q, ((0, block_q - 1), (0, 0), (0, 0))).reshape(T + block_q - 1, K, G, H)
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, h: (0,) * x.ndim)
    kernel = functools.partial(ragged_paged_attention_kernel, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, pages_per_block=pages_per_block)
    scales = [] if k_scales is None else [k_scales, v_scales]
    out = pl.pallas_call(
        kernel,
        grid=(M, K),
        in_specs=[
            QBlocks(*(whole(x) for x in blocks)),  # blocks
            whole(page_table),                      # page_table
            whole(q_padded),                        # q
            whole(k_pages),                         # k_pages
            whole(v_pages),                         # v_pages
            *(whole(x) for x in scales),            # k_scales, v_scales
        ],
        out_specs=pl.BlockSpec((None, block_q, None, G, H), lambda i, h: (i, 0, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((M, block_q, K, G, H), q.dtype),
        interpret=interpret,
        name=f"ragged_paged_attention_{block_q=}_{pages_per_block=}",
    )(blocks, page_table, q_padded, k_pages, v_pages, *scales)
    return out.reshape(M, block_q, N, H)  # [M, R, N, H]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q",
                                             "pages_per_block", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None, k_scales=None, v_scales=None, block_q: int = 16,
                           pages_per_block: int = 8, interpret=False) -> jax.Array:
    """Ragged paged attention (the contract of ragged_paged_attention_reference) as a Pallas kernel.

    Args:
      q: [T, N, H] queries of all scheduled tokens, sequence after sequence.
      k_pages, v_pages: [P, S, K, H] one layer's pages (or all layers' flattened, ids offset).
      kv_lens: [B] int32 KV length of each sequence including this step's tokens.
      page_table: [B, W] int32 pages of each sequence.
      cu_q_lens: [B + 1] int32 token offsets of each sequence in q.
      num_seqs: [] int32 number of real sequences; later slots are padding.
      sm_scale: softmax scale; sliding_window: attend only to the last this-many positions;
      soft_cap: scores become soft_cap * tanh(score / soft_cap) (Gemma 2), None: uncapped.
      k_scales, v_scales: [P, S, K] float32 scales of 8-bit (int8, fp8) pages; None otherwise.
      block_q: tokens per q block (one program); pages_per_block: pages per inner-loop step.
      interpret: True runs the kernel as XLA ops (the only way on CPU).
    Returns:
      [T, N, H] in q's dtype; zeros for padding tokens.
    """
    validate_attention_args(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            sm_scale, sliding_window, soft_cap, k_scales, v_scales)
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be >= 1, got {pages_per_block}")
    blocks, rows = split_q_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens=q.shape[0], block_q=block_q,
                                  page_size=k_pages.shape[1], sliding_window=sliding_window)
    # Packing is a CPU storage form (jaxserve/precision.py); the kernel reads plain bf16 pages.
    k_pages, v_pages = unpack(k_pages), unpack(v_pages)
    out = ragged_paged_attention_blocks(q, k_pages, v_pages, page_table, blocks, sm_scale=sm_scale,
                                        sliding_window=sliding_window, soft_cap=soft_cap, block_q=block_q,
                                        pages_per_block=pages_per_block, interpret=interpret,
                                        k_scales=k_scales, v_scales=v_scales)
    return gather_token_outputs(out, rows).astype(q.dtype)
