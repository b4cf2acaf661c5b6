"""The KV cache dtype (--kv-cache-dtype, jaxserve/kv_cache_dtype.py): quantizing and dequantizing,
what each mode stores and how many bytes a token takes, write_kv's 8-bit writes, and engines on
int8 and bf16 caches: greedy agreement with the model-dtype cache, more pages in the same memory,
nothing compiled after warm-up."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.kv_cache_dtype import QUANT_MAX, dequantize, kv_cache_dtype, quantize
from jaxserve.models.layers import write_kv
from jaxserve.models.metadata import kv_page_shape
from jaxserve.precision import PACKED, targeting
from testlib import PAGE_SIZE, VOCAB, compile_counter

COUNTER = compile_counter()
TINY_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, block_size=PAGE_SIZE)
# 16 prompts x 64 greedy tokens, the agreement measure.
NUM_PROMPTS, NUM_TOKENS = 16, 64
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)


def greedy_agreement(want: list[list[int]], got: list[list[int]]) -> float:
    """Share of generated tokens equal at the same position (a sequence that diverges early keeps
    counting its later, unforced, differences against it)."""
    return float(np.mean([np.mean(np.array(w) == np.array(g)) for w, g in zip(want, got)]))


# ---------------------------------------------------------------------------------------------
# Quantizing

@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2])
def test_dequantized_values_are_the_stored_ones_times_their_scale(dtype):
    dtype = jnp.dtype(dtype)
    x = jax.random.normal(jax.random.key(0), (64, 3, 64)) * jnp.array([0.01, 1.0, 300.0])[:, None]  # [T, K, H]
    x = x.at[5, 1].set(0.0)  # an all-zero head
    values, scales = quantize(x, dtype, QUANT_MAX[dtype])
    assert values.dtype == dtype and scales.shape == (64, 3) and scales.dtype == jnp.float32
    back = dequantize(values, scales)
    np.testing.assert_array_equal(back, values.astype(jnp.float32) * scales[..., None])
    # Every head uses the format's whole range (its absmax lands on the largest value)...
    magnitude = jnp.abs(values.astype(jnp.float32)).max(axis=-1)
    assert (magnitude[scales > 0] == QUANT_MAX[dtype]).all()
    assert float(scales[5, 1]) == 0.0 and not values[5, 1].astype(jnp.float32).any()
    # ...and is off by at most half a step: int8's step is the scale; an fp8 value's relative
    # step is 2^-3 (e4m3) or 2^-2 (e5m2) above the subnormals (scale * 2^-9 / 2^-16 steps below).
    error = jnp.abs(back - x)
    if dtype == jnp.int8:
        bound = scales[..., None] / 2 * (1 + 1e-6)
    else:
        mantissa = 3 if dtype == jnp.float8_e4m3fn else 2
        subnormal = 2.0 ** (-9 if dtype == jnp.float8_e4m3fn else -16)
        bound = jnp.maximum(jnp.abs(x) * 2.0 ** -(mantissa + 1), scales[..., None] * subnormal / 2) * (1 + 1e-6)
    assert (error <= bound).all()


def test_each_mode_says_what_it_stores_and_its_bytes_per_token():
    L, K, H = 30, 3, 64  # SmolLM2
    f32 = kv_cache_dtype("auto", jnp.float32)
    assert (f32.name, f32.storage_dtype, f32.scaled) == ("float32", jnp.float32, False)
    assert f32.bytes_per_token(L, K, H) == 2 * L * K * H * 4
    # bf16 pages with float32 weights: stored packed on CPU (precision.py), 2 bytes a value.
    bf16 = kv_cache_dtype("bfloat16", jnp.float32)
    assert bf16.storage_dtype == PACKED and bf16.bytes_per_token(L, K, H) == 2 * L * K * H * 2
    assert kv_cache_dtype("auto", jnp.bfloat16) == bf16
    int8 = kv_cache_dtype("int8", jnp.bfloat16)
    assert int8.storage_dtype == jnp.int8 and int8.scaled
    assert int8.bytes_per_token(L, K, H) == 2 * L * K * (H + 4)  # a float32 scale per head
    cache = int8.zeros((L, 5, PAGE_SIZE, K, H))
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.v_scale.shape == (L, 5, PAGE_SIZE, K)
    assert kv_cache_dtype("auto", jnp.float32).zeros((1, 2, 4, K, H)).k_scale is None
    with pytest.raises(ValueError, match="kv_cache_dtype fp8_e4m3 runs on accelerators only"):
        kv_cache_dtype("fp8", jnp.float32)
    with targeting("cuda"):
        assert kv_cache_dtype("fp8", jnp.bfloat16).storage_dtype == jnp.float8_e4m3fn
        assert kv_cache_dtype("fp8_e5m2", jnp.bfloat16).storage_dtype == jnp.float8_e5m2
        assert kv_cache_dtype("bfloat16", jnp.float32).storage_dtype == jnp.bfloat16  # not packed there
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of .*, got 'q8_0'"):
        kv_cache_dtype("q8_0", jnp.float32)


@pytest.mark.parametrize("K", [2, 1], ids=["two_kv_heads", "one_kv_head"])
def test_write_kv_stores_8bit_values_and_scales_in_the_layers_slots(K):
    L, P, S, H = 2, 4, PAGE_SIZE, 16
    cache = kv_cache_dtype("int8", jnp.float32).zeros(kv_page_shape(L, P, S, K, H))
    # One KV head: pages [L, P, S, H] and scales [L, P, S], no K axis (kv_page_shape).
    assert cache.k.ndim == (4 if K == 1 else 5) and cache.k_scale.shape == cache.k.shape[:-1]
    k = jax.random.normal(jax.random.key(1), (3, K, H))
    v = jax.random.normal(jax.random.key(2), (3, K, H)) * 5
    slots = jnp.array([5, 6, 13], jnp.int32)  # page 1 slots 1-2, page 3 slot 1
    out = write_kv(cache, jnp.int32(1), slots, k, v)
    assert out.k.shape == cache.k.shape and out.k_scale.shape == cache.k_scale.shape
    for pages, scales, x in ((out.k, out.k_scale, k), (out.v, out.v_scale, v)):
        want_values, want_scales = quantize(x, jnp.int8, QUANT_MAX[jnp.dtype(jnp.int8)])
        flat, flat_scales = pages[1].reshape(P * S, K, H), scales[1].reshape(P * S, K)
        np.testing.assert_array_equal(flat[slots], want_values)
        np.testing.assert_array_equal(flat_scales[slots], want_scales)
        np.testing.assert_allclose(dequantize(flat[slots], flat_scales[slots]), x, atol=float(want_scales.max()))
        # Nothing else written: the other layer, and the other slots of this one.
        assert not pages[0].any() and not scales[0].any()
        assert int((flat != 0).any(axis=(1, 2)).sum()) == 3


# ---------------------------------------------------------------------------------------------
# Engines

@pytest.fixture(scope="module")
def tiny_folder(tiny_checkpoint):
    return tiny_checkpoint("llama")[0]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, VOCAB, size=int(rng.integers(4, 20))).tolist() for _ in range(NUM_PROMPTS)]


def generate(llm, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def teacher_forced(llm, prompts, continuations) -> list[list[int]]:
    """Each position's top token given the prompt and the continuation's tokens before it (through
    prompt_logprobs): greedy decoding's choices with the same prefix at every step."""
    outs = llm.generate([p + c for p, c in zip(prompts, continuations)],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    return [[max(lp.items(), key=lambda item: item[1].logprob)[0] for lp in o.prompt_logprobs[len(p):]]
            for p, o in zip(prompts, outs)]


@pytest.fixture(scope="module")
def auto_llm(tiny_folder):
    return LLM(tiny_folder, **TINY_ARGS)


@pytest.fixture(scope="module")
def auto_tokens(auto_llm, prompts):
    return generate(auto_llm, prompts)


@pytest.fixture(scope="module")
def int8_llm(tiny_folder):
    return LLM(tiny_folder, kv_cache_dtype="int8", **TINY_ARGS)


# The tiny random model (weights N(0, 0.3^2): near one-hot attention) is chaotic: a perturbation
# of any size sends a free-running sequence elsewhere, so its free-running agreement measures the
# chaos more than the cache (measured: bf16 KV 0.68, int8 0.37). Teacher-forced agreement measures
# each step's choice. SmolLM2's figures, both ways: benchmarks/README.md (KV cache dtype).
@pytest.mark.parametrize("kv", ["int8", "bfloat16"])
def test_kv_dtype_greedy_agrees_with_the_float32_cache(tiny_folder, kv, int8_llm, auto_llm, auto_tokens, prompts):
    llm = int8_llm if kv == "int8" else LLM(tiny_folder, dtype="float32", kv_cache_dtype=kv, **TINY_ARGS)
    cache = llm.engine.runner.kv_cache
    if kv == "int8":
        assert cache.k.dtype == cache.v.dtype == jnp.int8
        assert cache.k_scale.shape == cache.k.shape[:4] and cache.k_scale.dtype == jnp.float32
    else:  # bf16 pages with float32 weights, stored as bf16 bits (precision.py)
        assert cache.k.dtype == PACKED and cache.k_scale is None
        assert jax.tree_util.tree_leaves(llm.engine.runner.params)[0].dtype == jnp.float32
    free = generate(llm, prompts)
    assert [len(t) for t in free] == [NUM_TOKENS] * NUM_PROMPTS
    assert teacher_forced(auto_llm, prompts, auto_tokens) == auto_tokens  # the measure, on the float32 run itself
    forced = greedy_agreement(auto_tokens, teacher_forced(llm, prompts, auto_tokens))
    print(f"tiny llama, {kv} KV vs float32 KV over {NUM_PROMPTS} x {NUM_TOKENS}: greedy agreement teacher-forced "
          f"{forced:.3f}, free-running {greedy_agreement(auto_tokens, free):.3f}")
    assert forced >= 0.9


def test_8bit_pages_hold_more_tokens_in_the_same_memory(tiny_folder, int8_llm):
    budget = dict(TINY_ARGS, kv_cache_memory=1 << 20)
    pages = {kv: LLM(tiny_folder, kv_cache_dtype=kv, warmup=False, **budget).engine.pool.num_pages
             for kv in ("auto", "bfloat16", "int8")}
    # Head dim 16 (tiny): float32 64 bytes a head, bf16 32, int8 16 + a 4-byte scale.
    assert pages["auto"] == (1 << 20) // (2 * 2 * PAGE_SIZE * 2 * 64) + 1
    assert pages["bfloat16"] == (1 << 20) // (2 * 2 * PAGE_SIZE * 2 * 32) + 1
    assert pages["int8"] == (1 << 20) // (2 * 2 * PAGE_SIZE * 2 * 20) + 1


def test_int8_kv_serving_compiles_nothing_after_warmup(int8_llm):
    runner = int8_llm.engine.runner
    # Warm-up built every graph (earlier tests here may have added the prompt_logprobs variant).
    assert runner.num_compiled_warmup == len(runner.warmup_keys)
    compiled_before = runner.num_compiled
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, size=int(rng.integers(3, 40))).tolist() for _ in range(24)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), max_tokens=int(rng.integers(1, 9)),
                             seed=int(rng.integers(1 << 20)), ignore_eos=True) for _ in range(24)]
    before = COUNTER.count
    int8_llm.generate(prompts, params, use_tqdm=False)
    assert COUNTER.count == before, "serving with an int8 KV cache compiled a new graph"
    assert runner.num_compiled == compiled_before
    assert len({r.bucket for r in int8_llm.engine.step_log}) > 2  # several buckets really ran
