"""SamplingParams: vLLM defaults, normalisation, and validation messages naming the bad value."""
import pytest

from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.max_tokens, p.min_tokens) == (None, 16, 0)
    assert p.stop == [] and p.stop_token_ids == []
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert p.logprobs is None and p.prompt_logprobs is None
    assert MAX_LOGPROBS == 20
    assert not p.greedy


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=(5, 7), temperature=1, max_tokens=None)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 7]
    assert isinstance(p.temperature, float) and p.max_tokens is None
    assert SamplingParams(stop=["a", "bcd"]).max_stop_len == 3
    assert SamplingParams().max_stop_len == 0


@pytest.mark.parametrize("kwargs, greedy", [
    (dict(temperature=0.0), True), (dict(temperature=0), True), (dict(top_k=1), True),
    (dict(temperature=0.7, top_k=1), True), (dict(temperature=0.7), False),
    (dict(temperature=0.7, top_k=2), False),
])
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(min_p=-0.01), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.1), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(n=0), "n"), (dict(n="2"), "n"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=3.0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"),
    (dict(prompt_logprobs=25), "prompt_logprobs"),
    (dict(seed=1.5), "seed"), (dict(seed="7"), "seed"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids"), (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(stop=[1]), "stop"), (dict(stop=[""]), "stop"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(typical_p=0.0), "typical_p"), (dict(typical_p=1.5), "typical_p"), (dict(typical_p="x"), "typical_p"),
    (dict(tfs_z=0.0), "tfs_z"), (dict(tfs_z=1.01), "tfs_z"), (dict(tfs_z=float("nan")), "tfs_z"),
    (dict(mirostat=3), "mirostat"), (dict(mirostat=-1), "mirostat"), (dict(mirostat=1.0), "mirostat"),
    (dict(mirostat_tau=0.0), "mirostat_tau"), (dict(mirostat_tau=-1.0), "mirostat_tau"),
    (dict(mirostat_eta=0.0), "mirostat_eta"), (dict(mirostat_eta="fast"), "mirostat_eta"),
    (dict(repeat_last_n=-2), "repeat_last_n"), (dict(repeat_last_n=1.5), "repeat_last_n"),
    (dict(sampler="no_such_sampler"), "sampler"), (dict(sampler=3), "sampler"),
    (dict(sampler="typical", mirostat=1), "sampler"), (dict(sampler="default", tfs_z=0.5), "sampler"),
    (dict(typical_p=0.5, tfs_z=0.5), "typical_p"),
])
def test_invalid_values_name_parameter_and_value(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert message.startswith(needle + " ")
    assert repr(next(iter(kwargs.values()))) in message or "min_tokens" in message


def test_boundaries_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2.0,
                   frequency_penalty=2.0, repetition_penalty=0.01, logprobs=20, prompt_logprobs=0,
                   min_tokens=4, max_tokens=4, seed=-3, stop_token_ids=[0])
    SamplingParams(top_p=1e-6, top_k=1, min_p=0.0, min_tokens=100, max_tokens=None)
    SamplingParams(typical_p=1.0, tfs_z=1e-6, mirostat=0, mirostat_tau=1e-3, mirostat_eta=1e-3, repeat_last_n=-1)
    SamplingParams(typical_p=1e-6, mirostat=2, tfs_z=0.5, repeat_last_n=0, sampler="mirostat2")
    SamplingParams(sampler="tfs", tfs_z=1.0, repeat_last_n=4096)


def test_ollama_option_defaults_leave_the_default_sampler():
    p = SamplingParams()
    assert (p.sampler, p.typical_p, p.tfs_z, p.mirostat, p.mirostat_tau, p.mirostat_eta, p.repeat_last_n) == (
        None, 1.0, 1.0, 0, 5.0, 0.1, -1)
    assert p.selected_sampler == "default"


def test_sampling_params_and_sampler_names_import_no_jax():
    """SamplingParams is plain data: building one, sampler name checks included, imports no JAX
    (the registry knows its names without the samplers themselves)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from jaxserve.sampling_params import SamplingParams\n"
            "from jaxserve import sampling\n"
            "SamplingParams(sampler='mirostat', mirostat=1)\n"
            "try:\n"
            "    SamplingParams(sampler='nope')\n"
            "except ValueError as e:\n"
            "    assert 'mirostat2' in str(e), e\n"
            "assert sampling.names()[:2] == ['default', 'typical']\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
