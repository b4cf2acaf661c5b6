"""Ollama options -> SamplingParams (Ollama's defaults, num_predict/num_ctx, repeat_last_n), errors,
stats in nanoseconds, and model descriptions the `ollama` client's own types accept; no server."""
from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import pytest
from ollama._types import ListResponse, ProcessResponse, ShowResponse

from jaxserve.server import ollama_protocol as proto
from jaxserve.server.model_card import ModelCard
from jaxserve.server.model_pool import LoadedModel, parse_keep_alive
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.validation import RequestError

# Ollama's extra samplers and penalty window, where SamplingParams has them, pass straight through.
HAS_OLLAMA_SAMPLERS = "repeat_last_n" in {f.name for f in dataclasses.fields(SamplingParams)}


def _params(options=None, prompt=10, max_len=100):
    return proto.parse_options({"options": options} if options is not None else {}, num_prompt_tokens=prompt,
                               max_model_len=max_len)


def test_ollama_defaults_and_context_filling():
    p = _params()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty) == (0.8, 40, 0.9, 0.0, 1.1)
    assert p.seed is None and p.max_tokens == 90  # num_predict -1: up to the context
    assert _params({"num_predict": -2}).max_tokens == 90
    assert _params({"num_predict": 5}).max_tokens == 5
    assert _params({"num_predict": 500}).max_tokens == 90
    assert _params({"num_ctx": 30}).max_tokens == 20
    assert _params({"num_ctx": 1000}).max_tokens == 90  # the server's limit still holds


def test_options_map_onto_vllm_fields():
    p = _params({"temperature": 0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 7, "stop": ["\n", "x"],
                 "repeat_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.25, "num_predict": 3,
                 "num_thread": 4, "num_gpu": 0, "mirostat": 0, "typical_p": 1.0})
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.stop) == (0.0, 5, 0.5, 0.1, 7, ["\n", "x"])
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.3, 0.5, 0.25)
    assert _params({"seed": -1}).seed is None
    off = _params({"repeat_last_n": 0, "repeat_penalty": 1.5, "presence_penalty": 1.0})
    if HAS_OLLAMA_SAMPLERS:
        assert off.repeat_last_n == 0 and _params().repeat_last_n == 64  # Ollama's default window
    else:  # no windows: 0 still turns the penalties off
        assert (off.repetition_penalty, off.presence_penalty) == (1.0, 0.0)


def test_typical_tfs_and_mirostat_pass_through_or_are_refused():
    options = {"typical_p": 0.5, "mirostat_tau": 4.0}
    if HAS_OLLAMA_SAMPLERS:
        p = _params(options)
        assert (p.typical_p, p.mirostat_tau) == (0.5, 4.0)
        assert _params({"mirostat": 2, "mirostat_eta": 0.2}).mirostat == 2
    else:
        with pytest.raises(RequestError, match="options.typical_p is not supported"):
            _params(options)
        assert _params({"mirostat_tau": 4.0, "tfs_z": 1.0}).temperature == 0.8  # no-op values are fine


@pytest.mark.parametrize("options, words", [
    ({"temperature": "hot"}, "options.temperature"),
    ({"top_p": 0}, "options.top_p"),
    ({"repeat_penalty": 0}, "options.repeat_penalty"),
    ({"num_predict": 0}, "options.num_predict"),
    ({"num_predict": -3}, "options.num_predict"),
    ({"num_ctx": 0}, "options.num_ctx"),
    ({"num_ctx": 10}, "context length is 10"),
    ({"mirostat": 5}, "options.mirostat"),
    ({"stop": [1]}, "options.stop"),
])
def test_bad_options_name_the_option(options, words):
    with pytest.raises(RequestError) as e:
        _params(options)
    assert words in e.value.message and e.value.status == 400


def test_unsupported_request_fields_are_refused():
    for body in ({"format": "yaml"}, {"images": ["aGk="]}, {"suffix": "end"}, {"template": "{{ .Prompt }}"}):
        with pytest.raises(RequestError, match="not|does not|must be"):
            proto.refuse_unsupported(body)
    proto.refuse_unsupported({"format": "", "think": False, "keep_alive": "5m"})
    proto.refuse_unsupported({"format": "json"})
    # thinking needs a reasoning parser; tools are read (tests/server/test_tool_calls*.py)
    no_reasoning = SimpleNamespace(reasoning=None)
    with pytest.raises(RequestError, match="does not support thinking"):
        proto.think({"think": True}, "m", no_reasoning)
    assert proto.think({"think": False}, "m", no_reasoning) is False
    assert proto.think({}, "m", no_reasoning) is None
    assert proto.format_constraint({"format": "json"}).json_object
    assert proto.format_constraint({"format": {"type": "object"}}).json == {"type": "object"}
    assert proto.format_constraint({"format": ""}) is None


def test_final_stats_are_nanoseconds():
    stats = proto.final_stats(start=10.0, arrival=10.001, first_token=10.5, finish=12.0, num_prompt=7,
                              num_generated=20)
    want = {"total_duration": 2e9, "load_duration": 1e6, "prompt_eval_count": 7, "prompt_eval_duration": 4.99e8,
            "eval_count": 20, "eval_duration": 1.5e9}
    assert set(stats) == set(want) and all(isinstance(v, int) for v in stats.values())
    assert all(abs(stats[k] - v) <= 1 for k, v in want.items())


def test_model_descriptions_parse_with_the_ollama_client_types(tmp_path):
    from jaxserve.models.config import ModelConfig

    gguf = tmp_path / "Tiny-1B.Q8_0.gguf"
    gguf.write_bytes(b"x" * 1000)
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=16,
                         num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=64)
    card = ModelCard.build(["tiny"], source=str(gguf), model_config=config, num_params=1_234_567_890,
                           dtype_name="float32", max_model_len=64, chat_template="{{ messages }}", stop=("</s>",))
    assert card.matches("tiny") and card.matches("tiny:latest") and not card.matches("other")
    tags = ListResponse(**proto.tags(card))
    assert tags.models[0].model == "tiny:latest" and tags.models[0].size == 1000
    assert tags.models[0].details.quantization_level == "Q8_0" and tags.models[0].details.parameter_size == "1.23B"
    show = ShowResponse(**proto.show(card, "tiny"))
    assert show.modelinfo["llama.block_count"] == 2 and show.parameters == 'stop "</s>"'
    assert show.template == "{{ messages }}" and show.details.family == "llama"
    served = LoadedModel("/tiny", engine=None, card=card, formats=None, size=5000, pinned=True)
    other = LoadedModel("/other", engine=None, card=card, formats=None, size=3000, device_bytes=3000,
                        expires_at=time.time() + 60)
    ps = ProcessResponse(**proto.ps([(["tiny"], served), (["a", "b:v1"], other)]))
    assert [m.model for m in ps.models] == ["tiny:latest", "a:latest", "b:v1"]
    assert ps.models[0].context_length == 64 and ps.models[0].expires_at.year > 2100
    assert ps.models[0].size == 5000 and ps.models[0].size_vram == 0 and ps.models[2].size_vram == 3000
    assert 50 < (ps.models[1].expires_at.timestamp() - time.time()) <= 60


@pytest.mark.parametrize("value,seconds", [(0, 0.0), (30, 30.0), (1.5, 1.5), ("10m", 600.0), ("1h30m", 5400.0),
                                           ("250ms", 0.25), ("300", 300.0), ("0", 0.0), ("0s", 0.0),
                                           (-1, float("inf")), ("-1m", float("inf")), ("-1", float("inf"))])
def test_keep_alive_is_read_as_ollama_reads_it(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "10x", "", True, [5], {"m": 1}, "m"])
def test_keep_alive_that_is_no_duration_is_refused(value):
    with pytest.raises(ValueError, match="keep_alive"):
        parse_keep_alive(value)
