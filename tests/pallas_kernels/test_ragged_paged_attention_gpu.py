"""The GPU (Pallas Triton) attention kernel lowers for CUDA at real model shapes without a GPU
(jax.export)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from jaxserve.pallas_kernels.ragged_paged_attention_gpu import ragged_paged_attention_gpu

SM_SCALE = 0.125
# jax <= 0.10.2 hands XLA the Triton IR under the first name; later versions compile it at
# lowering time and call the result under the second.
TRITON_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")

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
                    sliding_window=None) -> str:
    """Lowers the kernel for CUDA from shapes alone; returns the exported module's text."""
    T, N, K, H, B, S = num_tokens, num_heads, num_kv_heads, head_dim, num_slots, page_size
    i32 = jnp.int32
    shapes = [((T, N, H), dtype), ((NUM_PAGES, S, K, H), dtype), ((NUM_PAGES, S, K, H), dtype),
              ((B,), i32), ((B, PAGES_PER_SEQ), i32), ((B + 1,), i32), ((), i32)]
    fn = jax.jit(functools.partial(ragged_paged_attention_gpu, sm_scale=SM_SCALE,
                                   sliding_window=sliding_window))
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
