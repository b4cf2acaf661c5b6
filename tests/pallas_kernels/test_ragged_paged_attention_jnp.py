"""The tuned jnp path against the dense oracle, and the oracle against a numpy loop."""
from __future__ import annotations

import numpy as np
import pytest

from jaxserve.pallas_kernels import ragged_paged_attention_jnp, ragged_paged_attention_reference

SM_SCALE = 0.125

# Scenarios (decode, prefill, mixed, page boundaries, padding) come from conftest.SCENARIOS.
MIXED = dict(seqs=[(1, 9), (6, 14), (1, 4), (5, 5), (3, 23)], num_tokens=24, num_slots=8, num_pages=40,
             max_pages_per_seq=8)


def numpy_attention(case, sm_scale, sliding_window=None, soft_cap=None):
    """Token-by-token float64 attention over each sequence's KV, read in page-table order."""
    q, kp, vp = (np.asarray(x, np.float64) for x in (case.q, case.k_pages, case.v_pages))
    cu, kv_lens, pt = np.asarray(case.cu_q_lens), np.asarray(case.kv_lens), np.asarray(case.page_table)
    _, N, H = q.shape
    _, S, K, _ = kp.shape
    out = np.zeros_like(q)
    for b in range(int(case.num_seqs)):
        kv_len, q_len = kv_lens[b], cu[b + 1] - cu[b]
        pages = pt[b, :-(-kv_len // S)]
        k = kp[pages].reshape(-1, K, H)[:kv_len]  # [kv_len, K, H]
        v = vp[pages].reshape(-1, K, H)[:kv_len]
        for i in range(q_len):
            t, pos = cu[b] + i, kv_len - q_len + i
            lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
            for n in range(N):
                s = k[lo:pos + 1, n // (N // K)] @ q[t, n] * sm_scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                p = np.exp(s - s.max())
                out[t, n] = (p / p.sum()) @ v[lo:pos + 1, n // (N // K)]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_reference_matches_numpy_loop(make_case, scenario, window):
    case = make_case(**scenario, num_heads=6, num_kv_heads=2, head_dim=64)
    got = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE, sliding_window=window)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(case, SM_SCALE, window), atol=1e-5, rtol=0)


def test_soft_capping_in_the_reference_and_the_jnp_path(make_case):
    """Gemma 2's soft-capped scores: the oracle against the numpy loop, the jnp path against the
    oracle; a cap this low changes the output, so ignoring it would fail."""
    case = make_case(**MIXED, num_heads=6, num_kv_heads=2, head_dim=64, seed=3)
    capped = np.asarray(ragged_paged_attention_reference(*case.args, sm_scale=1.0, sliding_window=7, soft_cap=0.5))
    np.testing.assert_allclose(capped, numpy_attention(case, 1.0, 7, soft_cap=0.5), atol=1e-5, rtol=0)
    uncapped = np.asarray(ragged_paged_attention_reference(*case.args, sm_scale=1.0, sliding_window=7))
    assert np.abs(capped - uncapped).max() > 1e-2
    got = ragged_paged_attention_jnp(*case.poisoned_args, sm_scale=1.0, sliding_window=7, soft_cap=0.5)
    np.testing.assert_allclose(np.asarray(got), capped, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 5])
def test_jnp_path_matches_reference(make_case, scenario, window):
    case = make_case(**scenario, num_heads=6, num_kv_heads=2, head_dim=64)
    want = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE, sliding_window=window)
    # NaN in every page no sequence owns: the jnp path must never read one.
    got = np.asarray(ragged_paged_attention_jnp(*case.poisoned_args, sm_scale=SM_SCALE,
                                                sliding_window=window))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)
    assert not got[int(case.cu_q_lens[-1]):].any(), "padding tokens must give zeros"


# GQA ratios 1, 4, 8 and head dim 128 (ratio 3 with head dim 64 is the default above).
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 64), (8, 1, 64), (4, 4, 128)])
def test_jnp_path_gqa_and_head_dims(make_case, num_heads, num_kv_heads, head_dim):
    case = make_case(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, seed=1)
    want = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE)
    got = ragged_paged_attention_jnp(*case.poisoned_args, sm_scale=SM_SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


# Single-pass q blocks (1 = per token, 3 = ragged block ends), one-page chunks (many loop trips),
# and groups of a block or two (many groups, some holding unused blocks).
@pytest.mark.parametrize("block_q,pages_per_chunk,rows_per_group", [(1, 1, 256), (3, 2, 256), (None, 1, 2),
                                                                    (4, 3, 8)])
def test_jnp_path_tiling_does_not_change_result(make_case, block_q, pages_per_chunk, rows_per_group):
    case = make_case(**MIXED, seed=2)
    want = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE, sliding_window=5)
    got = ragged_paged_attention_jnp(*case.poisoned_args, sm_scale=SM_SCALE, sliding_window=5,
                                     block_q=block_q, pages_per_chunk=pages_per_chunk,
                                     rows_per_group=rows_per_group)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
