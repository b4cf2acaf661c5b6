"""Structured output through the real `openai` and `ollama` clients against `jaxserve serve`:
response_format (json_object, json_schema), vLLM's structured_outputs and guided_* fields, Ollama's
format; the outputs validated, bad constraints answered with a 400 naming the field the client
used, and concurrent requests with different constraints each getting their own."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import ollama
import openai
import pytest

from serverlib import MODEL

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Give me a person as JSON."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _person(text):
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return value


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_chat_response_format_json_schema(client, temperature):
    got = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=80, temperature=temperature, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    _person(got.choices[0].message.content)
    assert got.choices[0].finish_reason == "stop"


def test_chat_json_object_streamed(client):
    ask = [{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}]
    stream = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=300, temperature=0, stream=True,
                                            response_format={"type": "json_object"})
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_completions_structured_outputs_and_guided_fields(client):
    regex = client.completions.create(model=MODEL, prompt="A phone number:", max_tokens=20, temperature=0.7,
                                      seed=1, extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text)
    choice = client.completions.create(model=MODEL, prompt="Is water wet? Answer:", max_tokens=5, temperature=0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    grammar = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=0,
                                             extra_body={"guided_grammar": 'root ::= "(" [0-9]+ ")"'})
    assert re.fullmatch(r"\(\d+\)", grammar.choices[0].message.content)


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
])
def test_bad_constraints_are_400_naming_the_field(server, extra, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_sixteen_concurrent_requests_with_different_schemas(server):
    async def one(client, i):
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "integer", "minimum": 0, "maximum": 999}},
                  "required": [f"field_{i}"], "additionalProperties": False}
        got = await client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=60, temperature=0.8, seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}})
        assert got.choices[0].finish_reason == "stop", got.choices[0].message.content
        value = json.loads(got.choices[0].message.content)
        jsonschema.validate(value, schema)
        return i, value

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    for i, value in asyncio.run(main()):
        assert list(value) == [f"field_{i}"] and isinstance(value[f"field_{i}"], int)


def test_ollama_format_json_and_schema(server):
    client = ollama.Client(host=server.url)
    got = client.chat(model=MODEL, messages=ASK, format=PERSON, options={"temperature": 0, "num_predict": 80})
    _person(got.message.content)
    got = client.generate(model=MODEL, prompt="A JSON object:", format="json",
                          options={"temperature": 0, "num_predict": 60})
    assert isinstance(json.loads(got.response), dict)
    # The client itself refuses other formats; a raw request gets Ollama's error object.
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": "x", "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": "x", "stream": False,
                                                       "format": {"type": "nonsense"}})
    assert r.status_code == 400 and r.json()["error"].startswith("format is not a valid constraint"), r.text
