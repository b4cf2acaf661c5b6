"""The on-device sampler against a numpy reference of each transform (vLLM semantics)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampling import core as sampler
from jaxserve.sampling.core import SamplingRow, build_sampling_tensors, sample
from jaxserve.sampling_params import SamplingParams

V, W, E = 64, 32, 4  # vocab, history width, banned width of most tests
jit_sample = jax.jit(sample, static_argnames="num_top_logprobs")


def make_row(params=None, seed=0, step=0, prompt=(1, 2, 3), output=(), banned=()):
    return SamplingRow(params or SamplingParams(), seed, step, list(prompt), list(output), list(banned))


def tensors(rows, batch_size=None, history_width=W):
    return build_sampling_tensors(rows, batch_size or len(rows), history_width, banned_width=E)


def random_logits(rng, rows, vocab=V, scale=2.0):
    return (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)


# ---------------------------------------------------------------- numpy reference (float64)

def ref_penalised(logits, row):
    """vLLM: repetition over prompt+output, frequency/presence over output, then banned ids."""
    x = logits.astype(np.float64).copy()
    p = row.params
    seen = np.zeros(x.shape[0], bool)
    seen[list(row.prompt_ids) + list(row.output_ids)] = True
    counts = np.bincount(np.asarray(row.output_ids, int), minlength=x.shape[0])
    x = np.where(seen, np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
    x = x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    x[list(row.banned_ids)] = -np.inf
    return x


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_kept(x, top_k=-1, top_p=1.0, min_p=0.0):
    """Tokens surviving top-k, then top-p on the top-k renormalised probs, then min-p."""
    keep = np.ones(x.shape[0], bool)
    desc = np.sort(x)[::-1]
    if top_k > 0:
        keep &= x >= desc[top_k - 1]
    if top_p < 1.0:
        probs = np.sort(softmax(np.where(keep, x, -np.inf)))[::-1]
        before = np.cumsum(probs) - probs
        num_kept = int(np.sum(before < top_p))
        keep &= x >= desc[num_kept - 1]
    if min_p > 0.0:
        probs = softmax(x)
        keep &= probs >= min_p * probs.max()
    return keep


def top_p_margin(x, top_k, top_p):
    """Distance of the nearest cumulative mass to top_p (the reference is ambiguous near 0)."""
    keep = np.ones(x.shape[0], bool) if top_k <= 0 else x >= np.sort(x)[::-1][top_k - 1]
    cum = np.cumsum(np.sort(softmax(np.where(keep, x, -np.inf)))[::-1])
    return np.min(np.abs(cum - top_p))


# ---------------------------------------------------------------- host packing

def test_build_sampling_tensors_pads_and_maps():
    rows = [make_row(SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, min_p=0.1), seed=2**40 + 5,
                     step=3, prompt=[4, 5], output=[6]),
            make_row(SamplingParams(temperature=0.7, top_k=1, presence_penalty=0.5), seed=9,
                     prompt=[1], output=[2, 2], banned=[0, 7]),
            make_row(SamplingParams(temperature=0.0, top_p=0.5))]
    t = tensors(rows, batch_size=4)
    np.testing.assert_allclose(t.temperature, [0.7, 0.0, 0.0, 0.0])  # top_k=1 is greedy
    np.testing.assert_array_equal(t.top_k, [0, 0, 0, 0])             # -1 -> 0 (off)
    np.testing.assert_allclose(t.top_p, [0.9, 1.0, 1.0, 1.0])        # greedy rows: no filter
    np.testing.assert_allclose(t.min_p, [0.1, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(t.presence_penalty, [0.0, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(t.repetition_penalty, [1.0, 1.0, 1.0, 1.0])
    assert t.seeds.dtype == np.uint32 and t.seeds[0] == 5 ^ 2**8 and t.seeds[1] == 9
    np.testing.assert_array_equal(t.steps, [3, 0, 0, 0])
    np.testing.assert_array_equal(t.prompt_lens, [2, 1, 3, 0])
    # History only for rows with a penalty: the only readers.
    assert (t.token_history[0] == -1).all() and (t.token_history[2:] == -1).all()
    np.testing.assert_array_equal(t.token_history[1, :4], [1, 2, 2, -1])
    np.testing.assert_array_equal(t.banned_token_ids, [[-1] * E, [0, 7, -1, -1], [-1] * E, [-1] * E])
    assert t.token_history.shape == (4, W) and t.token_history.dtype == np.int32


def test_packed_values_are_reused_only_for_the_same_row_objects():
    hot, cold = SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=0.3, repetition_penalty=1.2)
    rows = [make_row(hot, step=1), make_row(cold, output=[2])]
    packed = sampler.PackedValues()
    first = build_sampling_tensors(rows, 4, W, banned_width=E, packed=packed)
    kept = packed.arrays
    rows[0].step = 2  # the engine moves its rows on in place; their parameters never change
    second = build_sampling_tensors(rows, 4, W, banned_width=E, packed=packed)
    assert packed.arrays is kept and not any(array.flags.writeable for array in kept)
    np.testing.assert_array_equal(second.seeds, first.seeds)
    np.testing.assert_array_equal(second.prompt_lens, first.prompt_lens)
    np.testing.assert_array_equal(second.steps, [2, 0, 0, 0])
    for name in ("temperature", "top_p", "repetition_penalty"):
        assert getattr(second, name) is getattr(first, name)  # the typed columns too, not packed again
    assert not packed.pluggable and second.sampler_ids is not None and not second.sampler_ids.any()
    # Another row in the same place (a request finished, the next took its slot) packs anew.
    rows[0] = make_row(cold, output=[2])
    third = build_sampling_tensors(rows, 4, W, banned_width=E, packed=packed)
    assert packed.arrays is not kept
    np.testing.assert_allclose(third.temperature, [0.3, 0.3, 0.0, 0.0])
    np.testing.assert_allclose(third.repetition_penalty, [1.2, 1.2, 1.0, 1.0])
    assert (third.token_history[0, :4] == [1, 2, 3, 2]).all()  # its penalty's history is written
    # Another batch size packs anew too.
    assert build_sampling_tensors(rows, 8, W, banned_width=E, packed=packed).temperature.shape == (8,)


def test_a_top_k_past_int32_packs_as_the_largest_k_not_an_overflow():
    t = tensors([make_row(SamplingParams(temperature=0.7, top_k=2**40))])
    assert t.top_k.dtype == np.int32 and t.top_k[0] == np.iinfo(np.int32).max  # >= V: off on the device


def test_build_sampling_tensors_rejects_overflow():
    with pytest.raises(ValueError, match="banned width"):
        tensors([make_row(banned=range(E + 1))])
    with pytest.raises(ValueError, match="history width"):
        tensors([make_row(SamplingParams(frequency_penalty=1.0), prompt=range(W), output=[1])])
    with pytest.raises(ValueError, match="do not fit"):
        tensors([make_row(), make_row()], batch_size=1)


# ---------------------------------------------------------------- transforms

PENALTY_PARAMS = [
    SamplingParams(temperature=0.0, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, frequency_penalty=1.5),
    SamplingParams(temperature=0.0, presence_penalty=-1.0, frequency_penalty=0.5),
    SamplingParams(temperature=0.0, repetition_penalty=0.6, presence_penalty=2.0),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, min_tokens=2),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=-2.0),
    SamplingParams(temperature=0.0, presence_penalty=1.0),
]


def penalty_rows(rng, logits):
    rows = []
    for i, params in enumerate(PENALTY_PARAMS):
        top = np.argsort(-logits[i])[:6]  # penalise likely tokens, so the argmax moves
        prompt = [int(top[0]), int(top[1]), 9, 9]
        output = [int(top[2]), int(top[2]), int(top[0]), int(rng.integers(V))]
        banned = [int(top[3]), int(top[4])] if params.min_tokens else []
        rows.append(make_row(params, prompt=prompt, output=output, banned=banned))
    return rows


def test_penalties_move_the_right_logits():
    rng = np.random.default_rng(0)
    logits = random_logits(rng, len(PENALTY_PARAMS))
    rows = penalty_rows(rng, logits)
    t = tensors(rows)
    got = jax.jit(sampler._apply_penalties)(jnp.asarray(logits), t)
    got = np.asarray(jax.jit(sampler._ban)(got, t.banned_token_ids))
    for i, row in enumerate(rows):
        np.testing.assert_allclose(got[i], ref_penalised(logits[i], row), rtol=1e-6, atol=1e-6)


def test_greedy_takes_argmax_of_penalised_logits():
    rng = np.random.default_rng(1)
    logits = random_logits(rng, len(PENALTY_PARAMS))
    rows = penalty_rows(rng, logits)
    out = jit_sample(jnp.asarray(logits), tensors(rows))
    expected = [int(np.argmax(ref_penalised(logits[i], row))) for i, row in enumerate(rows)]
    np.testing.assert_array_equal(out.tokens, expected)
    # The penalties changed at least some choices, so this is not just argmax(logits).
    assert (np.asarray(out.tokens) != logits.argmax(-1)).sum() >= 3


def test_temperature_zero_equals_top_k_one_equals_argmax():
    rng = np.random.default_rng(2)
    logits = random_logits(rng, 8)
    argmax = logits.argmax(-1)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=1)):
        rows = [make_row(params, seed=s) for s in range(8)]
        np.testing.assert_array_equal(jit_sample(jnp.asarray(logits), tensors(rows)).tokens, argmax)
    # On device too, without the host's greedy mapping: a non-greedy row with top_k=1.
    t = tensors([make_row(SamplingParams(temperature=0.9), seed=s) for s in range(8)])
    t = dataclasses.replace(t, top_k=np.ones_like(t.top_k))  # the packed columns are read-only (shared)
    np.testing.assert_array_equal(jit_sample(jnp.asarray(logits), t).tokens, argmax)


FILTERS = [dict(top_k=5), dict(top_p=0.6), dict(min_p=0.3), dict(top_k=12, top_p=0.8),
           dict(top_k=10, top_p=0.9, min_p=0.1), dict(top_p=0.95, min_p=0.05)]


@pytest.mark.parametrize("cap", [256, 8])  # 8: most rows leave the prefix and take the bisection
def test_filter_thresholds_match_reference(monkeypatch, cap):
    monkeypatch.setattr(sampler, "TOP_K_CAP", cap)
    rng = np.random.default_rng(3)
    x = random_logits(rng, 16, scale=1.5)
    top_k = np.array([0, 3, 8, 20, 0, 0, 5, 40, 1, 0, 63, 12, 2, 0, 9, 16], np.int32)
    top_p = np.array([0.5, 1, 1, 1, 0.9, 0.2, 0.7, 0.95, 1, 0.999, 0.6, 0.6, 0.8, 0.05, 0.4, 0.8],
                     np.float32)
    for i in range(16):
        if top_p[i] < 1:
            assert top_p_margin(x[i].astype(np.float64), top_k[i], top_p[i]) > 1e-4
    # Rows 11 and 15 keep fewer tokens than top-p alone would: top-p reads renormalised probs.
    for i in (11, 15):
        assert ref_kept(x[i], top_k[i], top_p[i]).sum() < ref_kept(x[i], 0, top_p[i]).sum() < top_k[i]
    # A new function object, so jit traces again with the patched cap.
    cutoff_fn = jax.jit(lambda *args: sampler.top_k_top_p_cutoff(*args))
    row_max = x.max(-1)
    cutoff = np.asarray(cutoff_fn(x, np.exp(x - row_max[:, None]), row_max, top_k, top_p))
    for i in range(16):
        expected = ref_kept(x[i].astype(np.float64), top_k[i], float(top_p[i]))
        np.testing.assert_array_equal(x[i] >= cutoff[i], expected, err_msg=f"row {i}")


def test_narrow_prefix_thresholds_match_reference_whatever_the_batch(monkeypatch):
    # Rows with top_k <= NARROW_TOP_K read only that much of the prefix: alone in a step (narrow
    # lax.top_k) or beside wider rows (a slice of the full prefix), with the same thresholds.
    monkeypatch.setattr(sampler, "TOP_K_CAP", 32)
    monkeypatch.setattr(sampler, "NARROW_TOP_K", 8)
    rng = np.random.default_rng(31)
    x = random_logits(rng, 8, scale=1.5)
    top_p = np.array([1, 0.9, 0.7, 1, 1, 0.5, 0.8, 0.95], np.float32)
    narrow_only = np.array([3, 8, 5, 1, 0, 7, 2, 6], np.int32)
    mixed = np.array([3, 8, 20, 1, 0, 30, 2, 6], np.int32)  # rows 2 and 5 beyond the narrow width
    cutoff_fn = jax.jit(lambda *args: sampler._top_k_rows_cutoff(*args))  # traced with the patched widths
    row_max = x.max(-1)
    cutoffs = {}
    for name, top_k in (("narrow", narrow_only), ("mixed", mixed)):
        p = np.where(top_k > 0, top_p, 1.0).astype(np.float32)  # as _sample_rows passes them
        cutoffs[name] = np.asarray(cutoff_fn(x, np.exp(x - row_max[:, None]), row_max, top_k, p))
        for i in np.flatnonzero(top_k):
            if p[i] < 1:
                assert top_p_margin(x[i].astype(np.float64), top_k[i], p[i]) > 1e-4
            expected = ref_kept(x[i].astype(np.float64), top_k[i], float(p[i]))
            np.testing.assert_array_equal(x[i] >= cutoffs[name][i], expected, err_msg=f"{name} row {i}")
    same = narrow_only == mixed
    np.testing.assert_array_equal(cutoffs["narrow"][same], cutoffs["mixed"][same])


def test_inverse_cdf_matches_reference():
    rng = np.random.default_rng(8)
    vocab = 300  # not a multiple of the chunk width: exercises the padding
    rows = 512
    x = random_logits(rng, rows, vocab)
    x[:, rng.permutation(vocab)[:200]] = -np.inf  # filtered tokens
    x[-1, :] = -np.inf
    x[-1, 17] = 0.0  # a single survivor
    u = rng.uniform(size=rows).astype(np.float32)
    u[-2] = np.nextafter(np.float32(1), np.float32(0))
    got = np.asarray(jax.jit(sampler.inverse_cdf)(np.exp(x - x.max(-1, keepdims=True)), u))
    for i in range(rows):
        cum = np.cumsum(softmax(x[i].astype(np.float64)))
        expected = min(int(np.sum(cum <= u[i])), int(np.flatnonzero(np.isfinite(x[i]))[-1]))
        # float32 vs float64 sums may only disagree when u sits on a boundary of the CDF.
        assert got[i] == expected or np.min(np.abs(cum - u[i])) < 1e-5, (i, got[i], expected)
    assert np.isfinite(x[np.arange(rows), got]).all() and got[-1] == 17


def test_first_above_clamps_to_last_positive():
    # Float rounding can put the target past the last cumulative sum: never pick zero mass.
    cum = jnp.array([[1.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    positive = jnp.array([[True, True, False, False], [True, True, True, True]])
    got = sampler._first_above(cum, jnp.array([2.5, 1.5]), positive)
    np.testing.assert_array_equal(got, [1, 1])


@pytest.mark.parametrize("filters", FILTERS)
def test_filtered_tokens_are_never_sampled(filters):
    rng = np.random.default_rng(4)
    # A few plausible tokens and a long tail: every kept token should show up in 256 draws.
    base = np.concatenate([[3.0, 2.8, 2.5, 2.3, 2.0, 1.8, 1.5, 1.2], rng.uniform(-3, 0.5, V - 8)])
    logits = np.tile(rng.permutation(base).astype(np.float32), (256, 1))
    params = SamplingParams(temperature=0.7, **filters)
    rows = [make_row(params, seed=s, step=s % 5) for s in range(256)]
    tokens = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows)).tokens)
    kept = ref_kept(logits[0].astype(np.float64) / 0.7, params.top_k, params.top_p, params.min_p)
    assert 1 < kept.sum() < V
    assert kept[tokens].all(), f"sampled filtered tokens {sorted(set(tokens[~kept[tokens]]))}"
    if kept.sum() <= 6:  # small kept sets are covered, so the filter is not too strict either
        assert set(tokens) == set(np.flatnonzero(kept))


def test_banned_ids_never_sampled():
    rng = np.random.default_rng(5)
    logits = np.tile(random_logits(rng, 1), (128, 1))
    top = np.argsort(-logits[0])[:E]
    rows = [make_row(SamplingParams(temperature=1.5, min_tokens=3), seed=s, banned=top)
            for s in range(128)]
    tokens = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows)).tokens)
    assert not np.isin(tokens, top).any()


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(6)
    logits = random_logits(rng, 8)
    rows = [make_row(SamplingParams(temperature=t, top_k=k, repetition_penalty=r), seed=i,
                     prompt=[1, 2], output=[int(logits[i].argmax())])
            for i, (t, k, r) in enumerate([(0, -1, 1), (0.5, 3, 1.5), (1.0, -1, 1), (0.9, 5, 2.0),
                                           (0, -1, 1.2), (1.2, -1, 1), (0.3, 2, 1), (0.7, -1, 1.1)])]
    out = jit_sample(jnp.asarray(logits), tensors(rows), num_top_logprobs=5)
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    ref = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))  # log_softmax
    tokens = np.asarray(out.tokens)
    np.testing.assert_allclose(out.logprobs, ref[np.arange(8), tokens], rtol=1e-5, atol=1e-5)
    order = np.argsort(-logits, axis=-1)[:, :5]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, order, -1), atol=1e-5)
    # The same helper scores given ids (prompt_logprobs).
    ids = np.arange(8, dtype=np.int32) * 7
    lp, top_ids, top_lp = jax.jit(sampler.compute_logprobs, static_argnames="num_top_logprobs")(
        jnp.asarray(logits), ids, num_top_logprobs=3)
    np.testing.assert_allclose(lp, ref[np.arange(8), ids], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(top_ids, order[:, :3])
    none = jit_sample(jnp.asarray(logits), tensors(rows), num_top_logprobs=0)
    assert none.top_ids.shape == (8, 0) and none.top_logprobs.shape == (8, 0)
    np.testing.assert_array_equal(none.tokens, tokens)


# ---------------------------------------------------------------- randomness

@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.5, top_k=4),
                                    dict(temperature=1.0, top_p=0.7), dict(temperature=0.8, min_p=0.2)])
def test_empirical_distribution_matches_reference(kwargs):
    vocab, n = 8, 4000
    x = np.array([1.0, 0.2, -0.5, 1.6, 0.0, -1.2, 0.9, 0.4])
    params = SamplingParams(**kwargs)
    rows = [make_row(params, seed=s, step=3) for s in range(n)]
    logits = np.tile(x.astype(np.float32), (n, 1))
    tokens = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows), num_top_logprobs=0).tokens)
    scaled = x / params.temperature
    keep = ref_kept(scaled, params.top_k, params.top_p, params.min_p)
    expected = softmax(np.where(keep, scaled, -np.inf))
    freq = np.bincount(tokens, minlength=vocab) / n
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert (np.abs(freq - expected) <= tolerance).all(), (freq, expected)


# Top-p alone is drawn without a threshold: draw, keep the token if it lies in the nucleus, else
# draw again above it (sampling/core.py _draw_in_nuclei). These check that the tokens it keeps
# have the nucleus distribution, including the redraw groups, the bound's exact fallback and
# nuclei far wider than the sorted prefix.
NUCLEI = [
    # near-flat logits: most of the vocabulary is in the nucleus, the first draw is mostly kept
    (np.random.default_rng(21).uniform(-0.5, 0.5, V), dict(temperature=1.0, top_p=0.9)),
    # a peaked row and a small top_p: most first draws are rejected, some rows redraw twice or more
    (np.random.default_rng(22).standard_normal(V) * 2.0, dict(temperature=0.7, top_p=0.3)),
    # min_p cuts inside the nucleus's candidates
    (np.random.default_rng(23).uniform(-1.5, 1.5, V), dict(temperature=1.0, top_p=0.8, min_p=0.4)),
]


def nucleus_frequencies(x, params, n, sample_fn=jit_sample):
    rows = [make_row(params, seed=s, step=1) for s in range(n)]
    logits = np.tile(x.astype(np.float32), (n, 1))
    tokens = np.asarray(sample_fn(jnp.asarray(logits), tensors(rows), num_top_logprobs=0).tokens)
    scaled = x.astype(np.float32).astype(np.float64) / params.temperature
    keep = ref_kept(scaled, params.top_k, params.top_p, params.min_p)
    return tokens, keep, softmax(np.where(keep, scaled, -np.inf))


@pytest.mark.parametrize("case", range(len(NUCLEI)))
def test_nucleus_draws_have_the_nucleus_distribution(case):
    x, kwargs = NUCLEI[case]
    params = SamplingParams(**kwargs)
    assert top_p_margin(x / params.temperature, -1, params.top_p) > 1e-3  # the reference is unambiguous
    n = 6000
    tokens, keep, expected = nucleus_frequencies(x, params, n)
    assert 1 < keep.sum() < V
    assert keep[tokens].all(), f"sampled outside the nucleus: {sorted(set(tokens[~keep[tokens]]))}"
    freq = np.bincount(tokens, minlength=V) / n
    tolerance = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9
    assert (np.abs(freq - expected) <= tolerance).all(), np.abs(freq - expected).max()


def test_nucleus_rows_past_the_redraw_bound_take_the_exact_threshold(monkeypatch):
    # With no redraws allowed, every rejected row takes the exact threshold's draw: still the
    # nucleus distribution, and its tokens differ from the redrawn ones.
    x, kwargs = NUCLEI[1]
    params = SamplingParams(**kwargs)
    n = 6000
    redrawn = nucleus_frequencies(x, params, n)[0]
    monkeypatch.setattr(sampler, "_MAX_REDRAWS", 0)
    fresh = jax.jit(lambda logits, t, num_top_logprobs: sample(logits, t, num_top_logprobs=num_top_logprobs),
                    static_argnames="num_top_logprobs")  # a new function: traced with the patched bound
    tokens, keep, expected = nucleus_frequencies(x, params, n, fresh)
    assert keep[tokens].all()
    freq = np.bincount(tokens, minlength=V) / n
    assert (np.abs(freq - expected) <= 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-9).all()
    assert (tokens != redrawn).mean() > 0.1


def test_nan_row_under_top_p_neither_hangs_nor_disturbs_its_companions():
    rng = np.random.default_rng(24)
    logits = random_logits(rng, 4)
    logits[1] = np.nan
    params = SamplingParams(temperature=1.0, top_p=0.9)
    rows = [make_row(params, seed=s) for s in range(4)]
    tokens = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows), num_top_logprobs=0).tokens)
    assert ((0 <= tokens) & (tokens < V)).all()
    alone = [np.asarray(jit_sample(jnp.asarray(logits[i:i + 1]), tensors(rows[i:i + 1]), num_top_logprobs=0).tokens)[0]
             for i in (0, 2, 3)]
    np.testing.assert_array_equal(tokens[[0, 2, 3]], alone)


def test_seeded_rows_reproduce_whatever_the_batch(monkeypatch):
    # A small prefix cap, so that companions force the bisection fallback in some batches.
    monkeypatch.setattr(sampler, "TOP_K_CAP", 16)
    fresh_sample = jax.jit(lambda logits, t: sample(logits, t, num_top_logprobs=0))
    vocab, width = 512, 64
    rng = np.random.default_rng(7)
    targets = [
        (SamplingParams(temperature=0.9), 11, 0),
        (SamplingParams(temperature=1.1, top_p=0.8, top_k=10), 12, 4),   # settled by the prefix
        (SamplingParams(temperature=1.0, top_p=0.97), 13, 2),            # needs the fallback
        (SamplingParams(temperature=0.7, top_k=100, min_p=0.01), 14, 9),  # top_k beyond prefix
        (SamplingParams(temperature=1.0, repetition_penalty=1.5, frequency_penalty=0.3), 15, 1),
        (SamplingParams(temperature=0.0, presence_penalty=1.0), 16, 3),
    ]
    companions = [
        (SamplingParams(temperature=0.0), 1, 0),
        (SamplingParams(temperature=1.0, top_p=0.999), 2, 5),
        (SamplingParams(temperature=0.5, top_k=300, presence_penalty=0.5), 3, 1),
        (SamplingParams(temperature=2.0, min_tokens=5), 4, 0),
    ]
    target_logits = random_logits(rng, len(targets), vocab, scale=1.0)
    companion_logits = random_logits(rng, len(companions), vocab, scale=1.0)

    def run(entries, batch_size):
        rows = [make_row(p, seed=seed, step=step, prompt=[5, 6, seed], output=[7, seed, seed],
                         banned=[0, 1, 2] if p.min_tokens else [])
                for p, seed, step in (e[0] for e in entries)]
        logits = np.zeros((batch_size, vocab), np.float32)
        logits[:len(entries)] = [e[1] for e in entries]
        t = build_sampling_tensors(rows, batch_size, width, banned_width=E)
        return np.asarray(fresh_sample(jnp.asarray(logits), t).tokens)

    tagged = [(p, target_logits[i]) for i, p in enumerate(targets)]
    others = [(p, companion_logits[i]) for i, p in enumerate(companions)]
    alone = [run([entry], 1)[0] for entry in tagged]
    together = run(tagged, 16)[:len(tagged)]
    mixed_order = others[:2] + tagged[::-1] + others[2:]
    mixed = run(mixed_order, 16)[2:2 + len(tagged)][::-1]
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(mixed, alone)

    # The key really depends on seed and step: the same row at other steps moves.
    stepped = run([((targets[0][0], targets[0][1], s), target_logits[0]) for s in range(16)], 16)
    assert len(set(stepped)) > 2
