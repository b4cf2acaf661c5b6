"""How the attention implementations see a ragged batch: the argument checks of the attention
contract, and the split of each sequence's tokens into fixed-size query blocks ("q blocks").

Both the jnp path and the Pallas kernels work on q blocks: a block holds up to ``block_q``
consecutive tokens of one sequence, so a decode token is a block of one and a prefill chunk is a
few full blocks. Each block reads only the KV pages its tokens can attend to.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxserve.precision import PACKED

# The page dtypes that hold quantized values and come with per-(slot, KV head) scales
# (jaxserve/kv_cache_dtype.py). float8 pages are 8-bit floats, so issubdtype(floating) is True for
# them: the check below looks at this list first.
EIGHT_BIT_PAGES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


class QBlocks(NamedTuple):
    """The q blocks of one step, padded to a static count M (unused blocks have num_rows 0)."""

    seq: jax.Array        # [M] int32, sequence slot of the block
    q_start: jax.Array    # [M] int32, flat index (into q's T axis) of the block's first token
    first_pos: jax.Array  # [M] int32, position of the block's first token in its sequence
    num_rows: jax.Array   # [M] int32, real tokens in the block, 0..block_q
    lo_page: jax.Array    # [M] int32, first page-table column the block attends to
    hi_page: jax.Array    # [M] int32, one past the last column it attends to (0 when empty)


class TokenRows(NamedTuple):
    """Where each of the T tokens sits in the [M, block_q] block layout (to gather outputs back)."""

    flat_row: jax.Array  # [T] int32, block * block_q + row of the token
    valid: jax.Array     # [T] bool, False for padding tokens and tokens of sequences not split


def max_q_blocks(num_tokens: int, num_seq_slots: int, block_q: int, min_q_len: int = 1,
                 max_q_len: int | None = None) -> int:
    """Static bound M on the number of q blocks of the sequences whose q_len is in range."""
    # Each non-empty sequence wastes less than one block on its ragged end.
    nonempty = min(num_seq_slots, num_tokens // min_q_len)
    bound = (num_tokens + nonempty * (block_q - 1)) // block_q
    if max_q_len is not None:
        bound = min(bound, nonempty * -(-max_q_len // block_q))
    return max(1, bound)


def split_q_blocks(cu_q_lens, kv_lens, num_seqs, *, num_tokens: int, block_q: int, page_size: int,
                   sliding_window: int | None, min_q_len: int = 1,
                   max_q_len: int | None = None) -> tuple[QBlocks, TokenRows]:
    """Splits the tokens of the real sequences whose q_len is in [min_q_len, max_q_len] into
    blocks of block_q (static shapes, traced values); the other tokens come out not valid."""
    num_slots = kv_lens.shape[0]
    m = max_q_blocks(num_tokens, num_slots, block_q, min_q_len, max_q_len)
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]  # [B]
    # Slots past num_seqs are padding whatever cu_q_lens says there.
    picked = (slot < num_seqs) & (q_lens >= min_q_len)
    if max_q_len is not None:
        picked &= q_lens <= max_q_len
    q_lens = jnp.where(picked, q_lens, 0)
    blocks_per_seq = (q_lens + block_q - 1) // block_q  # [B]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks_per_seq, dtype=jnp.int32)])

    block = jnp.arange(m, dtype=jnp.int32)
    # side="right" skips empty sequences, whose cu_blocks entries repeat.
    seq = jnp.searchsorted(cu_blocks[1:], block, side="right", method="compare_all")
    seq = jnp.minimum(seq, num_slots - 1).astype(jnp.int32)
    j = block - cu_blocks[seq]  # index of the block within its sequence
    num_rows = jnp.where(block < cu_blocks[-1], jnp.clip(q_lens[seq] - j * block_q, 0, block_q), 0)
    used = num_rows > 0
    # Unused blocks get all-zero fields, so whatever they index stays in bounds.
    q_start = jnp.where(used, cu_q_lens[seq] + j * block_q, 0)
    first_pos = jnp.where(used, kv_lens[seq] - q_lens[seq] + j * block_q, 0)
    hi_page = jnp.where(used, (first_pos + num_rows - 1) // page_size + 1, 0)
    lo_kv = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    lo_page = jnp.minimum(lo_kv // page_size, hi_page)
    fields = (jnp.where(used, seq, 0), q_start, first_pos, num_rows, lo_page, hi_page)
    blocks = QBlocks(*(jnp.asarray(x, jnp.int32) for x in fields))

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    tseq = jnp.searchsorted(cu_q_lens[1:], token, side="right", method="compare_all")
    tseq = jnp.minimum(tseq, num_slots - 1).astype(jnp.int32)
    valid = (token < cu_q_lens[num_seqs]) & picked[tseq]
    r = token - cu_q_lens[tseq]  # index of the token within its sequence
    flat_row = (cu_blocks[tseq] + r // block_q) * block_q + r % block_q
    flat_row = jnp.where(valid, flat_row, 0).astype(jnp.int32)
    return blocks, TokenRows(flat_row, valid)


def gather_token_outputs(out_blocks, rows: TokenRows):
    """[M, block_q, N, H] block outputs -> [T, N, H] token outputs, zeros for tokens not valid."""
    m, block_q, n, h = out_blocks.shape
    out = out_blocks.reshape(m * block_q, n, h)[rows.flat_row]  # [T, N, H]
    return jnp.where(rows.valid[:, None, None], out, 0)


def validate_attention_args(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                            sm_scale, sliding_window, soft_cap=None, k_scales=None, v_scales=None) -> None:
    """Raises ValueError naming the argument that breaks the attention contract (trace time)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    _, n, h = q.shape
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [P, S, K, H], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
    _, _, k, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"k_pages head dim {hk} must equal q head dim {h}")
    if k == 0 or n % k:
        raise ValueError(f"q heads ({n}) must be a multiple of k_pages kv heads ({k})")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} must equal k_pages dtype {k_pages.dtype}")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales come together (8-bit pages) or not at all")
    if k_pages.dtype in EIGHT_BIT_PAGES:
        if k_scales is None:
            raise ValueError(f"{k_pages.dtype} pages need k_scales and v_scales [P, S, K] float32")
        for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
            if scales.shape != k_pages.shape[:3] or scales.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32 of shape {k_pages.shape[:3]} (the pages' [P, S, K]), "
                                 f"got {scales.dtype} {scales.shape}")
    elif not (jnp.issubdtype(k_pages.dtype, jnp.floating) or k_pages.dtype == PACKED):
        raise ValueError(f"k_pages must be floating point, bf16 packed as uint16, or 8-bit with scales "
                         f"(int8, float8_e4m3fn, float8_e5m2), got {k_pages.dtype}")
    elif k_scales is not None:
        raise ValueError(f"k_scales go with 8-bit pages only, not {k_pages.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be floating point, got {q.dtype}")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be [B, W], got shape {page_table.shape}")
    b = page_table.shape[0]
    for name, arr, shape in (("kv_lens", kv_lens, (b,)), ("page_table", page_table, page_table.shape),
                             ("cu_q_lens", cu_q_lens, (b + 1,)), ("num_seqs", num_seqs, ())):
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (B={b} from page_table), got {arr.shape}")
        if arr.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {arr.dtype}")
    if not sm_scale > 0:
        raise ValueError(f"sm_scale must be > 0, got {sm_scale}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be None or > 0, got {soft_cap}")


def page_values(pages: jax.Array, dtype) -> jax.Array:
    """Gathered pages as `dtype` operands of a dot: packed bf16 bits as bf16 (a 16-bit cache keeps its
    own precision), 8-bit values converted exactly (their scales are applied to the scores and
    probabilities instead, one multiply per key rather than per element), others as they are."""
    if pages.dtype == PACKED:
        return jax.lax.bitcast_convert_type(pages, jnp.bfloat16)
    return pages.astype(dtype) if pages.dtype in EIGHT_BIT_PAGES else pages


def cap_scores(s: jax.Array, soft_cap: float | None) -> jax.Array:
    """Gemma 2's logit soft-capping of scaled attention scores, soft_cap * tanh(s / soft_cap),
    applied before the mask; None leaves them as they are."""
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)
