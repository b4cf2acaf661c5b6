"""Sharding on a mesh of forced host devices (tests/conftest.py asks XLA for 4): tensor parallel
2 and 4 on a tiny model (jnp attention and the Pallas kernel; 2 with an int8 KV cache too) and 3 on
SmolLM2 give the one-device greedy tokens, with the parameter and
KV cache shardings asserted; data parallel 2 serves requests on both replicas with the same outputs;
sizes that cannot split the model are refused with the numbers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from jaxserve import LLM, SamplingParams
from jaxserve.parallel import ParallelConfig, build_mesh, check_divisible
from testlib import PAGE_SIZE, SMOLLM2_ENGINE_ARGS

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 host devices (tests/conftest.py)")

GREEDY = SamplingParams(temperature=0, max_tokens=12)
TINY_ARGS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=PAGE_SIZE)
TINY_PROMPTS = [[5, 17, 33, 8, 9, 100], [7, 7, 250, 3], [300, 12, 45, 46, 47, 48, 49, 50, 51]]


def tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def spec(array) -> P:
    return array.sharding.spec


@pytest.fixture(scope="module")
def tiny_folder(tiny_checkpoint):
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def tiny_one_device(tiny_folder):
    llm = LLM(tiny_folder, **TINY_ARGS)
    return tokens(llm, TINY_PROMPTS)


# Attention runs per model shard (parallel.shard_attention): the jnp path, and the Pallas kernel
# (interpreted here) that the SPMD partitioner could not split by itself.
@pytest.mark.parametrize("tp,attention", [(2, "jnp"), (4, "jnp"), (2, "pallas"), (4, "pallas")])
def test_tensor_parallel_tiny_matches_one_device(tiny_folder, tiny_one_device, tp, attention):
    llm = LLM(tiny_folder, tensor_parallel_size=tp, attention_backend=attention, **TINY_ARGS)
    runner = llm.engine.runner
    layers = runner.params["layers"]
    assert spec(layers["attn"]["q_proj"]) == P(None, None, "model", None)   # [L, D, N, H] by heads
    assert spec(layers["attn"]["o_proj"]) == P(None, "model", None, None)   # [L, N, H, D] by rows
    assert spec(layers["mlp"]["gate_proj"]) == P(None, None, "model")       # [L, D, F] by columns
    assert spec(layers["mlp"]["down_proj"]) == P(None, "model", None)       # [L, F, D] by rows
    assert spec(runner.params["embed"]) == P("model", None)                 # [V, D] by vocabulary
    assert spec(layers["attn_norm"]["scale"]) == P()
    if tp == 2:  # 2 KV heads over 2 shards: one each
        assert spec(layers["attn"]["k_proj"]) == P(None, None, "model", None)
        assert spec(runner.kv_cache.k) == P(None, None, None, "model", None)
    else:  # 2 KV heads, 4 shards: every shard keeps both
        assert spec(layers["attn"]["k_proj"]) == P()
        assert spec(runner.kv_cache.k) == P()
    assert len(runner.kv_cache.k.sharding.device_set) == tp
    assert tokens(llm, TINY_PROMPTS) == tiny_one_device


def test_tensor_parallel_2_with_int8_kv_matches_one_device(tiny_folder):
    """int8 pages and their scales split over the KV heads alike; each shard attends its own."""
    want = tokens(LLM(tiny_folder, kv_cache_dtype="int8", **TINY_ARGS), TINY_PROMPTS)
    llm = LLM(tiny_folder, tensor_parallel_size=2, kv_cache_dtype="int8", **TINY_ARGS)
    cache = llm.engine.runner.kv_cache
    assert cache.k.dtype == cache.v.dtype == jnp.int8
    assert spec(cache.k) == spec(cache.v) == P(None, None, None, "model", None)
    assert spec(cache.k_scale) == spec(cache.v_scale) == P(None, None, None, "model")  # [L, P, S, K]
    assert cache.k_scale.addressable_shards[0].data.shape[3] == 1  # 2 KV heads, one per shard
    assert tokens(llm, TINY_PROMPTS) == want


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_tensor_parallel_2_on_experts_matches_one_device(tiny_checkpoint, kind):
    """Each expert's hidden units split over the shards (a shared expert's too), the router whole."""
    folder = tiny_checkpoint(kind)[0]
    want = tokens(LLM(folder, **TINY_ARGS), TINY_PROMPTS)
    llm = LLM(folder, tensor_parallel_size=2, **TINY_ARGS)
    mlp = llm.engine.runner.params["layers"]["mlp"]
    assert spec(mlp["experts_gate"]) == P(None, None, None, "model")  # [L, E, D, F] by columns
    assert spec(mlp["experts_down"]) == P(None, None, "model", None)  # [L, E, F, D] by rows
    assert spec(mlp["router"]) == P()
    if kind == "qwen2_moe":
        assert spec(mlp["shared_expert"]["gate_proj"]) == P(None, None, "model")
    assert tokens(llm, TINY_PROMPTS) == want


def test_tensor_parallel_2_with_int8_weights_matches_one_device(tiny_folder):
    """int8 values split as the float weights do; their per-output-channel scales along the same
    output axis, and whole where the weight splits the axes it contracts (o, down)."""
    args = dict(quantization="int8", **TINY_ARGS)
    want = tokens(LLM(tiny_folder, **args), TINY_PROMPTS)
    llm = LLM(tiny_folder, tensor_parallel_size=2, **args)
    layers = llm.engine.runner.params["layers"]
    q_proj, o_proj, down = layers["attn"]["q_proj"], layers["attn"]["o_proj"], layers["mlp"]["down_proj"]
    assert q_proj.q.dtype == jnp.int8
    assert spec(q_proj.q) == P(None, None, "model", None) and spec(q_proj.scale) == P(None, "model", None)
    assert spec(o_proj.q) == P(None, "model", None, None) and spec(o_proj.scale) == P()
    assert spec(layers["mlp"]["up_proj"].scale) == P(None, "model") and spec(down.scale) == P()
    assert tokens(llm, TINY_PROMPTS) == want


def test_tensor_parallel_3_on_smollm2_matches_one_device(smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("What is the capital of France?", "Name three colours.")]
    prompts = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    want = tokens(smollm2_llm, prompts)
    llm = LLM(tensor_parallel_size=3, **SMOLLM2_ENGINE_ARGS)  # 9 heads, 3 KV heads: 3 + 1 per shard
    layers = llm.engine.runner.params["layers"]
    assert spec(layers["attn"]["q_proj"]) == P(None, None, "model", None)
    assert layers["attn"]["q_proj"].addressable_shards[0].data.shape[2] == 3
    assert spec(llm.engine.runner.kv_cache.v) == P(None, None, None, "model", None)
    assert tokens(llm, prompts) == want


def test_data_parallel_2_serves_on_both_replicas(tiny_folder, tiny_one_device):
    llm = LLM(tiny_folder, data_parallel_size=2, **TINY_ARGS)
    replicas = llm.engine.replicas
    assert len(replicas) == 2
    devices = [r.runner.kv_cache.k.sharding.device_set for r in replicas]
    assert devices[0].isdisjoint(devices[1])
    assert tokens(llm, TINY_PROMPTS) == tiny_one_device
    # Both replicas did work: each ran steps for at least one of the requests.
    assert all(r.stats.generation_tokens > 0 for r in replicas)
    assert llm.stats().generation_tokens == sum(len(t) for t in tiny_one_device)


def test_sizes_that_cannot_split_the_model_are_refused(smollm2_llm):
    config = smollm2_llm.loaded.config  # 9 heads, 3 KV heads, intermediate 1536, vocab 49152
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 does not divide .*attention heads \(9\).*KV heads \(3"):
        check_divisible(config, 2)
    with pytest.raises(ValueError, match=r"attention heads \(9\)"):
        check_divisible(config, 4)
    check_divisible(config, 3)
    with pytest.raises(ValueError, match=r"needs 8 devices, but only 4"):
        build_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_tensor_parallel_2_with_a_draft_model_matches_one_device(tiny_folder):
    """The draft model's weights and cache split as the target's; drafting for itself, it still
    has every draft accepted, so its mirrored cache is whole across the shards."""
    want = tokens(LLM(tiny_folder, **TINY_ARGS), TINY_PROMPTS)
    llm = LLM(tiny_folder, tensor_parallel_size=2, speculative_model=tiny_folder, num_speculative_tokens=3,
              **TINY_ARGS)
    draft = llm.engine.speculator.runner
    assert spec(draft.kv_cache.k) == P(None, None, None, "model", None)
    assert spec(draft.params["layers"]["attn"]["q_proj"]) == P(None, None, "model", None)
    assert tokens(llm, TINY_PROMPTS) == want
    s = llm.stats()
    assert s.spec_decode_num_draft_tokens > 0 and s.spec_decode_num_accepted_tokens == s.spec_decode_num_draft_tokens
