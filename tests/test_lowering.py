"""`jaxserve lower`: every warm-up graph of an engine lowers for CUDA on this CPU-only machine
(jax.export runs the whole Pallas -> Triton lowering without a device), with the GPU attention
kernel in each forward graph and nowhere else, in the target's dtypes, sharded per model shard
under tensor parallelism; a graph that fails makes the command exit 1."""
from __future__ import annotations

import jax
import pytest

from jaxserve import cli
from jaxserve.engine_args import EngineArgs
from jaxserve.lowering import DEFAULT_NUM_PAGES, lower_step_graphs
from jaxserve.runner import ModelRunner

# Plain, sliding window, q/k/v bias, head_dim != D / N, alternating layers with soft-capping, a
# period of local and global layers, fused checkpoints with longrope and partial rotary, experts
# (a grouped matmul: ragged_dot on GPUs) with and without a shared one.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe"]
SMALL = dict(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=256)


def lowered(model, platform="cuda", **engine_args):
    plan, graphs = lower_step_graphs(EngineArgs(model=model, **{**SMALL, **engine_args}), platform)
    return plan, list(graphs)


def assert_kernel_in_forward_graphs_only(graphs):
    kinds = set()
    for graph in graphs:
        assert graph.error is None, graph.describe()
        assert (graph.kernel_calls > 0) == (graph.key.kind == "forward"), graph.describe()
        kinds.add(graph.key.kind)
    assert kinds == {"forward", "penalties", "sampler", "masked_sampler"}


@pytest.mark.parametrize("dtype", ["auto", "float16"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_lowers_for_cuda(tiny_checkpoint, kind, dtype):
    plan, graphs = lowered(tiny_checkpoint(kind)[0], dtype=dtype)
    assert plan.attention == "ragged_paged_attention_gpu"  # auto on a GPU: the kernel
    assert plan.dtype == ("bfloat16" if dtype == "auto" else "float16")  # auto on a GPU: bf16
    assert plan.num_pages == DEFAULT_NUM_PAGES and len(graphs) == plan.num_graphs
    assert_kernel_in_forward_graphs_only(graphs)
    forward = next(g for g in graphs if g.key.kind == "forward")
    # The target's storage: real bf16 / fp16 pages and weights, not CPU's packed uint16 form.
    element = "bf16" if dtype == "auto" else "f16"
    assert f"x{element}>" in forward.module and "xui16>" not in forward.module
    assert ("ragged_dot" in forward.module) == (kind in ("mixtral", "qwen2_moe"))


def test_lowering_for_cpu_keeps_the_cpu_forms(tiny_checkpoint):
    plan, graphs = lowered(tiny_checkpoint("llama")[0], platform="cpu", dtype="bfloat16")
    assert plan.attention == "ragged_paged_attention_jnp"  # auto on a CPU: the jnp path
    forward = next(g for g in graphs if g.key.kind == "forward")
    assert "xui16>" in forward.module and forward.kernel_calls == 0  # packed bf16 (precision.py)


# 8-bit KV pages with their float32 scales [L, P, S, K] (tiny llama: 2 layers, 2 KV heads of 16);
# under tensor parallelism the scales split over KV heads with their pages, into the shard_map.
@pytest.mark.parametrize("kv_cache_dtype, element, tp", [("int8", "i8", 1), ("fp8", "f8E4M3FN", 1),
                                                         ("fp8_e5m2", "f8E5M2", 1), ("int8", "i8", 2)])
def test_8bit_kv_cache_lowers_for_cuda(tiny_checkpoint, kv_cache_dtype, element, tp):
    plan, graphs = lowered(tiny_checkpoint("llama")[0], kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tp,
                           max_num_seqs=8, max_num_batched_tokens=16)
    assert plan.kv_cache_dtype == {"fp8": "fp8_e4m3"}.get(kv_cache_dtype, kv_cache_dtype)
    assert_kernel_in_forward_graphs_only(graphs)
    forward = next(g for g in graphs if g.key.kind == "forward")
    P = DEFAULT_NUM_PAGES
    assert f"tensor<2x{P}x16x2x16x{element}>" in forward.module  # the pages, stored 8-bit
    assert f"tensor<2x{P}x16x2xf32>" in forward.module  # their scales
    assert ("sdy.manual_computation" in forward.module) == (tp > 1)


def test_tensor_parallel_attention_runs_per_shard():
    # SmolLM2: 9 heads, 3 KV heads over 3 shards (conftest forces 4 host devices).
    _, graphs = lowered(None, tensor_parallel_size=3, max_num_seqs=8, max_num_batched_tokens=16)
    assert_kernel_in_forward_graphs_only(graphs)
    for graph in graphs:
        # The kernel sits in a shard_map region: left to the SPMD partitioner, its custom call
        # would gather every head of the cache onto each device.
        assert ("sdy.manual_computation" in graph.module) == (graph.key.kind == "forward"), graph.describe()


def test_cli_lowers_the_bundled_model_and_prints_every_graph(capsys):
    assert cli.main(["lower", "--platform", "cuda", "--num-pages", "8192", "--dtype", "auto"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "for cuda: dtype bfloat16, attention ragged_paged_attention_gpu, 8192 KV pages" in lines[0]
    graphs = [line for line in lines if line.startswith(("ok ", "FAIL "))]
    # serve's defaults: 9 token buckets, 4 batch sizes x (penalties, sampler, masked sampler)
    assert len(graphs) == 21 and all(line.startswith("ok ") for line in graphs)
    assert lines[-1].startswith("all 21 graphs lowered for cuda")


def test_cli_exits_1_naming_the_graph_that_fails(monkeypatch, capsys, tiny_checkpoint):
    real_export = ModelRunner.export

    def export(self, key, platforms=None):
        if key.kind == "sampler" and key.shape == 16:
            raise RuntimeError("Mosaic: kernel exceeds available shared memory\nmore detail")
        return real_export(self, key, platforms)

    monkeypatch.setattr(ModelRunner, "export", export)
    assert cli.main(["lower", tiny_checkpoint("llama")[0], "--max-num-seqs", "16",
                     "--max-num-batched-tokens", "16"]) == 1
    lines = capsys.readouterr().out.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and "sampler" in failed[0] and "B=16" in failed[0]
    assert failed[0].endswith("RuntimeError: Mosaic: kernel exceeds available shared memory")
    assert sum(line.startswith("ok ") for line in lines) == 9  # the others still lower
    assert lines[-1].startswith("1 of 10 graphs failed for cuda")


def test_cli_refuses_an_unknown_platform(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["lower", "--platform", "metal"])
    assert exit.value.code == 2 and "invalid choice: 'metal'" in capsys.readouterr().err


def test_lowering_leaves_the_default_platform_alone(tiny_checkpoint):
    from jaxserve.precision import packs_bfloat16, target_platform

    lowered(tiny_checkpoint("llama")[0], max_num_seqs=8, max_num_batched_tokens=8)
    assert target_platform() == jax.default_backend() == "cpu" and packs_bfloat16()


def test_int8_weights_lower_for_cuda_as_int8_dots(tiny_checkpoint):
    plan, graphs = lowered(tiny_checkpoint("llama")[0], quantization="int8")
    assert_kernel_in_forward_graphs_only(graphs)
    forward = next(g for g in graphs if g.key.kind == "forward")
    # The projections stay int8 on the device: int8 operands, int32 products.
    assert "xi8>" in forward.module and "xi32>" in forward.module


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_speculative_graphs_lower_for_cuda(tiny_checkpoint, proposer):
    folder = tiny_checkpoint("llama")[0]
    spec = (dict(speculative_model="[ngram]", ngram_prompt_lookup_max=3) if proposer == "ngram"
            else dict(speculative_model=tiny_checkpoint("mistral")[0]))  # a draft of another family, same vocabulary
    plan, graphs = lowered(folder, num_speculative_tokens=3, **spec)
    kinds = {}
    for graph in graphs:
        assert graph.error is None, graph.describe()
        kinds.setdefault(graph.key.kind, []).append(graph)
    expected = {"forward", "penalties", "sampler", "masked_sampler", "spec_forward", "verify"}
    assert set(kinds) == expected | ({"draft_mirror", "draft_propose"} if proposer == "draft_model" else set())
    assert plan.num_graphs == len(graphs)
    # The draft model attends with the GPU kernel too: in its mirror and inside its propose loop.
    for kind in ("spec_forward", "draft_mirror", "draft_propose"):
        assert all(g.kernel_calls > 0 for g in kinds.get(kind, [])), kind
