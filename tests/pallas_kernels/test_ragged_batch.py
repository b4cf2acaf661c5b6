"""The q-block split against a plain-Python enumeration of the same ragged batch."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from jaxserve.pallas_kernels.ragged_batch import max_q_blocks, split_q_blocks

PAGE = 4


def python_blocks(q_lens, kv_lens, block_q, window, min_q_len, max_q_len):
    """[(seq, q_start, first_pos, num_rows, lo_page, hi_page)] and {token: (block, row)}."""
    blocks, where = [], {}
    start = 0
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        if min_q_len <= q_len <= (max_q_len or q_len):
            for j in range(0, q_len, block_q):
                rows = min(block_q, q_len - j)
                first = kv_len - q_len + j
                lo = 0 if window is None else max(0, first - window + 1) // PAGE
                for r in range(rows):
                    where[start + j + r] = (len(blocks), r)
                blocks.append((b, start + j, first, rows, lo, (first + rows - 1) // PAGE + 1))
        start += q_len
    return blocks, where


@pytest.mark.parametrize("block_q,window,min_q_len,max_q_len", [(1, None, 1, 1), (4, 5, 2, None), (3, None, 1, None)])
def test_split_matches_python_enumeration(block_q, window, min_q_len, max_q_len):
    rng = np.random.default_rng(0)
    num_tokens, num_slots = 32, 8
    split = jax.jit(functools.partial(split_q_blocks, num_tokens=num_tokens, block_q=block_q, page_size=PAGE,
                                      sliding_window=window, min_q_len=min_q_len, max_q_len=max_q_len))
    for _ in range(5):
        num_seqs = int(rng.integers(1, num_slots + 1))
        q_lens = rng.choice([0, 1, 1, 2, 5, 9], num_seqs)
        q_lens[-1] += max(0, 1 - q_lens.sum())  # at least one token
        while q_lens.sum() > num_tokens:
            q_lens[np.argmax(q_lens)] -= 1
        kv_lens = q_lens + rng.integers(0, 20, num_seqs)
        cu = np.zeros(num_slots + 1, np.int32)
        cu[1:num_seqs + 1] = np.cumsum(q_lens)
        cu[num_seqs + 1:] = cu[num_seqs]
        kv = np.zeros(num_slots, np.int32)
        kv[:num_seqs] = kv_lens
        blocks, rows = split(cu, kv, np.int32(num_seqs))

        want, where = python_blocks(q_lens, kv_lens, block_q, window, min_q_len, max_q_len)
        m = max_q_blocks(num_tokens, num_slots, block_q, min_q_len, max_q_len)
        assert len(want) <= m == blocks.seq.shape[0]
        got = np.stack([np.asarray(x) for x in blocks], axis=1)  # [M, 6]
        np.testing.assert_array_equal(got[:len(want)], np.array(want, np.int32).reshape(-1, 6))
        assert not got[len(want):].any(), "unused blocks must be all zeros"
        valid = np.asarray(rows.valid)
        assert sorted(np.flatnonzero(valid)) == sorted(where)
        for t, (blk, r) in where.items():
            assert rows.flat_row[t] == blk * block_q + r
