"""Ragged paged attention for NVIDIA GPUs as a Pallas Triton kernel: kernel -> pallas_call wrapper
-> validated jitted API, with the contract of reference.ragged_paged_attention_reference.

Why Triton rather than Mosaic GPU: Pallas's Triton backend treats every ref as a pointer into HBM,
so the KV pages stay where they are and each program gathers only its own pages' rows with plain
indexed loads, on any grid and any GPU generation; its lowering runs without a GPU
(`jax.export(..., platforms=["cuda"])` checks it on CPU). Mosaic GPU stages BlockSpec blocks in
shared memory (the whole page arrays here: "kernel exceeds available shared memory"), so reading
pages by index there means hand-written TMA copies, which are Hopper-only. Triton's tensors need
power-of-two dims, so a query group of G heads is padded to the next power of two outside.

Split-K ("flash-decoding") for decodes: a decode program reads its sequence's pages alone, so a
step of a few long sequences would run only a few programs (K per sequence). When the page table
is long, the decode pass instead runs `num_kv_splits` programs per (sequence, KV head), each over
a contiguous share of the sequence's pages, and each writes a float32 partial softmax (running
max m, sum l, unnormalised acc) that `combine_kv_splits` merges with log-sum-exp rescaling.
Prefill blocks keep one program per (block, KV head): they have rows enough to fill the GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxserve.pallas_kernels.ragged_batch import (QBlocks, cap_scores, gather_token_outputs, page_values,
                                                  split_q_blocks, validate_attention_args)
from jaxserve.precision import PACKED

# The custom calls the kernel lowers to: jax 0.10's Triton call, and the FFI one of later versions.
# jax.export keeps them only when told (they carry no compatibility guarantee).
TRITON_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")

# Query rows ((token, head) pairs) of a decode program and of a prefill program. Triton's dot
# needs at least 16 rows; decodes are bound by reading KV, prefills by the matmuls.
DECODE_ROWS = 16
PREFILL_ROWS = 64
# Keys per inner-loop step (whole pages, so a page size above this reads one page a step).
CHUNK_KEYS = 64

# The split heuristic (default_num_kv_splits). Splitting costs extra programs, a float32 partial
# of DECODE_ROWS x H per program and a combine; it buys programs enough to fill the GPU. Below
# about 1024 keys of page table per split the fixed costs stop being small beside the split's
# KV reads (a 1024-key share reads 512 KiB of bf16 K and V per head at H = 128; its partial is
# 8 KiB). About 1024 decode programs are several per SM on the largest GPUs (132 SMs on
# H100/H200), enough to keep HBM busy; bounding the split grid by it also bounds a step's
# partials (about 8 MiB at H = 128). The cap leaves a 128k-key sequence 4096 keys a share.
# Untuned: no GPU has measured these numbers yet.
MIN_KEYS_PER_SPLIT = 1024
TARGET_DECODE_PROGRAMS = 1024
MAX_KV_SPLITS = 32


def default_num_kv_splits(max_kv_len: int, max_decode_programs: int) -> int:
    """Splits per decode from static shapes: the page table's reach and the decode grid's size.

    max_kv_len is W * S, the longest KV a sequence can have; max_decode_programs is
    min(T, B) * K, the decode grid without splits. Short page tables get no split, so
    short-context steps pay nothing. Large decode buckets get none either: the runner pads T to
    the next power of two, so a pure decode step fills more than half of its bucket, and a
    bucket of more than TARGET_DECODE_PROGRAMS / 2 programs needs no more. (A mixed step that
    pads few decodes into a large bucket is not split; its prefill dominates the step anyway.)
    """
    by_length = max_kv_len // MIN_KEYS_PER_SPLIT
    by_occupancy = TARGET_DECODE_PROGRAMS // max(1, max_decode_programs)
    return max(1, min(by_length, by_occupancy, MAX_KV_SPLITS))


def _query_tile(blocks_ref: QBlocks, q_ref, i, h, *, rows: int, group_padded: int):
    """The q rows of block i for KV head h ([R*Gp, H]) and the position of each row ([R*Gp])."""
    Gp = group_padded
    q = q_ref[h, pl.ds(blocks_ref.q_start[i] * Gp, rows), :]
    # Rows past the block's tokens or past G within a token are computed and thrown away outside.
    row_pos = blocks_ref.first_pos[i] + lax.broadcasted_iota(jnp.int32, (rows,), 0) // Gp
    return q, row_pos


def _attend_pages(q, row_pos, page_table_ref, k_rows_ref, v_rows_ref, k_scale_rows_ref, v_scale_rows_ref, *,
                  seq, kv_head, lo_page, hi_page, sm_scale: float, sliding_window: int | None,
                  soft_cap: float | None, page_size: int, pages_per_chunk: int):
    """Online softmax of q's rows over page-table columns [lo_page, hi_page) of sequence seq.

    8-bit pages (scale refs not None) load as stored, convert exactly to q's dtype, and their
    float32 scales multiply the float32 scores (k) and probabilities (v): one multiply per key,
    and no rounding of a dequantized value to bf16 before the dot.

    Returns float32 (m [R*Gp] running max, l [R*Gp] sum of exp, acc [R*Gp, H] unnormalised);
    an empty range, or one whose keys no row may see, gives the neutral (-inf, 0, 0).
    """
    rows, H = q.shape
    S, C = page_size, pages_per_chunk
    L = C * S  # keys per chunk
    key = lax.broadcasted_iota(jnp.int32, (L,), 0)  # [L]

    def body(c, carry):
        m_prev, l_prev, acc_prev = carry  # [R*Gp], [R*Gp], [R*Gp, H]
        col = lo_page + c * C + key // S  # [L] page-table column of each key
        # Clamped to the range's last page: never reads a page outside the range (so never
        # another sequence's); the clamped keys are masked by their unclamped column.
        page = page_table_ref[seq, jnp.minimum(col, hi_page - 1)]  # [L]
        row = page * S + key % S  # [L] the keys' rows
        k = page_values(k_rows_ref[row, kv_head, :], q.dtype)  # [L, H]
        v = page_values(v_rows_ref[row, kv_head, :], q.dtype)  # [L, H]
        kv_pos = (lo_page + c * C) * S + key  # [L]
        mask = (kv_pos[None, :] <= row_pos[:, None]) & (col < hi_page)[None, :]  # [R*Gp, L]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > row_pos[:, None] - sliding_window
        s = plgpu.dot(q, k, trans_b=True) * sm_scale  # [R*Gp, L] float32
        if k_scale_rows_ref is not None:
            s = s * k_scale_rows_ref[row, kv_head][None, :]
        s = jnp.where(mask, cap_scores(s, soft_cap), -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        # Rows with nothing visible yet (rows past the block's end, or a window that starts in a
        # later chunk) keep m = -inf: shift them by 0 to avoid inf - inf.
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m_prev - m_safe)
        l_next = corr * l_prev + jnp.sum(p, axis=1)
        if v_scale_rows_ref is not None:
            p = p * v_scale_rows_ref[row, kv_head][None, :]
        pv = plgpu.dot(p.astype(v.dtype), v)  # [R*Gp, H] float32
        return m_next, l_next, corr[:, None] * acc_prev + pv

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, H), jnp.float32))
    # Trip count from the range itself: empty ranges run no iteration at all.
    return lax.fori_loop(0, pl.cdiv(hi_page - lo_page, C), body, init)


def ragged_paged_attention_gpu_kernel(
    # inputs
    blocks_ref: QBlocks,  # each field [M] int32: the step's q blocks (see ragged_batch.QBlocks)
    page_table_ref,       # [B, W] int32
    q_ref,                # [K, (T + block_q - 1) * Gp, H], rows token-major, G heads padded to Gp
    k_rows_ref,           # [P * S, K, H], the page arrays seen as rows of one key each
    v_rows_ref,           # [P * S, K, H]
    *scale_and_out_refs,  # with 8-bit pages k_scale_rows_ref, v_scale_rows_ref [P * S, K] float32; then
                          # the output o_ref [block_q * Gp, H], this block's rows for this program's KV head
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    page_size: int,
    pages_per_chunk: int,
    group_padded: int,
):
    *scale_refs, o_ref = scale_and_out_refs
    i, h = pl.program_id(0), pl.program_id(1)
    q, row_pos = _query_tile(blocks_ref, q_ref, i, h, rows=o_ref.shape[0], group_padded=group_padded)
    _, l, acc = _attend_pages(q, row_pos, page_table_ref, k_rows_ref, v_rows_ref, *(scale_refs or (None, None)),
                              seq=blocks_ref.seq[i], kv_head=h, lo_page=blocks_ref.lo_page[i],
                              hi_page=blocks_ref.hi_page[i], sm_scale=sm_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap, page_size=page_size,
                              pages_per_chunk=pages_per_chunk)
    out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def ragged_paged_attention_gpu_split_kernel(
    # inputs: as ragged_paged_attention_gpu_kernel's, every block one decode token
    blocks_ref: QBlocks, page_table_ref, q_ref, k_rows_ref, v_rows_ref,
    # with 8-bit pages the scale rows as there; then the outputs, this program's partial softmax,
    # float32: m_ref [R * Gp] running max of the scores, l_ref [R * Gp] sum of exp(score - m),
    # acc_ref [R * Gp, H] sum of exp(score - m) * v
    *scale_and_out_refs,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    page_size: int,
    pages_per_chunk: int,
    group_padded: int,
    num_kv_splits: int,
):
    *scale_refs, m_ref, l_ref, acc_ref = scale_and_out_refs
    i, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    C = pages_per_chunk
    lo_page, hi_page = blocks_ref.lo_page[i], blocks_ref.hi_page[i]
    # Shares of whole chunks, so only a sequence's last share ends in a partial chunk; the last
    # shares of a short sequence are empty (lo = hi: no iteration, neutral partial).
    share = pl.cdiv(pl.cdiv(hi_page - lo_page, num_kv_splits), C) * C
    split_lo = jnp.minimum(lo_page + split * share, hi_page)
    split_hi = jnp.minimum(split_lo + share, hi_page)
    q, row_pos = _query_tile(blocks_ref, q_ref, i, h, rows=m_ref.shape[0], group_padded=group_padded)
    m, l, acc = _attend_pages(q, row_pos, page_table_ref, k_rows_ref, v_rows_ref, *(scale_refs or (None, None)),
                              seq=blocks_ref.seq[i], kv_head=h, lo_page=split_lo, hi_page=split_hi,
                              sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                              page_size=page_size,
                              pages_per_chunk=pages_per_chunk)
    m_ref[...] = m
    l_ref[...] = l
    acc_ref[...] = acc


def combine_kv_splits(m, l, acc) -> jax.Array:
    """Merges partial softmaxes over their split axis (the last of m and l): m, l [..., NS],
    acc [..., NS, H] -> [..., H] float32 attention output, zeros where no split saw a key.

    Plain jnp after the pallas_call rather than a second kernel: XLA fuses it into a pass over
    the partials, which are small beside the KV the splits read (DECODE_ROWS x H floats per
    program), and a kernel would add a launch and nothing else.
    """
    m_max = jnp.max(m, axis=-1, keepdims=True)
    # Neutral splits have m = -inf; where every split is neutral, shift by 0 to avoid inf - inf.
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weight = jnp.exp(m - m_max)  # [..., NS], 0 for neutral splits
    l_sum = jnp.sum(weight * l, axis=-1)  # [...]
    # A multiply and a sum that XLA fuses, not an einsum it could hand to a batched matmul.
    acc_sum = jnp.sum(weight[..., None] * acc, axis=-2)  # [..., H]
    return jnp.where(l_sum[..., None] > 0, acc_sum / jnp.where(l_sum > 0, l_sum, 1.0)[..., None], 0.0)


def _kernel_operands(q, k_pages, v_pages, k_scales, v_scales, block_q: int) -> list:
    """q as [K, (T + block_q - 1) * Gp, H] rows (token-major, group padded to Gp, and padded so
    the last block's tile stays in bounds), the page arrays as [P * S, K, H] rows of keys, and
    the scales of 8-bit pages (if any) as [P * S, K] rows."""
    T, N, H = q.shape
    P, S, K, _ = k_pages.shape
    G = N // K
    Gp = pl.next_power_of_2(G)  # Triton's blocks are powers of two: pad the group with zero heads
    q_rows = jnp.pad(q.reshape(T, K, G, H), ((0, block_q - 1), (0, 0), (0, Gp - G), (0, 0)))
    q_rows = q_rows.transpose(1, 0, 2, 3).reshape(K, (T + block_q - 1) * Gp, H)  # [K, rows, H]
    scales = [] if k_scales is None else [k_scales.reshape(P * S, K), v_scales.reshape(P * S, K)]
    return [q_rows, k_pages.reshape(P * S, K, H), v_pages.reshape(P * S, K, H), *scales]


def _kernel_params(q, k_pages, *, sm_scale, sliding_window, soft_cap) -> dict:
    """The static keyword arguments both kernels take."""
    _, N, _ = q.shape
    _, S, K, _ = k_pages.shape
    return dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, page_size=S,
                pages_per_chunk=max(1, CHUNK_KEYS // S), group_padded=pl.next_power_of_2(N // K))


def ragged_paged_attention_gpu_blocks(q, k_pages, v_pages, page_table, blocks: QBlocks, *,
                                      sm_scale: float, sliding_window: int | None,
                                      soft_cap: float | None, block_q: int, interpret: bool,
                                      k_scales=None, v_scales=None) -> jax.Array:
    """Runs the kernel over a grid of (q blocks, KV heads) -> [M, block_q, N, H]."""
    _, N, H = q.shape
    K = k_pages.shape[2]
    M = blocks.seq.shape[0]
    params = _kernel_params(q, k_pages, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    Gp, pages_per_chunk = params["group_padded"], params["pages_per_chunk"]
    hbm = pl.BlockSpec(memory_space=pl.ANY)  # read by index inside the kernel
    operands = _kernel_operands(q, k_pages, v_pages, k_scales, v_scales, block_q)
    out = pl.pallas_call(
        functools.partial(ragged_paged_attention_gpu_kernel, **params),
        grid=(M, K),
        in_specs=[QBlocks(*(hbm for _ in blocks)), hbm, *(hbm for _ in operands)],
        out_specs=pl.BlockSpec((None, None, block_q * Gp, H), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((M, K, block_q * Gp, H), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"ragged_paged_attention_gpu_{block_q=}_{pages_per_chunk=}",
    )(blocks, page_table, *operands)
    out = out.reshape(M, K, block_q, Gp, H)[:, :, :, :N // K]  # [M, K, R, G, H]
    return out.transpose(0, 2, 1, 3, 4).reshape(M, block_q, N, H)  # [M, R, N, H]


def ragged_paged_attention_gpu_split_decodes(q, k_pages, v_pages, page_table, blocks: QBlocks, *,
                                             sm_scale: float, sliding_window: int | None,
                                             soft_cap: float | None, tile_tokens: int, num_kv_splits: int,
                                             interpret: bool, k_scales=None, v_scales=None) -> jax.Array:
    """Runs the split kernel over (q blocks, KV heads, KV splits) and combines -> [M, 1, N, H].

    Every block is one decode token; a program's tile still has tile_tokens * Gp rows (the
    next tokens' queries, thrown away) because Triton's dot needs 16 rows or more.
    """
    _, N, H = q.shape
    K = k_pages.shape[2]
    G, M, NS = N // K, blocks.seq.shape[0], num_kv_splits
    params = _kernel_params(q, k_pages, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    Gp, pages_per_chunk = params["group_padded"], params["pages_per_chunk"]
    rows = tile_tokens * Gp
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    f32 = jnp.float32
    operands = _kernel_operands(q, k_pages, v_pages, k_scales, v_scales, tile_tokens)
    m, l, acc = pl.pallas_call(
        functools.partial(ragged_paged_attention_gpu_split_kernel, num_kv_splits=NS, **params),
        grid=(M, K, NS),
        in_specs=[QBlocks(*(hbm for _ in blocks)), hbm, *(hbm for _ in operands)],
        out_specs=[pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
                   pl.BlockSpec((None, None, None, rows, H), lambda i, h, s: (i, h, s, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((M, K, NS, rows), f32),
                   jax.ShapeDtypeStruct((M, K, NS, rows), f32),
                   jax.ShapeDtypeStruct((M, K, NS, rows, H), f32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=f"ragged_paged_attention_gpu_split_{num_kv_splits=}_{pages_per_chunk=}",
    )(blocks, page_table, *operands)
    # Only the block's own token's G heads (its tile's first G rows) are combined.
    m = m[..., :G].transpose(0, 1, 3, 2)  # [M, K, G, NS]
    l = l[..., :G].transpose(0, 1, 3, 2)  # [M, K, G, NS]
    acc = acc[..., :G, :].transpose(0, 1, 3, 2, 4)  # [M, K, G, NS, H]
    out = combine_kv_splits(m, l, acc)  # [M, K, G, H]
    return out.reshape(M, 1, N, H).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret",
                                             "num_kv_splits"))
def ragged_paged_attention_gpu(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, k_scales=None, v_scales=None, interpret: bool = False,
                               num_kv_splits: int | None = None) -> jax.Array:
    """Ragged paged attention (the contract of ragged_paged_attention_reference) for NVIDIA GPUs.

    Args:
      q: [T, N, H] queries of all scheduled tokens, sequence after sequence.
      k_pages, v_pages: [P, S, K, H] one layer's pages, bf16, fp16 or float32 (not packed), or 8-bit
        (int8, float8_e4m3fn, float8_e5m2) with their scales.
      kv_lens: [B] int32 KV length of each sequence including this step's tokens.
      page_table: [B, W] int32 pages of each sequence.
      cu_q_lens: [B + 1] int32 token offsets of each sequence in q.
      num_seqs: [] int32 number of real sequences; later slots are padding.
      sm_scale: softmax scale; sliding_window: attend only to the last this-many positions;
      soft_cap: scores become soft_cap * tanh(score / soft_cap) (Gemma 2), None: uncapped.
      k_scales, v_scales: [P, S, K] float32 scales of 8-bit pages; None otherwise.
      interpret: True runs the kernel as XLA ops (the only way on CPU).
      num_kv_splits: programs that share each decode's KV pages (1: no split); None picks it
        from the static shapes (default_num_kv_splits).
    Returns:
      [T, N, H] in q's dtype; zeros for padding tokens.

    Two passes: single-token sequences (decodes) in blocks of DECODE_ROWS query rows, split
    num_kv_splits ways, the longer ones in blocks of PREFILL_ROWS; each pass leaves zeros on the
    other's tokens.
    """
    validate_attention_args(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            sm_scale, sliding_window, soft_cap, k_scales, v_scales)
    T, N, H = q.shape
    _, S, K, _ = k_pages.shape
    B, W = page_table.shape
    if k_pages.dtype == PACKED:
        raise ValueError(f"k_pages must be bf16, fp16, float32 or 8-bit with scales (packed bf16 is CPU-only), "
                         f"got {k_pages.dtype}")
    for name, size in (("head dim", H), ("page size", S)):
        if size & (size - 1):
            raise ValueError(f"{name} must be a power of two for the GPU kernel, got {size}")
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(W * S, min(T, B) * K)
    if not (isinstance(num_kv_splits, int) and num_kv_splits >= 1):
        raise ValueError(f"num_kv_splits must be None or an int >= 1, got {num_kv_splits!r}")
    Gp = pl.next_power_of_2(N // K)
    out = jnp.zeros(q.shape, q.dtype)
    for rows, min_q_len, max_q_len in ((DECODE_ROWS, 1, 1), (PREFILL_ROWS, 2, None)):
        block_q = max(1, rows // Gp)
        split = max_q_len == 1 and num_kv_splits > 1
        # A split decode pass puts out one token per block (its tile's other rows are padding).
        blocks, token_rows = split_q_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens=T,
                                            block_q=1 if split else block_q, page_size=S,
                                            sliding_window=sliding_window, min_q_len=min_q_len,
                                            max_q_len=max_q_len)
        common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                      k_scales=k_scales, v_scales=v_scales)
        if split:
            o = ragged_paged_attention_gpu_split_decodes(q, k_pages, v_pages, page_table, blocks,
                                                         tile_tokens=block_q,
                                                         num_kv_splits=num_kv_splits, **common)
        else:
            o = ragged_paged_attention_gpu_blocks(q, k_pages, v_pages, page_table, blocks,
                                                  block_q=block_q, **common)
        out = out + gather_token_outputs(o, token_rows).astype(q.dtype)
    return out
