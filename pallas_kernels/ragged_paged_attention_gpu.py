"""Ragged paged attention for NVIDIA GPUs as a Pallas Triton kernel: kernel -> pallas_call wrapper
-> validated jitted API, with the contract of reference.ragged_paged_attention_reference.

Why Triton rather than Mosaic GPU: Pallas's Triton backend treats every ref as a pointer into HBM,
so the KV pages stay where they are and each program gathers only its own pages' rows with plain
indexed loads, on any grid and any GPU generation; its lowering runs without a GPU
(`jax.export(..., platforms=["cuda"])` checks it on CPU). Mosaic GPU stages BlockSpec blocks in
shared memory (the whole page arrays here: "kernel exceeds available shared memory"), so reading
pages by index there means hand-written TMA copies, which are Hopper-only. Triton's tensors need
power-of-two dims, so a query group of G heads is padded to the next power of two outside.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxserve.pallas_kernels.ragged_batch import (QBlocks, gather_token_outputs, split_q_blocks,
                                                  validate_attention_args)

# The custom calls the kernel lowers to: jax 0.10's Triton call, and the FFI one of later versions.
# jax.export keeps them only when told (they carry no compatibility guarantee).
TRITON_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")

# Query rows ((token, head) pairs) of a decode program and of a prefill program. Triton's dot
# needs at least 16 rows; decodes are bound by reading KV, prefills by the matmuls.
DECODE_ROWS = 16
PREFILL_ROWS = 64
# Keys per inner-loop step (whole pages, so a page size above this reads one page a step).
CHUNK_KEYS = 64


def ragged_paged_attention_gpu_kernel(
    # inputs
    blocks_ref: QBlocks,  # each field [M] int32: the step's q blocks (see ragged_batch.QBlocks)
    page_table_ref,       # [B, W] int32
    q_ref,                # [K, (T + block_q - 1) * Gp, H], rows token-major, G heads padded to Gp
    k_rows_ref,           # [P * S, K, H], the page arrays seen as rows of one key each
    v_rows_ref,           # [P * S, K, H]
    # outputs
    o_ref,                # [block_q * Gp, H], this block's rows for this program's KV head
    *,
    sm_scale: float,
    sliding_window: int | None,
    page_size: int,
    pages_per_chunk: int,
    group_padded: int,
):
    i, h = pl.program_id(0), pl.program_id(1)
    rows, H = o_ref.shape
    S, C, Gp = page_size, pages_per_chunk, group_padded
    L = C * S  # keys per chunk
    seq, first_pos = blocks_ref.seq[i], blocks_ref.first_pos[i]
    lo_page, hi_page = blocks_ref.lo_page[i], blocks_ref.hi_page[i]

    q = q_ref[h, pl.ds(blocks_ref.q_start[i] * Gp, rows), :]  # [R*Gp, H]
    # Rows past the block's tokens or past G within a token are computed and thrown away outside.
    row_pos = first_pos + lax.broadcasted_iota(jnp.int32, (rows,), 0) // Gp  # [R*Gp]
    key = lax.broadcasted_iota(jnp.int32, (L,), 0)  # [L]

    def body(c, carry):
        m_prev, l_prev, acc_prev = carry  # [R*Gp], [R*Gp], [R*Gp, H]
        col = lo_page + c * C + key // S  # [L] page-table column of each key
        # Clamped to the block's last page: never reads another sequence's page; the clamped
        # keys are masked through their unclamped positions.
        page = page_table_ref[seq, jnp.minimum(col, hi_page - 1)]  # [L]
        k = k_rows_ref[page * S + key % S, h, :]  # [L, H]
        v = v_rows_ref[page * S + key % S, h, :]  # [L, H]
        kv_pos = (lo_page + c * C) * S + key  # [L]
        mask = kv_pos[None, :] <= row_pos[:, None]  # [R*Gp, L]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > row_pos[:, None] - sliding_window
        s = plgpu.dot(q, k, trans_b=True) * sm_scale  # [R*Gp, L] float32
        s = jnp.where(mask, s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        # Rows with nothing visible yet (rows past the block's end, or a window that starts in a
        # later chunk) keep m = -inf: shift them by 0 to avoid inf - inf.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m_prev - m_safe)
        l_next = corr * l_prev + jnp.sum(p, axis=1)
        pv = plgpu.dot(p.astype(v.dtype), v)  # [R*Gp, H] float32
        return m_next, l_next, corr[:, None] * acc_prev + pv

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, H), jnp.float32))
    # Trip count from this block's own page range: empty blocks run no iteration at all.
    _, l, acc = lax.fori_loop(0, pl.cdiv(hi_page - lo_page, C), body, init)
    out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def ragged_paged_attention_gpu_blocks(q, k_pages, v_pages, page_table, blocks: QBlocks, *,
                                      sm_scale: float, sliding_window: int | None, block_q: int,
                                      interpret: bool) -> jax.Array:
    """Runs the kernel over a grid of (q blocks, KV heads) -> [M, block_q, N, H]."""
    T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    G = N // K
    Gp = pl.next_power_of_2(G)  # Triton's blocks are powers of two: pad the group with zero heads
    M = blocks.seq.shape[0]
    q_rows = jnp.pad(q.reshape(T, K, G, H), ((0, block_q - 1), (0, 0), (0, Gp - G), (0, 0)))
    q_rows = q_rows.transpose(1, 0, 2, 3).reshape(K, (T + block_q - 1) * Gp, H)  # [K, rows, H]
    pages_per_chunk = max(1, CHUNK_KEYS // S)
    kernel = functools.partial(ragged_paged_attention_gpu_kernel, sm_scale=sm_scale,
                               sliding_window=sliding_window, page_size=S,
                               pages_per_chunk=pages_per_chunk, group_padded=Gp)
    hbm = pl.BlockSpec(memory_space=pl.ANY)  # read by index inside the kernel
    out = pl.pallas_call(
        kernel,
        grid=(M, K),
        in_specs=[QBlocks(*(hbm for _ in blocks)), hbm, hbm, hbm, hbm],
        out_specs=pl.BlockSpec((None, None, block_q * Gp, H), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((M, K, block_q * Gp, H), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"ragged_paged_attention_gpu_{block_q=}_{pages_per_chunk=}",
    )(blocks, page_table, q_rows, k_pages.reshape(P * S, K, H), v_pages.reshape(P * S, K, H))
    out = out.reshape(M, K, block_q, Gp, H)[:, :, :, :G]  # [M, K, R, G, H]
    return out.transpose(0, 2, 1, 3, 4).reshape(M, block_q, N, H)  # [M, R, N, H]


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "interpret"))
def ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               interpret: bool = False) -> jax.Array:
    """Ragged paged attention (the contract of ragged_paged_attention_reference) for NVIDIA GPUs.

    Args:
      q: [T, N, H] queries of all scheduled tokens, sequence after sequence.
      k_pages, v_pages: [P, S, K, H] one layer's pages, bf16, fp16 or float32 (not packed).
      kv_lens: [B] int32 KV length of each sequence including this step's tokens.
      page_table: [B, W] int32 pages of each sequence.
      cu_q_lens: [B + 1] int32 token offsets of each sequence in q.
      num_seqs: [] int32 number of real sequences; later slots are padding.
      sm_scale: softmax scale; sliding_window: attend only to the last this-many positions.
      interpret: True runs the kernel as XLA ops (the only way on CPU).
    Returns:
      [T, N, H] in q's dtype; zeros for padding tokens.

    Two passes: single-token sequences (decodes) in blocks of DECODE_ROWS query rows, the
    longer ones in blocks of PREFILL_ROWS; each pass leaves zeros on the other's tokens.
    """
    validate_attention_args(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            sm_scale, sliding_window)
    _, N, H = q.shape
    _, S, K, _ = k_pages.shape
    if not jnp.issubdtype(k_pages.dtype, jnp.floating):
        raise ValueError(f"k_pages must be bf16, fp16 or float32 (packed bf16 is CPU-only), "
                         f"got {k_pages.dtype}")
    for name, size in (("head dim", H), ("page size", S)):
        if size & (size - 1):
            raise ValueError(f"{name} must be a power of two for the GPU kernel, got {size}")
    Gp = pl.next_power_of_2(N // K)
    out = jnp.zeros(q.shape, q.dtype)
    for rows, min_q_len, max_q_len in ((DECODE_ROWS, 1, 1), (PREFILL_ROWS, 2, None)):
        block_q = max(1, rows // Gp)
        blocks, token_rows = split_q_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens=q.shape[0],
                                            block_q=block_q, page_size=S, sliding_window=sliding_window,
                                            min_q_len=min_q_len, max_q_len=max_q_len)
        o = ragged_paged_attention_gpu_blocks(q, k_pages, v_pages, page_table, blocks, sm_scale=sm_scale,
                                              sliding_window=sliding_window, block_q=block_q,
                                              interpret=interpret)
        out = out + gather_token_outputs(o, token_rows).astype(q.dtype)
    return out
