"""typical_p, tfs_z, Mirostat 1 and 2 and repeat_last_n against numpy re-implementations of the
published algorithms (llama.cpp's update rules), on fixed logits and seeds.

The draw is reproduced exactly: numpy inverts its own CDF with the uniform JAX gives each row
(`sampling.uniforms`), so tokens must match one for one, not just in distribution.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import sampling
from jaxserve.sampling import core as sampler
from jaxserve.sampling.core import SamplingRow, build_sampling_tensors, sample
from jaxserve.sampling_params import SamplingParams

V = 64


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def rows_for(params_list, seeds, step=0, state=None):
    return [SamplingRow(p, seed, step, [1, 2, 3], [], [], None if state is None else [state[i]])
            for i, (p, seed) in enumerate(zip(params_list, seeds))]


def pack(rows, width=8):
    return build_sampling_tensors(rows, len(rows), width, banned_width=4, samplers=sampling.snapshot().samplers)


def row_uniforms(t):
    return np.asarray(sampling.uniforms(sampling.row_keys(t.seeds, t.steps)), np.float64)


_jitted = {}


def run(name, logits, t):
    # One function per (sampler, TOP_K_CAP), so a monkeypatched cap is traced in.
    key = (name, sampler.TOP_K_CAP)
    if key not in _jitted:
        _jitted[key] = jax.jit(lambda *args: sampling.get(name).fn(*args))
    fn = _jitted[key]
    tokens, state = fn(jnp.asarray(logits), t, jnp.asarray(t.sampler_state), sampling.row_keys(t.seeds, t.steps))
    return np.asarray(tokens), np.asarray(state)


# ---------------------------------------------------------------- numpy references (float64)

def ref_draw(weights, u):
    """Inverse CDF in vocabulary order, as the sampler draws (never a zero-weight token)."""
    cum = np.cumsum(weights / weights.sum())
    return min(int(np.sum(cum <= u)), int(np.flatnonzero(weights > 0)[-1])), np.min(np.abs(cum - u))


def ref_typical(x, tau):
    """Meister et al.: sort by |surprise - entropy|, keep until the mass first exceeds tau."""
    p = softmax(x)
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    entropy = -np.sum(np.where(p > 0, p * logp, 0.0))
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    cum = np.cumsum(p[order])
    num_kept = next((i + 1 for i in range(len(cum)) if cum[i] > tau), len(cum))
    keep = np.zeros(len(x), bool)
    keep[order[:num_kept]] = True
    return keep, np.min(np.abs(cum - tau))


def ref_tail_free(x, z):
    """Bricken: normalised |second derivative| of the sorted probabilities, cut where its running
    sum first exceeds z (at least one token kept)."""
    order = np.argsort(-x, kind="stable")
    p = softmax(x)[order]
    d2 = np.abs(np.diff(p, n=2))
    d2 = d2 / d2.sum() if d2.sum() > 1e-6 else np.full(len(d2), 1.0 / len(d2))
    cum = np.cumsum(d2)
    num_kept = next((max(i, 1) for i in range(len(cum)) if cum[i] > z), len(x))
    keep = x >= x[order[num_kept - 1]]
    return keep, np.min(np.abs(cum - z))


def ref_mirostat(x, mu, tau, eta, u, m=100):
    """Basu et al. Mirostat 1 with llama.cpp's estimate of s over the top m tokens."""
    order = np.argsort(-x, kind="stable")
    p = softmax(x)
    ps = p[order]
    i = np.arange(min(m - 1, len(x) - 1))
    t_i, b_i = np.log((i + 2) / (i + 1)), np.log(ps[i] / ps[i + 1])
    s_hat = np.sum(t_i * b_i) / np.sum(t_i * t_i)
    eps = s_hat - 1
    k_float = (eps * 2.0 ** mu / (1 - len(x) ** -eps)) ** (1 / s_hat)
    k = int(np.clip(k_float, 1, len(x)))
    keep = x >= x[order[k - 1]]
    q = np.where(keep, p, 0.0)
    token, margin = ref_draw(q, u)
    surprise = -np.log2(q[token] / q.sum())
    return token, mu - eta * (surprise - tau), min(margin, abs(k_float - round(k_float)))


def ref_mirostat2(x, mu, tau, eta, u):
    p = softmax(x)
    keep = -np.log2(p) <= mu
    keep[np.argmax(x)] = True
    q = np.where(keep, p, 0.0)
    token, margin = ref_draw(q, u)
    surprise = -np.log2(q[token] / q.sum())
    return token, mu - eta * (surprise - tau), min(margin, np.min(np.abs(-np.log2(p) - mu)))


# ---------------------------------------------------------------- filters + draw

@pytest.mark.parametrize("cap", [256, 8])  # 8: most rows leave the top-k prefix for the exact fallback
@pytest.mark.parametrize("name, field, values, reference", [
    ("typical", "typical_p", [0.2, 0.5, 0.8, 0.95, 0.3, 0.6, 0.9, 0.99], ref_typical),
    ("tfs", "tfs_z", [0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.6, 0.8], ref_tail_free),
])
def test_filter_and_draw_match_reference(monkeypatch, cap, name, field, values, reference):
    monkeypatch.setattr(sampler, "TOP_K_CAP", cap)
    rng = np.random.default_rng(11)
    n = 32
    logits = (rng.standard_normal((n, V)) * rng.uniform(0.5, 3.0, (n, 1))).astype(np.float32)
    temps = rng.choice([0.7, 1.0, 1.3], n)
    params = [SamplingParams(temperature=float(temps[i]), **{field: values[i % len(values)]}) for i in range(n)]
    assert {p.selected_sampler for p in params} == {name}
    t = pack(rows_for(params, seeds=range(100, 100 + n)))
    tokens, _ = run(name, logits, t)
    u = row_uniforms(t)
    narrow = 0
    for i in range(n):
        x = logits[i].astype(np.float64) / temps[i]
        keep, margin = reference(x, values[i % len(values)])
        assert margin > 1e-5, f"row {i} sits on a boundary; pick other logits"
        expected, draw_margin = ref_draw(np.where(keep, softmax(x), 0.0), u[i])
        assert draw_margin > 1e-5
        assert tokens[i] == expected, (i, tokens[i], expected, np.flatnonzero(keep))
        narrow += keep.sum() < V // 2
    assert narrow >= n // 4  # the filters really cut something


@pytest.mark.parametrize("name", ["typical", "tfs"])
def test_filter_keeps_exactly_the_reference_set(name):
    # Many draws of one row: every token drawn is allowed, and every allowed token shows up.
    rng = np.random.default_rng(12)
    x = np.concatenate([[3.0, 2.7, 2.5, 2.1, 1.9, 1.4], rng.uniform(-4, 0, V - 6)]).astype(np.float32)
    field, value = ("typical_p", 0.6) if name == "typical" else ("tfs_z", 0.7)
    params = [SamplingParams(**{field: value}) for _ in range(512)]
    t = pack(rows_for(params, seeds=range(512)))
    tokens, _ = run(name, np.tile(x, (512, 1)), t)
    keep, _ = (ref_typical if name == "typical" else ref_tail_free)(x.astype(np.float64), value)
    assert 1 < keep.sum() < 8
    assert set(tokens.tolist()) == set(np.flatnonzero(keep).tolist())


def test_typical_can_drop_the_most_likely_token():
    # One dominant token far more likely than typical: the entropy sits among the others.
    x = np.random.default_rng(14).uniform(-0.3, 0.3, V).astype(np.float32)  # distinct: no ties
    x[5] = 4.0
    keep, _ = ref_typical(x.astype(np.float64), 0.5)
    assert not keep[5]
    t = pack(rows_for([SamplingParams(typical_p=0.5)] * 64, seeds=range(64)))
    tokens, _ = run("typical", np.tile(x, (64, 1)), t)
    assert 5 not in tokens and keep[tokens].all()


def test_greedy_rows_take_argmax_and_keep_state():
    rng = np.random.default_rng(13)
    logits = rng.standard_normal((4, V)).astype(np.float32)
    for name, kwargs in [("typical", dict(typical_p=0.5)), ("tfs", dict(tfs_z=0.5)),
                         ("mirostat", dict(mirostat=1)), ("mirostat2", dict(mirostat=2))]:
        t = pack(rows_for([SamplingParams(temperature=0.0, **kwargs)] * 4, seeds=range(4)))
        tokens, state = run(name, logits, t)
        np.testing.assert_array_equal(tokens, logits.argmax(-1))
        np.testing.assert_array_equal(state, t.sampler_state)


# ---------------------------------------------------------------- mirostat

@pytest.mark.parametrize("cap", [256, 8])
@pytest.mark.parametrize("version, reference", [(1, ref_mirostat), (2, ref_mirostat2)])
def test_mirostat_tokens_and_mu_follow_reference_over_steps(monkeypatch, cap, version, reference):
    monkeypatch.setattr(sampler, "TOP_K_CAP", cap)
    rng = np.random.default_rng(20 + version)
    n, steps = 12, 6
    taus = rng.uniform(1.0, 4.0, n)
    etas = rng.uniform(0.05, 0.5, n)
    params = [SamplingParams(mirostat=version, mirostat_tau=float(taus[i]), mirostat_eta=float(etas[i]),
                             temperature=0.8 if i % 3 == 0 else 1.0) for i in range(n)]
    name = params[0].selected_sampler
    state, mu = None, 2.0 * taus  # mu starts at 2 tau
    for step in range(steps):
        logits = (rng.standard_normal((n, V)) * 2.5).astype(np.float32)
        rows = rows_for(params, seeds=range(7, 7 + n), step=step, state=state)
        if state is None:
            rows = [SamplingRow(r.params, r.seed, r.step, r.prompt_ids, r.output_ids, r.banned_ids) for r in rows]
        t = pack(rows)
        np.testing.assert_allclose(t.sampler_state[:, 0], mu, rtol=1e-5)
        tokens, new_state = run(name, logits, t)
        u = row_uniforms(t)
        for i in range(n):
            x = logits[i].astype(np.float64) / params[i].temperature
            token, next_mu, margin = reference(x, mu[i], taus[i], etas[i], u[i])
            assert margin > 1e-4, f"step {step} row {i} is on a boundary"
            assert tokens[i] == token, (step, i)
            mu[i] = next_mu
        np.testing.assert_allclose(new_state[:, 0], mu, rtol=1e-4, atol=1e-4)
        state = new_state[:, 0].tolist()
        mu = new_state[:, 0].astype(np.float64)  # follow the device's mu, so rounding does not accumulate


def test_mirostat_holds_the_surprise_near_tau():
    # The point of the algorithm: after a few dozen tokens the observed surprise averages ~tau.
    rng = np.random.default_rng(30)
    x = np.sort(rng.standard_normal(4096) * 3.0)[::-1].astype(np.float32)  # a long Zipf-ish tail
    for version in (1, 2):
        params = SamplingParams(mirostat=version, mirostat_tau=3.0, mirostat_eta=0.3)
        state, surprises = None, []
        for step in range(80):
            t = pack([SamplingRow(params, 5, step, [1], [], [], state)])
            tokens, new_state = run(params.selected_sampler, x[None], t)
            surprises.append(-np.log2(softmax(x.astype(np.float64))[tokens[0]]))
            state = new_state[0, :1].tolist()
        assert abs(np.mean(surprises[40:]) - 3.0) < 1.0, (version, np.mean(surprises[40:]))


# ---------------------------------------------------------------- repeat_last_n

def ref_penalised(x, prompt, output, p):
    """vLLM penalties over the last repeat_last_n tokens of prompt + output (Ollama's window)."""
    x = x.astype(np.float64).copy()
    n = p.repeat_last_n
    if n == 0:
        return x
    if n > 0:
        output = output[max(0, len(output) - n):]
        prompt = prompt[len(prompt) - min(len(prompt), n - len(output)):]
    seen = np.zeros(len(x), bool)
    seen[list(prompt) + list(output)] = True
    counts = np.bincount(np.asarray(output, int), minlength=len(x))
    x = np.where(seen, np.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


@pytest.mark.parametrize("repeat_last_n", [-1, 0, 1, 3, 6, 9, 40])
def test_repeat_last_n_windows_every_penalty(repeat_last_n):
    rng = np.random.default_rng(40)
    logits = (rng.standard_normal((6, V)) * 2).astype(np.float32)
    rows = []
    for i in range(6):
        top = np.argsort(-logits[i])
        prompt = [int(top[0]), int(top[1]), int(top[2]), 9]
        output = [int(top[3]), int(top[0]), int(top[4]), int(top[1]), 9]
        params = SamplingParams(temperature=0.0, repeat_last_n=repeat_last_n,
                                **[dict(repetition_penalty=3.0), dict(frequency_penalty=2.0),
                                   dict(presence_penalty=2.0), dict(repetition_penalty=0.5, frequency_penalty=1.0),
                                   dict(repetition_penalty=2.0, presence_penalty=-1.0),
                                   dict(frequency_penalty=-1.5)][i])
        rows.append(SamplingRow(params, i, len(output), prompt, output, []))
    t = build_sampling_tensors(rows, 6, 16, banned_width=4)
    got = np.asarray(jax.jit(sampler._apply_penalties)(jnp.asarray(logits), t))
    for i, row in enumerate(rows):
        expected = ref_penalised(logits[i], row.prompt_ids, row.output_ids, row.params)
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6, err_msg=f"row {i}")
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(logits), t).tokens)
    expected = [int(np.argmax(ref_penalised(logits[i], r.prompt_ids, r.output_ids, r.params)))
                for i, r in enumerate(rows)]
    np.testing.assert_array_equal(tokens, expected)
    if repeat_last_n == 0:
        assert (t.token_history == -1).all()  # off: nothing to scatter, the cheap path
