"""Attention over 8-bit KV pages (int8, fp8 e4m3 / e5m2 with a float32 scale per token slot and KV
head): every implementation against the dense oracle on the same stored values, and against the
float32 oracle on the unquantized values within the error the quantization allows; the GPU
kernel lowers for CUDA with the 8-bit pages and their scales in the Triton call."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.kv_cache_dtype import QUANT_MAX, dequantize, quantize
from jaxserve.pallas_kernels import (ragged_paged_attention, ragged_paged_attention_gpu, ragged_paged_attention_jnp,
                                     ragged_paged_attention_reference)
from jaxserve.pallas_kernels.ragged_paged_attention_gpu import TRITON_CALL_TARGETS

SM_SCALE = 0.125
MIXED = dict(seqs=[(1, 9), (6, 14), (1, 4), (5, 5), (3, 23)], num_tokens=24, num_slots=8, num_pages=40,
             max_pages_per_seq=8)
EIGHT_BIT = {"int8": jnp.int8, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}
IMPLEMENTATIONS = {
    "jnp": ragged_paged_attention_jnp,
    "pallas": functools.partial(ragged_paged_attention, interpret=True),
    "gpu": functools.partial(ragged_paged_attention_gpu, interpret=True),
    "gpu_split": functools.partial(ragged_paged_attention_gpu, interpret=True, num_kv_splits=3),
}


def quantized(case, dtype):
    """(k values, v values, k scales, v scales) of the case's pages, NaN scales on unowned pages."""
    dtype = jnp.dtype(dtype)
    k, k_scales = quantize(case.k_pages, dtype, QUANT_MAX[dtype])
    v, v_scales = quantize(case.v_pages, dtype, QUANT_MAX[dtype])
    return k, v, k_scales, v_scales


def poisoned(case, scales):
    """NaN scales on every page no sequence owns: a kernel reading one poisons its output."""
    return jnp.where(jnp.asarray(~case.owned)[:, None, None], jnp.nan, scales)


def quantization_bound(case, k, v, k_scales, v_scales):
    """A per-token bound on |attention(dequantized) - attention(float32)| [T]. Scores move by at
    most d = sm_scale * max over keys |q . (k - k')|, so each probability by a factor in
    [exp(-2d), exp(2d)] and their L1 distance is at most exp(2d) - 1; the output, a convex
    combination of v rows, moves by at most max|v - v'| + (exp(2d) - 1) * max|v'| (taken over
    every page: a looser but still valid bound)."""
    dk = np.asarray(dequantize(k, k_scales) - case.k_pages)  # [P, S, K, H]
    dv = np.asarray(dequantize(v, v_scales) - case.v_pages)
    T, N, H = case.q.shape
    K = dk.shape[2]
    q = np.asarray(case.q).reshape(T, K, N // K, H)
    d = SM_SCALE * np.abs(np.einsum("TKGH,PSKH->TKGPS", q, dk)).max(axis=(1, 2, 3, 4))  # [T]
    v_max = np.abs(np.asarray(dequantize(v, v_scales))).max()
    return np.abs(dv).max() + np.expm1(2 * d) * v_max


# Each format once without and int8 also with a sliding window, in every implementation.
@pytest.mark.parametrize("dtype, window", [("int8", None), ("int8", 5), ("fp8_e4m3", 5), ("fp8_e5m2", None)])
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_attention_over_8bit_pages_matches_the_oracle(make_case, impl, dtype, window):
    check_against_the_oracles(make_case(**MIXED, num_heads=6, num_kv_heads=2, head_dim=64, seed=4), impl, dtype, window)


def test_jnp_attention_over_8bit_pages_of_one_kv_head(make_case):
    """Multi-query attention (Gemma 3): the jnp path reads one head's pages and scales as flat rows."""
    check_against_the_oracles(make_case(**MIXED, num_heads=4, num_kv_heads=1, head_dim=64, seed=6), "jnp", "int8", 5)


def check_against_the_oracles(case, impl, dtype, window):
    k, v, k_scales, v_scales = quantized(case, EIGHT_BIT[dtype])
    args = (case.q, k, v, *case.args[3:])
    # The same stored values: the scales folded into scores and probabilities (the kernels) or
    # into the dequantized pages (the oracle) differ only by float32 rounding.
    want = ragged_paged_attention_reference(*args, sm_scale=SM_SCALE, sliding_window=window,
                                            k_scales=k_scales, v_scales=v_scales)
    got = np.asarray(IMPLEMENTATIONS[impl](*args, sm_scale=SM_SCALE, sliding_window=window,
                                           k_scales=poisoned(case, k_scales), v_scales=poisoned(case, v_scales)))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)
    assert not got[int(case.cu_q_lens[-1]):].any(), "padding tokens must give zeros"
    # Against the unquantized float32 values: within what the quantization itself allows.
    exact = np.asarray(ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE, sliding_window=window))
    error = np.abs(got - exact).max(axis=(1, 2))  # [T]
    bound = quantization_bound(case, k, v, k_scales, v_scales)
    assert (error <= bound + 1e-5).all(), (error.max(), bound.max())
    assert error.max() > 0  # the pages really were quantized


def test_int8_error_is_what_its_step_allows(make_case):
    """Standard-normal K and V at head dim 64: an int8 step is max|x| / 127 (about 0.02), and the
    attention output stays within a few hundredths of float32's."""
    case = make_case(**MIXED, num_heads=6, num_kv_heads=2, head_dim=64, seed=5)
    k, v, k_scales, v_scales = quantized(case, jnp.int8)
    got = ragged_paged_attention_jnp(case.q, k, v, *case.args[3:], sm_scale=SM_SCALE, k_scales=k_scales,
                                     v_scales=v_scales)
    exact = ragged_paged_attention_reference(*case.args, sm_scale=SM_SCALE)
    assert float(jnp.abs(got - exact).max()) < 0.03


@pytest.mark.parametrize("problem, message", [
    (lambda k, v, ks, vs, c: (k, v, None, None), "int8 pages need k_scales and v_scales"),
    (lambda k, v, ks, vs, c: (k, v, ks, None), "k_scales and v_scales come together"),
    (lambda k, v, ks, vs, c: (k, v, ks[:, :2], vs[:, :2]), r"k_scales must be float32 of shape \(40, 4, 2\)"),
    (lambda k, v, ks, vs, c: (k, v, ks.astype(jnp.bfloat16), vs), "k_scales must be float32"),
    (lambda k, v, ks, vs, c: (c.k_pages, c.v_pages, ks, vs), "k_scales go with 8-bit pages only, not float32"),
])
def test_scale_arguments_are_checked_by_name(make_case, problem, message):
    case = make_case(**MIXED, seed=6)
    k, v, ks, vs = problem(*quantized(case, jnp.int8), case)
    for impl in (ragged_paged_attention_jnp, IMPLEMENTATIONS["gpu"]):
        with pytest.raises(ValueError, match=message):
            impl(case.q, k, v, *case.args[3:], sm_scale=SM_SCALE, k_scales=ks, v_scales=vs)


# ---------------------------------------------------------------------------------------------
# Lowering for CUDA, no device

@pytest.mark.parametrize("bucket", [(64, 64), (512, 64)], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype, element", [(jnp.int8, "i8"), (jnp.float8_e4m3fn, "f8E4M3FN"),
                                            (jnp.float8_e5m2, "f8E5M2")], ids=["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("shape", [(9, 3, 64), (32, 8, 128)], ids=["smollm2", "llama8b"])
def test_gpu_kernel_lowers_for_cuda_with_8bit_pages(shape, dtype, element, bucket):
    (N, K, H), (T, B) = shape, bucket
    P, S, W = 4096, 16, 64
    i32, f32 = jnp.int32, jnp.float32
    shapes = [((T, N, H), jnp.bfloat16), ((P, S, K, H), dtype), ((P, S, K, H), dtype), ((B,), i32), ((B, W), i32),
              ((B + 1,), i32), ((), i32), ((P, S, K), f32), ((P, S, K), f32)]

    def attend(q, k, v, kv_lens, page_table, cu_q_lens, num_seqs, k_scales, v_scales):
        return ragged_paged_attention_gpu(q, k, v, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=SM_SCALE,
                                          k_scales=k_scales, v_scales=v_scales, num_kv_splits=2)

    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CALL_TARGETS]
    text = jax.export.export(jax.jit(attend), platforms=["cuda"], disabled_checks=checks)(
        *[jax.ShapeDtypeStruct(s, d) for s, d in shapes]).mlir_module()
    assert sum(text.count(f"custom_call @{t}(") for t in TRITON_CALL_TARGETS) == 2  # decode and prefill
    # The 8-bit pages and their scales reach the kernel whole, as rows of keys: no dequantized copy.
    assert f"tensor<{P * S}x{K}x{H}x{element}>" in text
    assert f"tensor<{P * S}x{K}xf32>" in text
    assert f"tensor<{P}x{S}x{K}x{H}xbf16>" not in text
