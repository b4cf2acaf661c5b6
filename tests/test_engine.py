"""Engine behaviour a user notices: continuous batching, prefix caching, preemption, seeded
sampling, stop conditions, n > 1, logprobs, and bad requests refused without disturbing others."""
from __future__ import annotations

import math

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=16)


def run_alone(llm, prompt, params=GREEDY):
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def drain(engine):
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def test_request_added_while_others_decode_joins_next_step(smollm2_llm):
    llm, engine = smollm2_llm, smollm2_llm.engine
    prompts = {"cb-a": "The capital of France is", "cb-b": "List the days of the week:",
               "cb-late": "Water boils at"}
    solo = {rid: run_alone(llm, p).token_ids for rid, p in prompts.items()}
    engine.add_request("cb-a", prompts["cb-a"], GREEDY)
    engine.add_request("cb-b", prompts["cb-b"], GREEDY)
    for _ in range(4):
        engine.step()
    assert engine.step_log[-1].scheduled == {"cb-a": 1, "cb-b": 1}  # both are decoding
    engine.add_request("cb-late", prompts["cb-late"], GREEDY)
    engine.step()
    joined = engine.step_log[-1].scheduled
    assert joined["cb-a"] == 1 and joined["cb-b"] == 1 and joined["cb-late"] > 1
    finals = drain(engine)
    assert {rid: finals[rid].outputs[0].token_ids for rid in prompts} == solo


def test_shared_prefix_is_computed_once(smollm2_llm):
    llm, engine = smollm2_llm, smollm2_llm.engine
    tok = llm.get_tokenizer()
    prefix = tok(" ".join(f"Item {i} is a fruit named after the number {i}." for i in range(30))).input_ids[:200]
    first, second = prefix + tok(" Which item is first?").input_ids, prefix + tok(" Name one.").input_ids
    params = SamplingParams(temperature=0, max_tokens=8)

    engine.pool.reset_prefix_cache()
    before = engine.stats.prompt_tokens
    cold = run_alone(llm, second, params)
    cold_tokens = engine.stats.prompt_tokens - before
    assert cold_tokens == len(second)

    engine.pool.reset_prefix_cache()
    run_alone(llm, first, params)
    before, hits_before = engine.stats.prompt_tokens, engine.stats.prefix_cache_hits
    warm = run_alone(llm, second, params)
    warm_tokens = engine.stats.prompt_tokens - before
    assert warm_tokens <= 0.1 * cold_tokens, (warm_tokens, cold_tokens)
    assert engine.stats.prefix_cache_hits - hits_before == 192  # 12 full pages of 16
    assert warm.token_ids == cold.token_ids


def test_preemption_under_page_pressure_keeps_outputs_and_frees_every_page(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    prompts = [[3 + i, 40 + i, 7, 99, 120 + i, 5, 6, 200 + i, 9, 11] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    # K+V of one 4-token page: 2 layers x 4 tokens x 2 KV heads x 16 dims x 2 x fp32.
    page_bytes = 2 * 4 * 2 * 16 * 2 * 4
    tight = LLM(folder, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=16, block_size=4,
                kv_cache_memory=20 * page_bytes)  # 20 pages of 4 tokens: about 2 of the 8 requests
    assert tight.engine.pool.num_pages == 21
    # Unconstrained: one request at a time never runs short of pages.
    expected = [tight.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert tight.stats().num_preemptions == 0
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert tight.stats().num_preemptions > 0
    pool = tight.engine.pool
    assert pool.num_free_pages == pool.num_pages - 1 and not any(pool.ref_counts)


def test_seeded_sampling_is_independent_of_the_batch(smollm2_llm):
    llm = smollm2_llm
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = run_alone(llm, "Tell me a story about a dragon.", seeded).token_ids
    others = ["Hi!", "Explain gravity in one sentence.", "Count to ten:"]
    mixed = llm.generate(others[:2] + ["Tell me a story about a dragon."] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=20), GREEDY, seeded,
                          SamplingParams(temperature=0.7, seed=7, max_tokens=30)], use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = run_alone(llm, "Tell me a story about a dragon.",
                           SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=24)).token_ids
    assert other_seed != alone


def test_temperature_zero_top_k_one_and_greedy_agree(smollm2_llm):
    prompt = "The three primary colours are"
    greedy = run_alone(smollm2_llm, prompt, SamplingParams(temperature=0, max_tokens=20)).token_ids
    top1 = run_alone(smollm2_llm, prompt, SamplingParams(temperature=1.0, top_k=1, seed=3, max_tokens=20)).token_ids
    assert greedy == top1


def test_stop_strings_stop_token_ids_and_min_tokens(smollm2_llm):
    prompt = "Count from one to ten: one, two, three,"
    full = run_alone(smollm2_llm, prompt, SamplingParams(temperature=0, max_tokens=24))
    assert " five" in full.text
    cut = run_alone(smollm2_llm, prompt, SamplingParams(temperature=0, max_tokens=24, stop=[" five"]))
    assert cut.text == full.text[:full.text.index(" five")] and cut.finish_reason == "stop"
    assert cut.stop_reason == " five"
    kept = run_alone(smollm2_llm, prompt, SamplingParams(temperature=0, max_tokens=24, stop=" five",
                                                         include_stop_str_in_output=True))
    assert kept.text == full.text[:full.text.index(" five") + len(" five")]
    third = full.token_ids[2]
    by_id = run_alone(smollm2_llm, prompt, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[third]))
    assert by_id.token_ids == full.token_ids[:3] and by_id.stop_reason == third
    length = run_alone(smollm2_llm, prompt, SamplingParams(temperature=0, max_tokens=5))
    assert length.finish_reason == "length" and length.token_ids == full.token_ids[:5]


def test_eos_ends_a_chat_reply_unless_ignored(smollm2_llm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    out = smollm2_llm.chat(conv, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and "<|im_end|>" not in out.text
    more = smollm2_llm.chat(conv, SamplingParams(temperature=0, max_tokens=len(out.token_ids) + 3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert more.finish_reason == "length" and more.token_ids[:len(out.token_ids)] == out.token_ids
    late = smollm2_llm.chat(conv, SamplingParams(temperature=0, max_tokens=64, min_tokens=len(out.token_ids) + 2),
                            use_tqdm=False)[0].outputs[0]
    assert len(late.token_ids) >= len(out.token_ids) + 2 and 2 not in late.token_ids[:len(out.token_ids) + 1]
    # min_tokens 1 takes the output pass's inline stop rules (each output has a first token): EOS still ends it.
    one = smollm2_llm.chat(conv, SamplingParams(temperature=0, max_tokens=64, min_tokens=1), use_tqdm=False)[0].outputs[0]
    assert one.token_ids == out.token_ids and one.finish_reason == "stop"


def test_n_completions_share_the_prompt_pages(smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    engine = smollm2_llm.engine
    words = "apple river cloud stone music tiger paper glass orange window forest candle rocket"
    prompt = tok("Here is a list of random words, one per line:\n" + "\n".join(words.split() * 4) + "\n").input_ids
    full_pages = (len(prompt) - 1) // 16
    engine.pool.reset_prefix_cache()
    hits_before = engine.stats.prefix_cache_hits
    out = smollm2_llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12),
                               use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    # Final-only text is decoded once per completion, when it ends, from all its output ids.
    assert all(c.text == tok.decode(c.token_ids, skip_special_tokens=True) for c in out.outputs)
    # The two siblings found every full page of the prompt already computed by the first.
    assert engine.stats.prefix_cache_hits - hits_before == 2 * full_pages * 16
    assert out.outputs[0].token_ids == run_alone(smollm2_llm, prompt,
                                                 SamplingParams(temperature=1.0, seed=11, max_tokens=12)).token_ids


def test_logprobs_are_log_probabilities_of_the_sampled_and_top_tokens(smollm2_llm):
    out = run_alone(smollm2_llm, "The capital of France is", SamplingParams(temperature=0, max_tokens=6, logprobs=3))
    assert len(out.logprobs) == 6
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the most likely token
        ranked = sorted((lp for lp in entry.values()), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))
        assert sum(math.exp(lp.logprob) for lp in entry.values()) <= 1.0 + 1e-5
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)


BAD_REQUESTS = [
    ([], GREEDY, "prompt must not be empty"),
    ([1, 2, 49152], GREEDY, "outside the vocabulary"),
    ([-1], GREEDY, "outside the vocabulary"),
    ([5] * 500, SamplingParams(max_tokens=20), "max_model_len"),
    ([5] * 600, GREEDY, "max_model_len"),
    ([5], SamplingParams(stop_token_ids=[2**40]), "stop_token_ids holds token id 1099511627776, outside the vocabulary"),
    (["5", 6], GREEDY, "prompt token ids must be integers, got '5'"),
    ([1.5], GREEDY, "prompt token ids must be integers, got 1.5"),
    (7, GREEDY, "prompt must be text or a list of token ids, got int"),
    ({"prompt": "a", "prompt_token_ids": [1]}, GREEDY, "exactly one of 'prompt'"),
    ({"text": "a"}, GREEDY, "exactly one of 'prompt' .* got keys \\['text'\\]"),
    ({"prompt": [1, 2]}, GREEDY, "prompt must be text, got list"),
]


@pytest.mark.parametrize("base", [
    dict(n=2, temperature=0.9, seed=11, max_tokens=12, logprobs=2, stop=["\n\n", " the"]),
    # One completion without stop strings: DELTA outputs are built from each step's piece alone.
    dict(n=1, temperature=0.9, seed=5, max_tokens=12, logprobs=1, prompt_logprobs=1),
    # Ends on " a" after 7 tokens: the hold-back and the cut at a stop string, for one completion.
    dict(n=1, temperature=0.9, seed=2, max_tokens=12, logprobs=2, prompt_logprobs=1, stop=["\n\n", " the", " a"]),
], ids=["n2-stop-strings", "n1-pieces", "n1-stop-strings"])
def test_output_kinds_cumulative_delta_and_final_only(smollm2_llm, base):
    from jaxserve import RequestOutputKind

    engine = smollm2_llm.engine
    outputs = {kind: [] for kind in RequestOutputKind}
    for kind in RequestOutputKind:
        engine.add_request(f"kind-{kind.name}", "Write a short poem about the sea:",
                           SamplingParams(**base, output_kind=kind))
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[RequestOutputKind[out.request_id.removeprefix("kind-")]].append(out)
    cumulative, delta, final = (outputs[k] for k in RequestOutputKind)
    assert len(cumulative) > 2 and len(final) == 1 and final[0].finished
    assert [o.finished for o in delta] == [o.finished for o in cumulative]  # one per step it advanced
    if base.get("prompt_logprobs"):  # on the first delta only, as the cumulative outputs carry them
        assert delta[0].prompt_logprobs == cumulative[0].prompt_logprobs and delta[0].prompt_logprobs[1]
        assert all(o.prompt_logprobs is None for o in delta[1:])
    for i in range(base["n"]):
        want = cumulative[-1].outputs[i]
        got = final[0].outputs[i]
        assert (got.text, got.token_ids, got.finish_reason, got.logprobs) == (
            want.text, want.token_ids, want.finish_reason, want.logprobs)
        pieces = [o.outputs[i] for o in delta]
        # Deltas concatenate to the cumulative output, step by step, stop-string hold-back included.
        for k in range(len(pieces)):
            assert "".join(p.text for p in pieces[:k + 1]) == cumulative[k].outputs[i].text
            assert sum((p.token_ids for p in pieces[:k + 1]), []) == cumulative[k].outputs[i].token_ids
        assert sum((p.logprobs for p in pieces), []) == want.logprobs
        assert pieces[-1].finish_reason == want.finish_reason
    if base["n"] == 1 and base.get("stop"):
        assert cumulative[-1].outputs[0].stop_reason == " a"
    for out in (cumulative[0], delta[0], final[0]):  # the queue ends at admission, before the first token
        m = out.metrics
        assert m["arrival_time"] <= m["scheduled_time"] <= m["first_token_time"]


def test_generate_returns_final_outputs_without_changing_the_callers_params(smollm2_llm):
    from jaxserve import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=6)
    outs = smollm2_llm.generate(["The capital of France is", "Water boils at"], params, use_tqdm=False)
    assert params.output_kind is RequestOutputKind.CUMULATIVE
    assert all(o.finished and len(o.outputs[0].token_ids) == 6 for o in outs)
    # vLLM's prompt dicts (TextPrompt, TokensPrompt) and numpy ids give the same completions.
    ids = smollm2_llm.get_tokenizer()("Water boils at").input_ids
    as_dicts = smollm2_llm.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": np.array(ids)}],
                                    params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in as_dicts] == [o.outputs[0].token_ids for o in outs]
    assert as_dicts[0].prompt == "The capital of France is" and as_dicts[1].prompt_token_ids == ids
    single = smollm2_llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind=2)


def test_bad_requests_are_refused_and_others_carry_on(smollm2_llm):
    llm, engine = smollm2_llm, smollm2_llm.engine
    expected = run_alone(llm, "Name a planet.").token_ids
    free_before = engine.pool.num_free_pages
    engine.add_request("good", "Name a planet.", GREEDY)
    engine.step()
    for i, (prompt, params, message) in enumerate(BAD_REQUESTS):
        with pytest.raises(ValueError, match=message):
            engine.add_request(f"bad-{i}", prompt, params)
        engine.step()
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", "again", GREEDY)
    finals = drain(engine)
    assert list(finals) == ["good"] and finals["good"].outputs[0].token_ids == expected
    assert engine.pool.num_free_pages == free_before


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"), (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_prompt_logprobs_match_transformers(smollm2_llm, smollm2_hf):
    import torch

    prompt = smollm2_llm.get_tokenizer()("The capital of France is Paris, and the capital of Italy is").input_ids
    out = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                               use_tqdm=False)[0]
    with torch.no_grad():
        want = torch.log_softmax(smollm2_hf(torch.tensor([prompt])).logits[0], dim=-1).numpy()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry[prompt[pos]].logprob == pytest.approx(float(want[pos - 1, prompt[pos]]), abs=1e-3)
        top = sorted(entry.values(), key=lambda lp: lp.rank or 99)
        assert [lp.rank for lp in top if lp.rank][:2] == [1, 2]
        best = int(want[pos - 1].argmax())
        assert entry[best].rank == 1
