"""Ragged paged attention in plain jnp, tuned for XLA:CPU: a chunked online softmax over the pages
each q block owns. The CPU serving path (the "jnp" attention backend).

Its contract is the one reference.py states (shared with the Pallas kernels and the dense oracle).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxserve.pallas_kernels.ragged_batch import (QBlocks, cap_scores, gather_token_outputs, page_values,
                                                  split_q_blocks, validate_attention_args)


# q-block size of the prefill pass (measured on CPU: 8-32 are within noise of each other).
PREFILL_BLOCK_Q = 16
# Default bytes of K (and again of V) a group gathers per loop step. Keeping each step's copies
# small enough to stay in cache measured 1.3-1.7x faster for a B=64 decode than 8-page chunks.
CHUNK_BYTES = 3 << 19
# A decode of few sequences would otherwise take one huge chunk, mostly masked (measured B=2,
# kv 150: 1.2 ms with 61-page chunks, 0.3 ms with 8).
MAX_AUTO_PAGES = 8
# Keys a decode block (one token) reads per loop step. Measured on SmolLM2 (page size 16, kv 150),
# whole decode step: 32 keys is never slower than 16, 48, 64 or 128 at B = 2..64, in float32 and
# packed bf16, and up to 25% faster (B=32 bf16: 46 vs 62 ms; B=32 fp32: 58 vs 67 ms).
DECODE_CHUNK_KEYS = 32
# A step of at most this many tokens runs one pass of one-token blocks instead of two: its
# prefill chunks (rare at this size: short prompts, the tail of a chunked prompt) read their
# pages once per token, and each step graph compiles about 0.7 s faster (SmolLM2 on 2 vCPUs,
# 1.0 s against 1.7 s at T = 8), which is what a cold start spends most of its time on.
ONE_PASS_MAX_TOKENS = 16


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "pages_per_chunk", "block_q",
                                             "rows_per_group"))
def ragged_paged_attention_jnp(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                               *, sm_scale: float, sliding_window: int | None = None,
                               soft_cap: float | None = None, k_scales=None, v_scales=None,
                               pages_per_chunk: int | None = None, block_q: int | None = None,
                               rows_per_group: int = 256):
    """Flash-style attention over the pages each q block owns, pages_per_chunk pages at a time
    (None: DECODE_CHUNK_KEYS worth for blocks of one token, else as many as fit CHUNK_BYTES for
    the group, at least one).

    block_q=None runs two passes: single-token sequences (decodes) as blocks of one, so a decode
    neither pads its query nor runs a long prefill's trip count, then the longer ones in blocks
    of PREFILL_BLOCK_Q, which share each page gather and matmul; a step of at most
    ONE_PASS_MAX_TOKENS tokens runs the first pass alone, for every sequence. An int runs one pass.
    Blocks go through in groups of about rows_per_group query rows, and only groups holding
    real blocks run, so the static block bound (sized for the worst ragged batch) costs little.
    8-bit pages are gathered as they are stored (a quarter of float32's bytes) and their scales
    (k_scales, v_scales [P, S, K]) applied chunk by chunk.
    """
    validate_attention_args(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            sm_scale, sliding_window, soft_cap, k_scales, v_scales)
    attend = functools.partial(_attend_in_q_blocks, q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                               num_seqs, k_scales=k_scales, v_scales=v_scales, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                               pages_per_chunk=pages_per_chunk, rows_per_group=rows_per_group)
    if block_q is not None:
        return attend(block_q=block_q, min_q_len=1, max_q_len=None)
    if q.shape[0] <= ONE_PASS_MAX_TOKENS:
        return attend(block_q=1, min_q_len=1, max_q_len=None)
    decode = attend(block_q=1, min_q_len=1, max_q_len=1)
    prefill = attend(block_q=PREFILL_BLOCK_Q, min_q_len=2, max_q_len=None)
    return decode + prefill  # each pass leaves zeros on the other's tokens


def _attend_in_q_blocks(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, k_scales, v_scales,
                        sm_scale, sliding_window, soft_cap, pages_per_chunk, rows_per_group, block_q, min_q_len, max_q_len):
    """One pass over the sequences with q_len in [min_q_len, max_q_len]; zeros elsewhere."""
    T, N, H = q.shape
    _, S, _, _ = k_pages.shape
    R = block_q
    blocks, rows = split_q_blocks(cu_q_lens, kv_lens, num_seqs, num_tokens=T, block_q=R, page_size=S,
                                  sliding_window=sliding_window, min_q_len=min_q_len, max_q_len=max_q_len)
    M = blocks.seq.shape[0]
    Mg = max(1, min(M, rows_per_group // R))  # blocks per group
    num_groups = -(-M // Mg)
    # Pad to whole groups with empty blocks (num_rows = hi_page = 0: no pages, zero output).
    blocks = QBlocks(*(jnp.pad(x, (0, num_groups * Mg - M)) for x in blocks))
    # Real blocks come first, so the groups past them are skipped outright.
    real_groups = (jnp.sum(blocks.num_rows > 0) + Mg - 1) // Mg

    def group(g, out):
        blk = QBlocks(*(lax.dynamic_slice_in_dim(x, g * Mg, Mg) for x in blocks))
        o = _flash_over_pages(q, k_pages, v_pages, k_scales, v_scales, page_table, blk, block_q=R, sm_scale=sm_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap, pages_per_chunk=pages_per_chunk)
        return lax.dynamic_update_slice_in_dim(out, o, g * Mg, axis=0)

    out = lax.fori_loop(0, real_groups, group, jnp.zeros((num_groups * Mg, R, N, H), jnp.float32))
    return gather_token_outputs(out, rows).astype(q.dtype)


def _flash_over_pages(q, k_pages, v_pages, k_scales, v_scales, page_table, blocks: QBlocks, *, block_q, sm_scale,
                      sliding_window, soft_cap, pages_per_chunk):
    """Online softmax of Mg q blocks over their own pages, a chunk of pages per step -> [Mg, R, N, H].

    With 8-bit pages, q.k of the stored values times each key's k scale is q.(k * scale), and the
    probabilities times each key's v scale weigh the stored v values as the dequantized ones."""
    T, N, H = q.shape
    num_pages, S, K, _ = k_pages.shape
    _, W = page_table.shape
    Mg = blocks.seq.shape[0]
    if K == 1:
        # One KV head (MQA: Gemma 3): pages and scales read as flat rows. With their size-1 axis,
        # XLA:CPU laid 8-bit pages out with that axis outermost and copied the whole cache into
        # this loop (models.metadata.kv_page_shape). Several heads keep the measured path as it was.
        k_pages, v_pages = k_pages.reshape(num_pages, -1), v_pages.reshape(num_pages, -1)
        if k_scales is not None:
            k_scales, v_scales = k_scales.reshape(num_pages, -1), v_scales.reshape(num_pages, -1)
    if pages_per_chunk is None and block_q == 1:
        pages_per_chunk = max(1, DECODE_CHUNK_KEYS // S)
    elif pages_per_chunk is None:
        # Few blocks would make huge chunks whose masked tail costs more than the loop steps saved.
        pages_per_chunk = min(MAX_AUTO_PAGES, CHUNK_BYTES // (Mg * S * K * H * k_pages.dtype.itemsize))
    G, R, C = N // K, block_q, max(1, min(pages_per_chunk, W))

    row = jnp.arange(R, dtype=jnp.int32)
    tok = jnp.minimum(blocks.q_start[:, None] + row, T - 1)  # [Mg, R]
    # Head-major rows (r, g) and keys [Mg, K, H, L]: XLA:CPU runs these batched dots 4-8x faster
    # than with K between the token axes, which more than pays for the transposes.
    qb = q[tok].reshape(Mg, R, K, G, H).transpose(0, 2, 1, 3, 4).reshape(Mg, K, R * G, H)  # [Mg, K, R*G, H]
    pos = blocks.first_pos[:, None] + row  # [Mg, R]
    seq_pages = page_table[blocks.seq]  # [Mg, W]
    # Every block runs the trip count of the group's longest one; its extra chunks are masked.
    num_chunks = jnp.max((blocks.hi_page - blocks.lo_page + C - 1) // C)

    def chunk(c, carry):
        m_prev, l_prev, acc_prev = carry
        cols = blocks.lo_page[:, None] + c * C + jnp.arange(C, dtype=jnp.int32)  # [Mg, C]
        # Clamp to the block's own last page so only owned pages are read; columns past
        # hi_page are masked below through their unclamped KV indices.
        owned = jnp.clip(cols, 0, jnp.maximum(blocks.hi_page - 1, 0)[:, None])
        pages = jnp.take_along_axis(seq_pages, owned, axis=1)  # [Mg, C]
        # Packed (bf16-as-uint16) and 8-bit pages are gathered as stored and converted chunk by chunk.
        k = page_values(k_pages[pages], q.dtype).reshape(Mg, C * S, K, H).transpose(0, 2, 3, 1)  # [Mg, K, H, C*S]
        v = page_values(v_pages[pages], q.dtype).reshape(Mg, C * S, K, H).transpose(0, 2, 1, 3)  # [Mg, K, C*S, H]
        kv_idx = (cols[:, :, None] * S + jnp.arange(S, dtype=jnp.int32)).reshape(Mg, 1, C * S)
        mask = kv_idx <= pos[:, :, None]  # [Mg, R, C*S]
        if sliding_window is not None:
            mask &= kv_idx > pos[:, :, None] - sliding_window
        mask = jnp.repeat(mask, G, axis=1)[:, None]  # [Mg, 1, R*G, C*S]
        s = jnp.einsum("MKQH,MKHL->MKQL", qb, k, preferred_element_type=jnp.float32) * sm_scale
        if k_scales is not None:
            s = s * key_scales(k_scales, pages)
        s = jnp.where(mask, cap_scores(s, soft_cap), -jnp.inf)  # [Mg, K, R*G, C*S]
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        # Rows with nothing visible yet (rows past the block's end, or a window that starts in a
        # later chunk) keep m = -inf: shift them by 0 to avoid inf - inf.
        m_safe = jnp.where(jnp.isneginf(m_next), 0.0, m_next)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m_prev - m_safe)
        l_next = corr * l_prev + p.sum(axis=-1)
        weights = p if v_scales is None else p * key_scales(v_scales, pages)
        pv = jnp.einsum("MKQL,MKLH->MKQH", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_next, l_next, corr[..., None] * acc_prev + pv

    def key_scales(scales, pages):  # [P, S, K] at the chunk's pages -> [Mg, K, 1, C*S], the keys' axis last
        return scales[pages].reshape(Mg, C * S, K).transpose(0, 2, 1)[:, :, None, :]

    init = (jnp.full((Mg, K, R * G), -jnp.inf, jnp.float32), jnp.zeros((Mg, K, R * G), jnp.float32),
            jnp.zeros((Mg, K, R * G, H), jnp.float32))
    _, l, acc = lax.fori_loop(0, num_chunks, chunk, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return out.reshape(Mg, K, R, G, H).transpose(0, 2, 1, 3, 4).reshape(Mg, R, N, H)  # [Mg, R, N, H]
