"""Speculative decoding with n-gram prompt lookup and with a draft model: greedy output
token-identical to plain decoding, sampled output distributed as without speculation (the verify
graph alone, and end to end), acceptance counts, no page leaked, nothing compiled after warm-up,
and the options."""
from __future__ import annotations

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.engine_args import EngineArgs
from jaxserve.speculative import ngram_drafts
from testlib import SMOLLM2_ENGINE_ARGS, compile_counter, make_hf_model, save_tiny_tokenizer

COUNTER = compile_counter()
TINY = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, block_size=4)
NGRAM = dict(speculative_model="[ngram]", num_speculative_tokens=3, ngram_prompt_lookup_max=3)
# The Markov model's cycles: token x is followed most likely by successor(x), within its block of 8.
CYCLE = 8


def successor(x: int) -> int:
    return x // CYCLE * CYCLE + (x + 1) % CYCLE


# ---- the proposer and the verify graph -----------------------------------------------------------

def test_ngram_lookup_takes_the_longest_suffix_and_its_first_occurrence():
    tokens = np.array([5, 1, 2, 3, 9, 9, 1, 2, 3, 4, 7, 8, 2, 3])
    # "2 3" first occurs at 2, followed by 9 9 1; the 3-gram "8 2 3" never occurred before.
    assert ngram_drafts(tokens, 1, 3, 3).tolist() == [9, 9, 1]
    assert ngram_drafts(np.array([1, 2, 3, 1, 2]), 1, 2, 5).tolist() == [3, 1, 2]
    assert ngram_drafts(np.array([1, 2, 3, 4]), 1, 3, 2).tolist() == []
    assert ngram_drafts(np.array([7, 1, 2, 7]), 2, 2, 2).tolist() == []  # only a 1-gram matches


def _verify(logits, params, drafts, num_rows):
    import jax

    from jaxserve.sampling.core import SamplingRow, build_sampling_tensors
    from jaxserve.sampling.rejection import DraftInputs, verify
    rows = [SamplingRow(params=params, seed=i, step=0, prompt_ids=(), output_ids=(), banned_ids=())
            for i in range(num_rows)]
    tensors = build_sampling_tensors(rows, num_rows, 1)
    inputs = DraftInputs(tokens=np.tile(np.asarray(drafts, np.int32), (num_rows, 1)),
                         counts=np.full(num_rows, len(drafts), np.int32))
    tokens, accepted = jax.jit(verify)(np.tile(logits[None], (num_rows, 1, 1)), tensors, inputs)
    return np.asarray(tokens), np.asarray(accepted)


def _filtered(logits: np.ndarray, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The sampler's distribution (temperature 1): top-k, then top-p over the renormalised rest."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[:top_k or len(p)]] = True
    q = np.where(keep, p, 0) / p[keep].sum()
    before = np.cumsum(q[order]) - q[order]
    keep[order[before >= top_p]] = False
    return np.where(keep, p, 0) / p[keep].sum()


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    seen = expected > 0
    assert counts[~seen].sum() == 0, "a token the distribution excludes was emitted"
    return float(((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum())


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=4, top_p=0.8)],
                         ids=["temperature", "top_k_top_p"])
def test_rejection_sampling_emits_the_targets_distribution(params):
    V, N = 8, 40_000
    logits = np.random.default_rng(0).normal(size=(3, V)).astype(np.float32) * 1.5
    p = [_filtered(row, params.top_k if params.top_k > 0 else 0, params.top_p) for row in logits]
    first_draft, second_draft = int(np.argmax(p[0])), int(np.argsort(-p[1])[1])  # a likely and a less likely one
    tokens, accepted = _verify(logits, params, [first_draft, second_draft], N)
    assert set(np.unique(accepted)) == {0, 1, 2}  # every path is taken
    # 3 degrees of freedom or more, about 7 at most: 40 is far beyond chance (p < 1e-5).
    assert _chi_square(np.bincount(tokens[:, 0], minlength=V), p[0]) < 40
    # The synthetic logits of position 1 do not depend on position 0, so given the first draft
    # the second token is distributed as p[1], accepted or drawn after a rejection.
    second = tokens[accepted >= 1, 1]
    assert _chi_square(np.bincount(second, minlength=V), p[1]) < 40
    # After both drafts the bonus token comes from p[2].
    assert _chi_square(np.bincount(tokens[accepted == 2, 2], minlength=V), p[2]) < 40


def test_greedy_rows_accept_the_argmax_prefix():
    logits = np.full((4, 6), -5.0, np.float32)
    logits[[0, 1, 2, 3], [4, 2, 5, 1]] = 5.0  # argmax 4, then 2, then 5, then 1
    tokens, accepted = _verify(logits, SamplingParams(temperature=0), [4, 2, 3], 2)
    assert accepted.tolist() == [2, 2] and tokens[0, :3].tolist() == [4, 2, 5]
    tokens, accepted = _verify(logits, SamplingParams(temperature=0), [4, 2, 5], 1)
    assert accepted.tolist() == [3] and tokens[0].tolist() == [4, 2, 5, 1]  # the bonus token


# ---- through the engine --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint):
    """The tiny llama without and with n-gram speculation."""
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder, **TINY), LLM(folder, **TINY, **NGRAM)


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    """A tiny llama whose next token depends on the current one only (attention and MLP outputs
    zeroed), most likely its successor in a cycle of 8: text that repeats, so n-gram drafts are
    often accepted, with next-token distributions known exactly. -> (folder, probs [V, V])."""
    import torch

    model = make_hf_model("llama", seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        predecessor = [x // CYCLE * CYCLE + (x - 1) % CYCLE for x in range(embed.shape[0])]
        model.lm_head.weight.copy_(0.35 * embed[predecessor])
        logits = model(torch.arange(embed.shape[0])[:, None]).logits[:, 0].double().numpy()
    folder = tmp_path_factory.mktemp("markov")
    model.save_pretrained(str(folder), safe_serialization=True)
    save_tiny_tokenizer(folder)
    return str(folder), logits


def _generate(llm, prompts, params):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_greedy_output_is_identical_and_nothing_compiles_after_warm_up(tiny_pair, markov):
    plain, spec = tiny_pair
    prompts = [[3 + i, 40 + i, 7, 99, 120 + i, 5, 6, 200 + i, 9, 11] for i in range(6)]
    prompts += [[10, 11, 12, 10, 11, 12, 10, 11], [50, 51, 52, 53, 50, 51, 52, 53, 50]]
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    compiled = COUNTER.count
    assert _generate(spec, prompts, params) == _generate(plain, prompts, params)
    stats = spec.stats()
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_accepted_tokens > 0
    # Repetitive text: the Markov model's greedy cycle, drafted and accepted (batched with plain prompts).
    mplain, mspec = LLM(markov[0], **TINY), LLM(markov[0], **TINY, **NGRAM)
    compiled = COUNTER.count
    cycle = [[16, 17, 18, 19, 20, 21, 22, 23, 16, 17], [200, 201, 202]] + prompts[:3]
    assert _generate(mspec, cycle, params) == _generate(mplain, cycle, params)
    assert COUNTER.count == compiled  # every speculative graph was built at warm-up
    s = mspec.stats()
    assert s.spec_decode_num_accepted_tokens > 0.5 * s.spec_decode_num_draft_tokens


def test_acceptance_counts_and_pages(markov):
    llm = LLM(markov[0], **TINY, **NGRAM)
    engine = llm.engine
    before = engine.stats.steps
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    out = _generate(llm, [[16, 17, 18, 19, 20, 21, 22, 23, 16, 17]], params)[0]
    s = llm.stats()
    steps = s.steps - before
    # One request: every step emits one token of the target plus the drafts it accepted.
    assert len(out) == 40 == steps + s.spec_decode_num_accepted_tokens
    assert s.spec_decode_num_drafts <= steps - 1  # the prefill step has no drafts
    assert sum(s.spec_decode_accepted_per_position) == s.spec_decode_num_accepted_tokens
    assert s.spec_decode_accepted_per_position[0] >= s.spec_decode_accepted_per_position[-1] > 0
    assert s.generation_tokens == 40
    # /metrics as `jaxserve serve` renders it (server/metrics.py reads the AsyncEngine's stats()).
    from types import SimpleNamespace

    from jaxserve.server.metrics import Metrics
    text = Metrics(SimpleNamespace(stats=llm.stats), "markov").render().decode()
    for name, value in (("num_drafts", s.spec_decode_num_drafts), ("num_draft_tokens", s.spec_decode_num_draft_tokens),
                        ("num_accepted_tokens", s.spec_decode_num_accepted_tokens)):
        assert f'jaxserve:spec_decode_{name}_total{{model_name="markov"}} {float(value)}' in text
    assert (f'jaxserve:spec_decode_num_accepted_tokens_per_pos_total{{model_name="markov",position="2"}} '
            f'{float(s.spec_decode_accepted_per_position[2])}') in text
    # Aborted mid-flight, finished by stop strings and by max_tokens: every page comes back.
    drafts = s.spec_decode_num_drafts  # (s is the engine's live stats object)
    engine.add_request("abort-me", [16, 17, 18, 19, 20, 21, 22, 23, 16], SamplingParams(temperature=0, max_tokens=50))
    for _ in range(4):
        engine.step()
    assert engine.stats.spec_decode_num_drafts > drafts
    engine.abort_request("abort-me")
    stop = llm.generate([[16, 17, 18, 19, 20, 21, 22, 23, 16]],
                        SamplingParams(temperature=0, max_tokens=30, stop=["w20"], ignore_eos=True), use_tqdm=False)
    # Drafts accepted past the stop string are dropped: 20 was drafted with 21 and 22.
    assert stop[0].outputs[0].token_ids == [17, 18, 19, 20] and "w20" not in stop[0].outputs[0].text
    pool = engine.pool
    assert not engine.has_unfinished_requests()
    assert pool.num_free_pages == pool.num_pages - 1 and not any(pool.ref_counts)


def _leading_run(tokens: list[int], last: int) -> int:
    """How many of the tokens follow the cycle from `last` on (0..3, the first three tokens)."""
    run = 0
    for t in tokens[:3]:
        if t != successor(last):
            break
        run, last = run + 1, t
    return run


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
@pytest.mark.parametrize("filters", [dict(), dict(top_k=20, top_p=0.9)], ids=["temperature", "top_k_top_p"])
def test_sampled_tokens_are_distributed_as_without_speculation(markov, filters, proposer):
    folder, logits = markov
    prompt = [16, 17, 18, 19, 20, 21, 22, 23, 16, 17]
    N = 480
    probs = np.stack([_filtered(row, filters.get("top_k", 0), filters.get("top_p", 1.0)) for row in logits])
    # Exact chances of following the cycle for 0, 1, 2 or all 3 of the first tokens.
    on = [probs[x, successor(x)] for x in (17, 18, 19)]
    reach = [1.0, on[0], on[0] * on[1], on[0] * on[1] * on[2]]
    exact = np.array([reach[i] - (reach[i + 1] if i < 3 else 0.0) for i in range(4)])
    runs = {}
    # The draft model is the Markov model itself: its greedy drafts follow the cycle, which the
    # target at temperature 1 takes only sometimes, so every accept / reject path is exercised.
    spec = NGRAM if proposer == "ngram" else dict(speculative_model=folder, num_speculative_tokens=3)
    for name, extra in (("plain", {}), ("spec", spec)):
        llm = LLM(folder, **TINY, **extra)
        params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=3, ignore_eos=True, **filters)
                  for seed in range(N)]
        outs = [o.outputs[0].token_ids for o in llm.generate([prompt] * N, params, use_tqdm=False)]
        runs[name] = np.bincount([_leading_run(t, prompt[-1]) for t in outs], minlength=4)
        if extra:
            s = llm.stats()
            assert 0 < s.spec_decode_num_accepted_tokens < s.spec_decode_num_draft_tokens
    # 3 degrees of freedom: 20 is p < 2e-4 under the exact distribution.
    assert _chi_square(runs["plain"], exact) < 20, runs
    assert _chi_square(runs["spec"], exact) < 20, runs
    # Total variation between the two empirical distributions, well within sampling noise of N.
    assert 0.5 * np.abs(runs["plain"] - runs["spec"]).sum() / N < 0.1, runs


def test_smollm2_repetitive_code_is_identical_with_speculation(smollm2_llm):
    code = ("def area(width, height):\n    return width * height\n\n"
            "def perimeter(width, height):\n    return 2 * (width + height)\n")
    prompts = [f"Rewrite this code, renaming width to w:\n```python\n{code}```\n", "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=48)
    spec = LLM(**SMOLLM2_ENGINE_ARGS, speculative_model="[ngram]", num_speculative_tokens=4,
               ngram_prompt_lookup_max=4, ngram_prompt_lookup_min=2)
    assert _generate(spec, prompts, params) == _generate(smollm2_llm, prompts, params)
    # Final-only text is decoded once, at the end, from every output id (accepted drafts included).
    tok = spec.get_tokenizer()
    for out in spec.generate(prompts, params, use_tqdm=False):
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    s = spec.stats()
    assert s.spec_decode_num_accepted_tokens > 0  # SmolLM2-135M copies loosely: about a third in 128 tokens


# ---- a draft model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_layer_draft(tmp_path_factory):
    """A one-layer tiny llama of the tiny llama's vocabulary, its weights drawn apart: a draft the
    target mostly rejects."""
    folder = tmp_path_factory.mktemp("draft")
    make_hf_model("llama", seed=5, num_hidden_layers=1).save_pretrained(str(folder), safe_serialization=True)
    save_tiny_tokenizer(folder)
    return str(folder)


def test_a_draft_model_keeps_greedy_output_and_mirrors_the_targets_cache(tiny_pair, tiny_checkpoint, one_layer_draft):
    plain, _ = tiny_pair
    folder, _ = tiny_checkpoint("llama")
    # Prompts sharing 8 tokens (two pages): the second pass is served from the prefix cache.
    prompts = [[60, 61, 62, 63, 64, 65, 66, 67, 3 + i, 40 + i, 7, 120 + i] for i in range(5)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = _generate(plain, prompts, params)
    # The target drafting for itself: its drafts are its own greedy tokens, so every one is
    # accepted, which holds only if the draft's cache holds what the target's does: prompts it
    # prefilled, pages from the prefix cache, and (a cache of 20 pages for 5 requests of up to
    # 13 pages) requests preempted and recomputed.
    for kv_pages in (None, 20):
        extra = {} if kv_pages is None else dict(kv_cache_memory=kv_pages * _page_bytes(folder, 2))
        self_draft = LLM(folder, **TINY, **extra, speculative_model=folder, num_speculative_tokens=3)
        compiled = COUNTER.count
        for _ in range(2):
            assert _generate(self_draft, prompts, params) == expected
        assert COUNTER.count == compiled  # the mirror and propose graphs were built at warm-up
        s = self_draft.stats()
        assert s.spec_decode_num_draft_tokens > 100
        assert s.spec_decode_num_accepted_tokens == s.spec_decode_num_draft_tokens, kv_pages
        assert s.prefix_cache_hits > 0
        if kv_pages is not None:
            assert s.num_preemptions > 0
    # A draft model the target disagrees with: output unchanged all the same.
    other = LLM(folder, **TINY, speculative_model=one_layer_draft, num_speculative_tokens=3)
    engine = other.engine
    assert _generate(other, prompts, params) == expected
    assert other.stats().spec_decode_num_draft_tokens > 0
    # Aborted mid-flight: every page comes back.
    engine.add_request("abort-me", prompts[0], SamplingParams(temperature=0, max_tokens=30))
    for _ in range(4):
        engine.step()
    engine.abort_request("abort-me")
    assert not engine.has_unfinished_requests()
    assert engine.pool.num_free_pages == engine.pool.num_pages - 1 and not any(engine.pool.ref_counts)


def _page_bytes(folder: str, num_models: int) -> int:
    """Bytes of one KV page of TINY's block size for the tiny llama, times the models holding one."""
    from jaxserve.engine import kv_page_bytes
    from jaxserve.kv_cache_dtype import kv_cache_dtype
    from jaxserve.models import load_model_config
    import jax.numpy as jnp
    config, _ = load_model_config(folder)
    return num_models * kv_page_bytes(config, TINY["block_size"], kv_cache_dtype("auto", jnp.float32))


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    make_hf_model("llama", vocab_size=300).save_pretrained(str(tmp_path), safe_serialization=True)
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocabulary \\(300 tokens\\) differs from the target's"):
        LLM(folder, **TINY, speculative_model=str(tmp_path), num_speculative_tokens=2)


# ---- the options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative_model="[ngram]", ngram_prompt_lookup_max=3), "needs --num-speculative-tokens"),
    (dict(num_speculative_tokens=3), "--num-speculative-tokens given without --speculative-model"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=3), "needs --ngram-prompt-lookup-max"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=3, ngram_prompt_lookup_max=2,
          ngram_prompt_lookup_min=3), "ngram_prompt_lookup_min must be an integer in \\[1, "),
    (dict(speculative_model="/models/draft", num_speculative_tokens=3, ngram_prompt_lookup_max=2),
     "apply to --speculative-model '\\[ngram\\]' only"),
    (dict(speculative_model="[ngram]", num_speculative_tokens=0, ngram_prompt_lookup_max=2),
     "num-speculative-tokens must be >= 1"),
])
def test_bad_speculative_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs)


@pytest.mark.parametrize("command", ["serve", "generate", "run"])
def test_speculative_flags_parse_on_every_command(command):
    from jaxserve.cli import build_parser, engine_args_from, resolve_options_for
    argv = [command] + (["a prompt"] if command == "generate" else [])
    argv += ["--speculative-model", "[ngram]", "--num-speculative-tokens", "5", "--ngram-prompt-lookup-max", "4",
             "--ngram-prompt-lookup-min", "2"]
    args = engine_args_from(resolve_options_for(build_parser().parse_args(argv), environ={}))
    config = args.speculative_config()
    assert (config.draft_model, config.num_speculative_tokens, config.ngram_max, config.ngram_min) == (None, 5, 4, 2)
    argv = argv[:argv.index("--speculative-model")] + ["--speculative-model", "/models/draft",
                                                        "--num-speculative-tokens", "3"]
    config = engine_args_from(resolve_options_for(build_parser().parse_args(argv), environ={})).speculative_config()
    assert (config.draft_model, config.num_speculative_tokens) == ("/models/draft", 3)
