"""Pluggable samplers: a sampler written in the test picks exactly the tokens numpy predicts, in
the same batch as default-sampled requests whose tokens do not change; registering one after
warm-up compiles only the buckets then used, and default-only steps never compile."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from test_sampler import ref_penalised
from testlib import compile_counter
from jaxserve import LLM, SamplingParams, sampling
from jaxserve.sampling.core import SamplingRow, build_sampling_tensors, sample
from jaxserve.runner import sampler_key


def second_best(logits, params, state, keys):
    """Always the second most likely token (of the penalised logits)."""
    ids = lax.top_k(logits, 2)[1]  # [B, 2]; gathered, not sliced: a slice makes XLA:CPU sort the row
    return jnp.take_along_axis(ids, jnp.ones_like(ids[:, :1]), -1)[:, 0]


def counting_sampler(logits, params, state, keys):
    """Greedy, counting its own tokens in state[:, 0]: shows state round-trips through the engine."""
    return jnp.argmax(logits, -1), state.at[:, 0].add(1.0)


@pytest.fixture
def registered():
    names = []

    def add(name, fn, **kwargs):
        sampling.register(name, fn, **kwargs)
        names.append(name)
        return name

    yield add
    for name in names:
        sampling.unregister(name)


COUNTER = compile_counter()


# ---------------------------------------------------------------- registry and validation

def test_registry_lists_builtins_and_versions_every_change(registered):
    assert sampling.names()[:5] == ["default", "typical", "tfs", "mirostat", "mirostat2"]
    before = sampling.snapshot()
    registered("test_second_best", second_best)
    after = sampling.snapshot()
    assert after.version > before.version and after.samplers[-1].name == "test_second_best"
    assert after.samplers[0].name == "default" and before.samplers == after.samplers[:-1]
    assert SamplingParams(sampler="test_second_best").selected_sampler == "test_second_best"


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="typical", fn=second_best), "built in"),
    (dict(name="", fn=second_best), "non-empty"),
    (dict(name="x_not_callable", fn=3), "callable"),
    (dict(name="x_state", fn=second_best, state_size=9), "state_size"),
    (dict(name="x_bad_signature", fn=lambda logits: logits), "failed on a"),
    (dict(name="x_bad_shape", fn=lambda logits, p, s, k: logits), "must return tokens"),
])
def test_register_refuses_bad_samplers_at_once(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sampling.register(**kwargs)
    assert kwargs["name"] not in sampling.names()[5:]


def test_unknown_sampler_names_the_registered_ones():
    with pytest.raises(ValueError) as err:
        SamplingParams(sampler="no_such_sampler")
    assert str(err.value).startswith("sampler ") and "'mirostat2'" in str(err.value)


def test_engine_refuses_a_sampler_unregistered_since(tiny):
    llm, _ = tiny
    sampling.register("test_gone", second_best)
    params = SamplingParams(sampler="test_gone")
    sampling.unregister("test_gone")
    with pytest.raises(ValueError, match="'test_gone' is not registered"):
        llm.engine.add_request("gone", [1, 2, 3], params)
    assert "gone" not in llm.engine.groups and not llm.engine.has_unfinished_requests()


def test_ollama_options_select_builtins():
    assert SamplingParams().selected_sampler == "default"
    assert SamplingParams(typical_p=0.9).selected_sampler == "typical"
    assert SamplingParams(tfs_z=0.95).selected_sampler == "tfs"
    assert SamplingParams(mirostat=1, typical_p=0.9).selected_sampler == "mirostat"  # mirostat wins, as in llama.cpp
    assert SamplingParams(mirostat=2, tfs_z=0.5).selected_sampler == "mirostat2"
    assert SamplingParams(sampler="typical", typical_p=0.7).selected_sampler == "typical"


# ---------------------------------------------------------------- sampler level, fixed logits

def token_from_own_param(logits, params, state, keys):
    """The token its request names in extra_args["token"] (its own parameter, column 0)."""
    return params.sampler_params[:, 0].astype(jnp.int32)


def test_a_sampler_reads_its_own_parameters(registered):
    registered("test_own_token", token_from_own_param, params=lambda p: (p.extra_args["token"],), neutral=(1.0,))
    registered("test_own_token_too", token_from_own_param)  # no params: its rows get zeros
    snap = sampling.snapshot()
    rows = [SamplingRow(p, seed=i, step=0, prompt_ids=[1], output_ids=[], banned_ids=(), sampler=p.selected_sampler)
            for i, p in enumerate([SamplingParams(sampler="test_own_token", extra_args={"token": 7}),
                                   SamplingParams(temperature=0.0),
                                   SamplingParams(sampler="test_own_token", extra_args={"token": 11}),
                                   SamplingParams(sampler="test_own_token_too")])]
    t = build_sampling_tensors(rows, 8, history_width=1, samplers=snap.samplers)
    assert t.sampler_params[:4, 0].tolist() == [7.0, 0.0, 11.0, 0.0]
    logits = np.zeros((8, 32), np.float32)
    logits[:, 5] = 1.0  # the default path's greedy choice
    out = jax.jit(sample, static_argnames=("num_top_logprobs", "samplers"))(
        jnp.asarray(logits), t, num_top_logprobs=0, samplers=snap.pluggable)
    assert np.asarray(out.tokens)[:4].tolist() == [7, 5, 11, 0]
    with pytest.raises(ValueError, match="extra_args"):
        SamplingParams(extra_args=[1])


def test_custom_sampler_rows_beside_default_rows(registered):
    registered("test_second_best", second_best)
    snap = sampling.snapshot()
    V, W = 64, 32
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((12, V)) * 2).astype(np.float32)
    custom = [SamplingParams(sampler="test_second_best"),
              SamplingParams(sampler="test_second_best", repetition_penalty=2.0, temperature=0.5),
              SamplingParams(sampler="test_second_best", frequency_penalty=1.0, min_tokens=3)]
    default = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_p=0.8),
               SamplingParams(temperature=1.0, top_k=5, presence_penalty=1.0), SamplingParams(min_p=0.1),
               SamplingParams(temperature=0.0, repetition_penalty=1.5)]

    def row(p, i):
        top = np.argsort(-logits[i])
        return SamplingRow(p, 100 + i, 2, [int(top[0]), 5], [int(top[1]), int(top[1])],
                           [int(top[2])] if p.min_tokens else [])

    order = [("c", 0), ("d", 0), ("d", 1), ("c", 1), ("d", 2), ("d", 3), ("c", 2), ("d", 4)]
    rows = [row((custom if kind == "c" else default)[j], i) for i, (kind, j) in enumerate(order)]
    t = build_sampling_tensors(rows, 12, W, banned_width=4, samplers=snap.samplers)
    mixed = jax.jit(sample, static_argnames=("samplers",))(jnp.asarray(logits), t, samplers=snap.pluggable)
    tokens = np.asarray(mixed.tokens)

    for i, (kind, _) in enumerate(order):
        if kind == "c":
            expected = np.argsort(-ref_penalised(logits[i], rows[i]), kind="stable")[1]
            assert tokens[i] == expected, i
    # The default rows, sampled alone on the default path, give the same tokens.
    alone = [i for i, (kind, _) in enumerate(order) if kind == "d"]
    t_alone = build_sampling_tensors([rows[i] for i in alone], len(alone), W, banned_width=4)
    default_only = np.asarray(jax.jit(sample)(jnp.asarray(logits[alone]), t_alone).tokens)
    np.testing.assert_array_equal(tokens[alone], default_only)


# ---------------------------------------------------------------- through the engine

@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    folder, hf = tiny_checkpoint("llama")
    llm = LLM(folder, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16, block_size=4)
    return llm, hf


def hf_second_best(hf, prompt, num_tokens):
    """numpy re-implementation of second_best on transformers' logits, one token at a time."""
    ids = list(prompt)
    for _ in range(num_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
        order = np.argsort(-logits)
        assert logits[order[1]] - logits[order[2]] > 1e-4, "second and third too close to tell apart"
        ids.append(int(order[1]))
    return ids[len(prompt):]


PROMPTS = [[5, 17, 99, 3], [40, 41, 42, 43, 44, 45, 46], [7, 8, 9], [200, 100, 50, 25, 12], [11] * 9, [300, 2, 3]]


def test_custom_sampler_in_the_same_batch_as_default_requests(tiny, registered):
    llm, hf = tiny
    registered("test_second_best", second_best)
    registered("test_counting", counting_sampler, state_size=1)
    new = dict(max_tokens=8, ignore_eos=True)
    default_params = [SamplingParams(temperature=0.0, **new),
                      SamplingParams(temperature=0.9, top_p=0.9, seed=3, **new),
                      SamplingParams(temperature=1.1, repetition_penalty=1.3, seed=4, **new),
                      SamplingParams(mirostat=2, mirostat_tau=3.0, seed=5, **new)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
             for p, params in zip(PROMPTS[:4], default_params)]

    custom_params = [SamplingParams(sampler="test_second_best", **new),
                     SamplingParams(sampler="test_second_best", **new),
                     SamplingParams(sampler="test_counting", **new)]
    outs = llm.generate(PROMPTS[:4] + PROMPTS[3:], default_params + custom_params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    assert tokens[:4] == alone  # the custom rows changed nothing for the others
    for prompt, got in zip(PROMPTS[3:5], tokens[4:6]):
        assert got == hf_second_best(hf, prompt, 8)
    assert len(set(tokens[4])) > 1 and tokens[4] != tokens[0]
    # Steps really mixed both kinds of rows.
    assert any(set(rec.scheduled) >= {outs[0].request_id, outs[4].request_id} for rec in llm.engine.step_log)


def test_sampler_state_is_carried_from_step_to_step(tiny, registered):
    llm, _ = tiny
    registered("test_counting", counting_sampler, state_size=1)
    llm.generate([PROMPTS[0]], SamplingParams(sampler="test_counting", max_tokens=5, ignore_eos=True), use_tqdm=False)
    # The engine drops finished requests; run one by hand to read its state.
    engine = llm.engine
    engine.add_request("state-probe", PROMPTS[1], SamplingParams(sampler="test_counting", max_tokens=6, ignore_eos=True))
    req = engine.groups["state-probe"].children[0]
    while engine.has_unfinished_requests():
        engine.step()
    assert req.sampler_state[0] == 6.0 and len(req.output_token_ids) == 6


def test_mirostat_request_reproduces_in_any_batch(tiny):
    llm, _ = tiny
    params = SamplingParams(mirostat=1, mirostat_tau=2.0, mirostat_eta=0.3, seed=21, max_tokens=10, ignore_eos=True)
    alone = llm.generate([PROMPTS[2]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, seed=s, max_tokens=6, ignore_eos=True) for s in range(3)]
    batched = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[5]], [others[0], params] + others[1:],
                           use_tqdm=False)[1].outputs[0].token_ids
    assert batched == alone


def test_registering_after_warmup_compiles_only_the_buckets_used(tiny, registered):
    llm, _ = tiny
    runner = llm.engine.runner
    default_traffic = [SamplingParams(temperature=t, seed=i, max_tokens=5, ignore_eos=True)
                       for i, t in enumerate([0.0, 0.7, 1.0, 0.0, 0.5, 1.2])]
    llm.generate(PROMPTS, default_traffic, use_tqdm=False)  # whatever earlier tests left, warm
    before_keys, before = set(runner._compiled), COUNTER.count
    llm.generate(PROMPTS, default_traffic, use_tqdm=False)
    assert COUNTER.count == before, "the default path compiled after warm-up"

    name = registered("test_notebook_sampler", second_best)
    assert COUNTER.count == before  # registering compiles nothing by itself
    # One request: a 3-token prompt (bucket of 4 tokens), then single-token decode steps (bucket
    # of 2), both with B = 8 slots. One sampler graph of that batch size compiles, no forward graph.
    llm.generate([[7, 8, 9]], SamplingParams(sampler=name, max_tokens=4, ignore_eos=True), use_tqdm=False)
    new_keys = set(runner._compiled) - before_keys
    version = sampling.snapshot().version
    assert runner.bucket_for(3) != runner.bucket_for(1) and runner.bucket_for(3)[1] == runner.bucket_for(1)[1] == 8
    assert new_keys == {sampler_key(8, version)}
    assert COUNTER.count - before == 1
    assert runner.num_compiled_warmup == len(runner.warmup_keys)

    # No restart, no second compile: the same sampler again, then default traffic, compile nothing.
    before = COUNTER.count
    llm.generate([[7, 8], [1, 2]], SamplingParams(sampler=name, max_tokens=4, ignore_eos=True), use_tqdm=False)  # same buckets
    llm.generate(PROMPTS, default_traffic, use_tqdm=False)
    assert COUNTER.count == before
    # A newer registry leaves the default graphs alone too.
    registered("test_notebook_sampler_2", second_best)
    llm.generate(PROMPTS, default_traffic, use_tqdm=False)
    assert COUNTER.count == before


def hf_penalised_greedy(hf, prompt, params, num_tokens):
    """Greedy decoding on transformers' logits with vLLM's penalties applied in numpy each step."""
    ids = list(prompt)
    for _ in range(num_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double().numpy()
        row = SamplingRow(params, 0, len(ids) - len(prompt), prompt, ids[len(prompt):], ())
        x = ref_penalised(logits, row)
        order = np.argsort(-x)
        assert x[order[0]] - x[order[1]] > 1e-4, "best and second too close to tell apart"
        ids.append(int(order[0]))
    return ids[len(prompt):]


def test_engine_applies_penalties_only_to_the_rows_that_ask(tiny):
    """The penalties graph runs on steps where some row has a penalty (runner.needs_penalties):
    penalised rows follow the reference, penalty-free rows in the same steps stay plain greedy."""
    llm, hf = tiny
    new = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
    params = [SamplingParams(repetition_penalty=1.8, **new), SamplingParams(**new),
              SamplingParams(presence_penalty=1.5, frequency_penalty=0.5, **new)]
    prompts = [PROMPTS[4], PROMPTS[0], PROMPTS[1]]
    outs = llm.generate(prompts, params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    for prompt, p, tokens in zip(prompts, params, got):
        assert tokens == hf_penalised_greedy(hf, prompt, p, 8)
    plain = llm.generate([PROMPTS[4]], SamplingParams(**new), use_tqdm=False)[0].outputs[0].token_ids
    assert plain != got[0], "the repetition penalty changed nothing: the check could not fail"
