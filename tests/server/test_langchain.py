"""LangChain's ChatOpenAI (/v1/chat/completions) and ChatOllama (/api/chat, always streamed) against
`jaxserve serve`: plain invoke and stream, and with_structured_output(method="json_schema"), which
ChatOpenAI sends as response_format json_schema (strict for a Pydantic class) and ChatOllama as format."""
from __future__ import annotations

import json

import jsonschema
import pytest
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field

from serverlib import MODEL

MAX_TOKENS = 80  # room for the structured answers below to close their JSON


class Person(BaseModel):
    # extra="forbid" puts additionalProperties: false in ChatOllama's schema too (the openai SDK
    # adds it itself for strict mode); an open schema lets the model ramble until the token limit.
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


# A plain JSON schema needs a title: LangChain makes it the json_schema's name.
COLOURS = {"title": "colours", "description": "Some colours.", "type": "object",
           "properties": {"colours": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                                      "minItems": 2, "maxItems": 3}},
           "required": ["colours"], "additionalProperties": False}


def openai_chat_model(url: str, max_tokens: int = MAX_TOKENS) -> ChatOpenAI:
    # max_tokens goes on the wire as max_completion_tokens; stream_usage asks for the usage chunk.
    return ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=max_tokens,
                      max_retries=0, stream_usage=True)


def ollama_chat_model(url: str, max_tokens: int = MAX_TOKENS) -> ChatOllama:
    return ChatOllama(base_url=url, model=MODEL, temperature=0, num_predict=max_tokens)


MAKERS = {"openai_chat": openai_chat_model, "ollama_chat": ollama_chat_model}


@pytest.fixture(scope="module")
def openai_chat(server):
    return openai_chat_model(server.url)


@pytest.fixture(scope="module")
def ollama_chat(server):
    return ollama_chat_model(server.url)


@pytest.fixture(params=list(MAKERS))
def chat(request):
    """Each of the two chat models in turn (request.param names its fixture)."""
    return request.getfixturevalue(request.param)


def finish_reason(message) -> str:
    """ChatOpenAI's finish_reason or ChatOllama's done_reason."""
    meta = message.response_metadata
    return meta["finish_reason"] if "finish_reason" in meta else meta["done_reason"]


def joined(chunks):
    assert len(chunks) > 1, chunks  # really streamed, not one block
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return total


@pytest.mark.parametrize("maker", list(MAKERS))
def test_invoke_and_stream_give_the_same_text(server, maker):
    make, prompt, limit = MAKERS[maker], "Tell me a long story about a dragon.", 24
    # A first request caches the prompt's pages, so the two compared requests both reuse them: a cold
    # prefill and a cached one can pick different tokens where two are nearly tied.
    make(server.url, 1).invoke(prompt)
    chat = make(server.url, limit)
    answer = chat.invoke(prompt)
    assert isinstance(answer.content, str) and answer.content.strip()
    assert finish_reason(answer) == "length" and answer.usage_metadata["output_tokens"] == limit, answer
    streamed = joined(list(chat.stream(prompt)))
    assert streamed.content == answer.content
    assert finish_reason(streamed) == "length" and streamed.usage_metadata["output_tokens"] == limit, streamed


# langchain_openai's structured stream model_dump()s the openai SDK's events, whose `parsed` field is
# typed None but holds the Person: pydantic warns about that, client side.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
def test_structured_output_pydantic(chat):
    ask = "Give me a person."
    got = chat.with_structured_output(Person, method="json_schema", include_raw=True).invoke(ask)
    assert got["parsing_error"] is None and isinstance(got["parsed"], Person), got
    raw = got["raw"]
    # Strict JSON and a real stop: LangChain's parsers would repair a truncated answer.
    assert finish_reason(raw) == "stop", raw
    assert Person.model_validate(json.loads(raw.content)) == got["parsed"]
    streamed = list(chat.with_structured_output(Person, method="json_schema").stream(ask))
    assert streamed[-1] == got["parsed"]


def test_structured_output_json_schema(chat):
    ask = "Name some colours."
    structured = chat.with_structured_output(COLOURS, method="json_schema")
    value = structured.invoke(ask)
    jsonschema.validate(value, COLOURS)
    partials = list(structured.stream(ask))
    assert len(partials) > 1 and partials[-1] == value, partials
