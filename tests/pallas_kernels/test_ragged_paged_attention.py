"""The Pallas kernel (interpret mode on CPU) against the dense oracle, its argument checks, and
the backend switch."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels import (attention_backend, ragged_paged_attention, ragged_paged_attention_jnp,
                                     ragged_paged_attention_reference)

SM_SCALE = 0.125
MIXED = dict(seqs=[(1, 9), (6, 14), (1, 4), (5, 5), (3, 23)], num_tokens=24, num_slots=8, num_pages=40,
             max_pages_per_seq=8)
kernel = functools.partial(ragged_paged_attention, interpret=True)


def assert_kernel_matches_reference(case, **kw):
    tiling = {k: kw.pop(k) for k in ("block_q", "pages_per_block") if k in kw}
    want = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE, **kw)
    # NaN in every page no sequence owns: the kernel must never read one.
    got = np.asarray(kernel(*case.poisoned_args, sm_scale=SM_SCALE, **kw, **tiling))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)
    assert not got[int(case.cu_q_lens[-1]):].any(), "padding tokens must give zeros"


@pytest.mark.parametrize("window", [None, 5])
def test_kernel_matches_reference(make_case, scenario, window):
    case = make_case(**scenario, num_heads=6, num_kv_heads=2, head_dim=64)
    assert_kernel_matches_reference(case, sliding_window=window)


def test_kernel_soft_caps_scores(make_case):
    case = make_case(**MIXED, num_heads=6, num_kv_heads=2, head_dim=64, seed=3)
    assert_kernel_matches_reference(case, sliding_window=7, soft_cap=0.5)


# GQA ratios 1, 4, 8 and head dim 128 (ratio 3 with head dim 64 is the default above).
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 64), (8, 1, 64), (4, 4, 128)])
def test_kernel_gqa_and_head_dims(make_case, num_heads, num_kv_heads, head_dim):
    case = make_case(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, seed=1)
    assert_kernel_matches_reference(case)


# Per-token blocks, ragged block ends with one page per step, and one block covering a whole batch.
@pytest.mark.parametrize("block_q,pages_per_block", [(1, 2), (3, 1), (32, 8)])
def test_kernel_tiling_does_not_change_result(make_case, block_q, pages_per_block):
    case = make_case(**MIXED, seed=2)
    assert_kernel_matches_reference(case, sliding_window=5, block_q=block_q, pages_per_block=pages_per_block)


def test_pallas_backend_runs_the_kernel_on_cpu(make_case):
    case = make_case(**MIXED, seed=3)
    got = attention_backend("pallas")(*case.poisoned_args, sm_scale=SM_SCALE)
    want = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    assert attention_backend("jnp") is ragged_paged_attention_jnp
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        attention_backend("triton")


def test_backend_choice_follows_the_platform():
    from jaxserve.pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu

    assert attention_backend("auto") is attention_backend("auto", "cpu") is ragged_paged_attention_jnp
    assert attention_backend("auto", "gpu") is attention_backend("pallas", "cuda") is ragged_paged_attention_gpu
    assert attention_backend("jnp", "gpu") is ragged_paged_attention_jnp
    on_cpu, on_tpu = attention_backend("pallas", "cpu"), attention_backend("pallas", "tpu")
    assert on_cpu.func is on_tpu.func is ragged_paged_attention
    assert on_cpu.keywords == {"interpret": True} and on_tpu.keywords == {"interpret": False}


@pytest.mark.parametrize("argument,bad", [
    ("kv_lens", lambda c: c.kv_lens.astype(jnp.float32)),
    ("kv_lens", lambda c: c.kv_lens[:-1]),
    ("cu_q_lens", lambda c: c.cu_q_lens[:-1]),
    ("page_table", lambda c: c.page_table.astype(jnp.float32)),
    ("num_seqs", lambda c: c.num_seqs[None]),
    ("v_pages", lambda c: c.v_pages[:, :, :1]),
    ("head dim", lambda c: c.q[..., :32]),
    ("q heads", lambda c: c.q[:, :5]),
])
@pytest.mark.parametrize("fn", [kernel, ragged_paged_attention_jnp], ids=["kernel", "jnp"])
def test_bad_arguments_raise_value_error_naming_them(make_case, fn, argument, bad):
    case = make_case(seqs=[(1, 3), (2, 2)], num_heads=6, num_kv_heads=2, head_dim=64)
    names = ["q", "k_pages", "v_pages", "kv_lens", "page_table", "cu_q_lens", "num_seqs"]
    target = {"head dim": "q", "q heads": "q"}.get(argument, argument)
    args = [bad(case) if n == target else a for n, a in zip(names, case.args)]
    with pytest.raises(ValueError, match=argument):
        fn(*args, sm_scale=SM_SCALE)


@pytest.mark.parametrize("option", [dict(block_q=0), dict(pages_per_block=0), dict(sm_scale=0.0),
                                    dict(sliding_window=0)])
def test_bad_options_raise_value_error(make_case, option):
    case = make_case(seqs=[(1, 3), (2, 2)])
    with pytest.raises(ValueError, match=next(iter(option))):
        kernel(*case.args, **{"sm_scale": SM_SCALE, **option})
