"""Every warm-up graph of an engine lowers for CUDA with the GPU attention kernel inside, on this
CPU-only machine (jax.export runs the whole Pallas -> Triton lowering without a device)."""
from __future__ import annotations

import jax
import pytest

from jaxserve.models import load_model
from jaxserve.pallas_kernels.ragged_paged_attention_gpu import TRITON_CALL_TARGETS, ragged_paged_attention_gpu
from jaxserve.runner import ModelRunner

# jax.export refuses custom calls without a compatibility guarantee unless told: these modules
# are checked, not kept.
CHECKS = [jax.export.DisabledSafetyCheck.custom_call(call) for call in TRITON_CALL_TARGETS]


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])  # plain, sliding window, head_dim != D / N
def test_every_warmup_graph_lowers_for_cuda(tiny_checkpoint, kind):
    folder, _ = tiny_checkpoint(kind)
    # float32: on this CPU the runner stores bf16 packed as uint16 (precision.py), a CPU-only form;
    # the kernel's own tests lower it for bf16 and fp16 pages.
    loaded = load_model(folder, "float32")
    runner = ModelRunner(loaded.model, loaded.params, num_pages=4096, block_size=16, max_model_len=256,
                         max_num_seqs=16, max_num_batched_tokens=64, attention_fn=ragged_paged_attention_gpu)
    kinds = set()
    for key in runner.warmup_keys:
        args = runner._example_args(key)
        static = ((),) if key.kind == "sampler" else ()  # the sampler's pluggable samplers: none
        exported = jax.export.export(runner._jitted[key.kind], platforms=["cuda"], disabled_checks=CHECKS)(
            *args, *static)
        assert exported.platforms == ("cuda",)
        has_kernel = any(call in exported.mlir_module() for call in TRITON_CALL_TARGETS)
        assert has_kernel == (key.kind == "forward"), key
        kinds.add(key.kind)
    assert kinds == {"forward", "penalties", "sampler"}
