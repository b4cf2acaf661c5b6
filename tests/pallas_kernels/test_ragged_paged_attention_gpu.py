"""The GPU (Pallas Triton) attention kernel: it lowers for CUDA at real model shapes without a GPU
(jax.export), and in interpret mode it matches the dense oracle, never reading unowned pages,
with and without decodes split over several programs (split-K)."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.pallas_kernels.ragged_paged_attention_gpu import (TRITON_CALL_TARGETS, combine_kv_splits,
                                                                default_num_kv_splits,
                                                                ragged_paged_attention_gpu)
from jaxserve.pallas_kernels.reference import ragged_paged_attention_reference

SM_SCALE = 0.125
# jax <= 0.10.2 hands XLA the Triton IR under the first name; later versions compile it at
# lowering time and call the result under the second.
MIXED = dict(seqs=[(1, 9), (6, 14), (1, 4), (5, 5), (3, 23)], num_tokens=24, num_slots=8, num_pages=40,
             max_pages_per_seq=8)

# ---------------------------------------------------------------------------------------------
# Lowering for CUDA, no device

# (num_heads, num_kv_heads, head_dim) of the families served, and the odd group sizes among them.
MODEL_SHAPES = {
    "smollm2": (9, 3, 64),      # G = 3
    "llama8b": (32, 8, 128),    # G = 4
    "group7": (28, 4, 128),     # G = 7
    "head_dim256": (8, 4, 256),  # G = 2
}
# (tokens, sequence slots) of a decode bucket and of a prefill bucket.
BUCKETS = {"decode": (64, 64), "prefill": (512, 64)}
NUM_PAGES, PAGES_PER_SEQ = 4096, 64


def export_for_cuda(num_heads, num_kv_heads, head_dim, *, num_tokens, num_slots, page_size, dtype,
                    sliding_window=None, soft_cap=None, pages_per_seq=PAGES_PER_SEQ,
                    num_kv_splits=None) -> str:
    """Lowers the kernel for CUDA from shapes alone; returns the exported module's text."""
    T, N, K, H = num_tokens, num_heads, num_kv_heads, head_dim
    B, S, W = num_slots, page_size, pages_per_seq
    i32 = jnp.int32
    shapes = [((T, N, H), dtype), ((NUM_PAGES, S, K, H), dtype), ((NUM_PAGES, S, K, H), dtype),
              ((B,), i32), ((B, W), i32), ((B + 1,), i32), ((), i32)]
    fn = jax.jit(functools.partial(ragged_paged_attention_gpu, sm_scale=SM_SCALE,
                                   sliding_window=sliding_window, soft_cap=soft_cap,
                                   num_kv_splits=num_kv_splits))
    # The Triton call has no serialization guarantee; the test only reads the module.
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CALL_TARGETS]
    exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(
        *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
    return exported.mlir_module()


def assert_pages_reach_the_triton_call(text, *, num_kv_heads, head_dim, page_size, dtype):
    calls = sum(text.count(f"custom_call @{t}(") for t in TRITON_CALL_TARGETS)
    assert calls == 2, f"expected the decode and the prefill Triton calls, found {calls}"
    # The whole cache goes to the kernel as one operand (rows of keys), not a per-step gather.
    dt = {jnp.bfloat16: "bf16", jnp.float16: "f16"}[dtype]
    assert f"tensor<{NUM_PAGES * page_size}x{num_kv_heads}x{head_dim}x{dt}>" in text


@pytest.mark.parametrize("bucket", list(BUCKETS))
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_lowers_for_cuda_bf16(model, page_size, bucket):
    N, K, H = MODEL_SHAPES[model]
    T, B = BUCKETS[bucket]
    text = export_for_cuda(N, K, H, num_tokens=T, num_slots=B, page_size=page_size, dtype=jnp.bfloat16)
    assert_pages_reach_the_triton_call(text, num_kv_heads=K, head_dim=H, page_size=page_size,
                                       dtype=jnp.bfloat16)


@pytest.mark.parametrize("bucket", list(BUCKETS))
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_lowers_for_cuda_fp16(model, bucket):
    N, K, H = MODEL_SHAPES[model]
    T, B = BUCKETS[bucket]
    text = export_for_cuda(N, K, H, num_tokens=T, num_slots=B, page_size=16, dtype=jnp.float16)
    assert_pages_reach_the_triton_call(text, num_kv_heads=K, head_dim=H, page_size=16, dtype=jnp.float16)


def test_lowers_for_cuda_with_sliding_window_and_page_size_64():
    text = export_for_cuda(32, 8, 128, num_tokens=512, num_slots=64, page_size=64, dtype=jnp.bfloat16,
                           sliding_window=4096)
    assert_pages_reach_the_triton_call(text, num_kv_heads=8, head_dim=128, page_size=64, dtype=jnp.bfloat16)


def test_lowers_for_cuda_at_gemma2s_shapes_with_soft_capping():
    """Gemma 2 (2B): 8 heads over 4 KV heads of 256, a 4096-token window, scores soft-capped at 50;
    the decode bucket splits its pages."""
    for bucket, splits in (("decode", 4), ("prefill", None)):
        T, B = BUCKETS[bucket]
        text = export_for_cuda(8, 4, 256, num_tokens=T, num_slots=B, page_size=16, dtype=jnp.bfloat16,
                               sliding_window=4096, soft_cap=50.0, num_kv_splits=splits)
        assert_pages_reach_the_triton_call(text, num_kv_heads=4, head_dim=256, page_size=16, dtype=jnp.bfloat16)
        assert "tanh" in text


def lowered_kv_splits(text) -> int:
    """The split count of the decode kernel in a lowered module (1: the unsplit kernel)."""
    # The kernel's name, in the call's attributes and its source locations ("=" may become "_").
    found = set(re.findall(r"ragged_paged_attention_gpu_split_num_kv_splits[_=](\d+)", text))
    assert len(found) <= 1, found
    return int(found.pop()) if found else 1


# A long-context decode bucket at Llama-3.1-8B's heads: 256 decodes over a 2048-page (32k-key)
# page table, split 8 ways (the heuristic would not split a bucket this full: 2048 programs).
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_split_decodes_lower_for_cuda(dtype):
    text = export_for_cuda(32, 8, 128, num_tokens=256, num_slots=256, page_size=16, dtype=dtype,
                           pages_per_seq=2048, num_kv_splits=8)
    assert_pages_reach_the_triton_call(text, num_kv_heads=8, head_dim=128, page_size=16, dtype=dtype)
    assert lowered_kv_splits(text) == 8


# (tokens, slots, page-table width) at Llama-3.1-8B's heads and page size 16 -> default splits.
@pytest.mark.parametrize("num_tokens,num_slots,pages_per_seq,splits", [
    (2, 8, 512, 8),       # one stream at 8k keys: 16 programs unsplit, 8 splits of 1024 keys
    (2, 8, 8192, 32),     # one stream at 128k keys: capped at MAX_KV_SPLITS
    (2, 8, 64, 1),        # a 1024-key page table: short context pays nothing
    (64, 64, 512, 2),     # 512 programs unsplit: two splits reach the target of 1024
    (256, 256, 2048, 1),  # a full decode bucket already runs 2048 programs
])
def test_default_kv_splits_from_static_shapes(num_tokens, num_slots, pages_per_seq, splits):
    assert default_num_kv_splits(pages_per_seq * 16, min(num_tokens, num_slots) * 8) == splits
    text = export_for_cuda(32, 8, 128, num_tokens=num_tokens, num_slots=num_slots, page_size=16,
                           dtype=jnp.bfloat16, pages_per_seq=pages_per_seq)
    assert_pages_reach_the_triton_call(text, num_kv_heads=8, head_dim=128, page_size=16,
                                       dtype=jnp.bfloat16)
    assert lowered_kv_splits(text) == splits


# ---------------------------------------------------------------------------------------------
# Interpret-mode numerics against the dense oracle

kernel = functools.partial(ragged_paged_attention_gpu, sm_scale=SM_SCALE, interpret=True)


def assert_kernel_matches_reference(case, *, atol=1e-5, dtype=jnp.float32, num_kv_splits=None, **kw):
    args = [a.astype(dtype) if i < 3 else a for i, a in enumerate(case.args)]
    poisoned = [a.astype(dtype) if i < 3 else a for i, a in enumerate(case.poisoned_args)]
    want = np.asarray(ragged_paged_attention_reference(*args, sm_scale=SM_SCALE, **kw), np.float32)
    # NaN in every page no sequence owns: the kernel must never read one.
    got = kernel(*poisoned, num_kv_splits=num_kv_splits, **kw)
    assert got.dtype == dtype
    got = np.asarray(got, np.float32)
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    assert not got[int(case.cu_q_lens[-1]):].any(), "padding tokens must give zeros"


@pytest.mark.parametrize("window", [None, 5])
def test_kernel_matches_reference(make_case, scenario, window):
    case = make_case(**scenario, num_heads=6, num_kv_heads=2, head_dim=64)  # G = 3
    assert_kernel_matches_reference(case, sliding_window=window)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (8, 2), (14, 2)],
                         ids=["G1", "G3", "G4", "G7"])
def test_kernel_query_group_sizes(make_case, num_heads, num_kv_heads):
    case = make_case(**MIXED, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=64, seed=1)
    assert_kernel_matches_reference(case, sliding_window=7)


# Several pages per chunk (16), and one page per chunk with the window inside it (64).
@pytest.mark.parametrize("page_size", [16, 64])
def test_kernel_page_sizes_head_dim_128(make_case, page_size):
    seqs = [(1, 70), (33, 100), (1, 1), (20, 20)]
    case = make_case(seqs=seqs, num_tokens=64, num_slots=8, page_size=page_size, max_pages_per_seq=8,
                     num_heads=7, num_kv_heads=1, head_dim=128, seed=2)
    assert_kernel_matches_reference(case, sliding_window=40)


def test_kernel_bf16_accumulates_in_float32(make_case):
    case = make_case(**MIXED, num_heads=6, num_kv_heads=2, head_dim=64, seed=3)
    # bf16 rounding of p and of the output only; a bf16 accumulation would be far off.
    assert_kernel_matches_reference(case, dtype=jnp.bfloat16, atol=3e-2)


@pytest.mark.parametrize("change,message", [
    (dict(page_size=6), "page size"),
    (dict(packed=True), "packed"),
    (dict(num_kv_splits=0), "num_kv_splits"),
])
def test_rejects_what_the_gpu_kernel_cannot_run(make_case, change, message):
    case = make_case(seqs=[(1, 3), (2, 2)], page_size=change.get("page_size", 4))
    q, k, v, *rest = case.args
    if change.get("packed"):
        k, v = (jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16) for x in (k, v))
    with pytest.raises(ValueError, match=message):
        kernel(q, k, v, *rest, num_kv_splits=change.get("num_kv_splits"))


def test_kernel_rows_whose_window_starts_in_a_later_chunk(make_case):
    # G = 1: a prefill block holds 64 tokens, more than a chunk's keys, so with a narrow window
    # its late rows see nothing in the first chunk and must carry an empty softmax through it.
    case = make_case(seqs=[(100, 130), (1, 50)], num_tokens=104, num_slots=4, page_size=16,
                     max_pages_per_seq=9, num_heads=2, num_kv_heads=2, head_dim=64, seed=4)
    assert_kernel_matches_reference(case, sliding_window=3)


# ---------------------------------------------------------------------------------------------
# Split-K decodes in interpret mode

# Decodes of 300 to 1000 keys at page size 16 (4 pages a chunk, so shares of whole chunks):
# 7 splits give the 300-key sequence (19 pages) shares of 4 pages and leave its last two empty,
# and the one-page sequence reads in its first split only. Two padding tokens, two padded slots.
LONG_DECODES = dict(seqs=[(1, 1000), (1, 300), (1, 517), (1, 16)], num_tokens=6, num_slots=6,
                    page_size=16, max_pages_per_seq=64)


@pytest.mark.parametrize("num_kv_splits", [1, 2, 4, 7])
def test_split_decodes_match_reference(make_case, num_kv_splits):
    case = make_case(**LONG_DECODES, num_heads=4, num_kv_heads=2, head_dim=64, seed=5)  # G = 2
    assert_kernel_matches_reference(case, num_kv_splits=num_kv_splits)


# The splits share the window's pages, not the sequence's: 100 keys (7 or 8 pages) fill the
# first two of 4 shares and leave the others empty; 5 keys (one or two pages) reach the first
# share only; 610 keys reach all four of the 1000-key sequence's. Each window starts mid-page.
@pytest.mark.parametrize("window", [5, 100, 610])
def test_split_decodes_with_sliding_window(make_case, window):
    case = make_case(**LONG_DECODES, num_heads=6, num_kv_heads=2, head_dim=64, seed=6)  # G = 3
    assert_kernel_matches_reference(case, sliding_window=window, num_kv_splits=4)


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_kernel_soft_caps_scores(make_case, num_kv_splits):
    case = make_case(**LONG_DECODES, num_heads=6, num_kv_heads=2, head_dim=64, seed=10)
    assert_kernel_matches_reference(case, sliding_window=100, soft_cap=0.5, num_kv_splits=num_kv_splits)


def test_split_decodes_beside_prefills(make_case):
    # Prefill chunks (both continuing a cached prefix) keep the unsplit kernel beside split decodes.
    seqs = [(1, 700), (20, 40), (1, 350), (33, 300), (1, 64)]
    case = make_case(seqs=seqs, num_tokens=64, num_slots=8, page_size=16, max_pages_per_seq=64,
                     num_heads=8, num_kv_heads=2, head_dim=64, seed=7)  # G = 4
    assert_kernel_matches_reference(case, sliding_window=None, num_kv_splits=3)


def test_split_decodes_bf16(make_case):
    # G = 1: a tile of 16 tokens of which the first is the decode's.
    case = make_case(**LONG_DECODES, num_heads=2, num_kv_heads=2, head_dim=64, seed=8)
    assert_kernel_matches_reference(case, dtype=jnp.bfloat16, atol=3e-2, num_kv_splits=4)


def test_combine_kv_splits_rescales_partials_and_ignores_neutral_ones():
    rng = np.random.default_rng(9)
    splits, keys, H = 4, 8, 16
    # Score offsets far apart, so that a partial merged without rescaling by its max is far off.
    s = rng.standard_normal((2, splits, keys)) + np.array([0.0, 30.0, -20.0, 0.0])[:, None]
    v = rng.standard_normal((splits, keys, H))
    m = s.max(axis=-1)  # [2, NS]
    p = np.exp(s - m[..., None])
    l, acc = p.sum(axis=-1), np.einsum("rsk,skh->rsh", p, v)
    # Split 3 of row 0 saw no key; row 1 saw none at all.
    m[0, 3], l[0, 3], acc[0, 3] = -np.inf, 0.0, 0.0
    m[1], l[1], acc[1] = -np.inf, 0.0, 0.0
    got = np.asarray(combine_kv_splits(*(jnp.asarray(x, jnp.float32) for x in (m, l, acc))))
    w = np.exp(s[0, :3].reshape(-1) - s[0, :3].max())
    want = w @ v[:3].reshape(-1, H) / w.sum()
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-6)
    assert not got[1].any(), "a row no split saw must give zeros, not NaN"
