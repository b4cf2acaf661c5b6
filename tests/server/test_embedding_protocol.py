"""The embedding wire formats without a server: every accepted `input` form, each API's truncation
(Ollama keeps the first tokens by default, vLLM's field the last, OpenAI none), base64 vectors."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from jaxserve.pooling_params import PoolingParams
from jaxserve.server import embedding_protocol as proto
from jaxserve.server.validation import RequestError


@pytest.mark.parametrize("value, inputs", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([5, 6, 7], [[5, 6, 7]]),
    ([[5, 6], [7]], [[5, 6], [7]]),
])
def test_openai_input_forms(value, inputs):
    req = proto.parse_openai({"model": "m", "input": value})
    assert req.inputs == inputs and req.encoding_format == "float" and req.params == PoolingParams()


def test_each_api_asks_for_its_own_truncation():
    assert proto.parse_openai({"model": "m", "input": "x", "truncate_prompt_tokens": 8,
                               "dimensions": 4}).params == PoolingParams(dimensions=4, truncate_prompt_tokens=8)
    ollama = proto.parse_ollama_embed({"model": "m", "input": "x"}).params
    assert ollama == PoolingParams(truncate_prompt_tokens=-1, truncation_side="right")
    assert proto.parse_ollama_embed({"model": "m", "input": "x", "truncate": False}).params.truncate_prompt_tokens is None
    assert proto.parse_ollama_embeddings({"model": "m", "prompt": "x"}).params == ollama


@pytest.mark.parametrize("parse, body, param", [
    (proto.parse_openai, {"model": "m"}, "input"),
    (proto.parse_openai, {"model": "m", "input": ["a", ""]}, "input[1]"),
    (proto.parse_openai, {"model": "m", "input": [[]]}, "input"),
    (proto.parse_openai, {"model": "m", "input": [1, "a"]}, "input"),
    (proto.parse_openai, {"model": "m", "input": [True]}, "input"),
    (proto.parse_openai, {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    (proto.parse_openai, {"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    (proto.parse_openai, {"model": "m", "input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    (proto.parse_ollama_embed, {"model": "m", "input": [1, 2]}, "input"),
    (proto.parse_ollama_embed, {"model": "m", "input": "x", "truncate": "yes"}, "truncate"),
    (proto.parse_ollama_embed, {"model": "m", "input": "x", "keep_alive": {}}, "keep_alive"),
    (proto.parse_ollama_embeddings, {"model": "m", "prompt": ""}, "prompt"),
])
def test_bad_bodies_name_the_field(parse, body, param):
    with pytest.raises(RequestError) as error:
        parse(body)
    assert error.value.status == 400 and error.value.param == param


def test_base64_is_little_endian_float32():
    vector = [0.5, -1.25, 3.0e-8]
    encoded = proto.encode_vector(vector, "base64")
    assert np.frombuffer(base64.b64decode(encoded), "<f4").tolist() == np.float32(vector).tolist()
    assert proto.encode_vector(vector, "float") is vector
