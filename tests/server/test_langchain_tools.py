"""LangChain against `jaxserve serve`: ChatOpenAI.bind_tools with a named or a
required tool_choice gives an AIMessage whose parsed tool_calls match the tools' schemas, invoked
and streamed; with_structured_output(method="json_schema") on ChatOpenAI (response_format
json_schema) and ChatOllama (format: the schema) gives schema-valid objects."""
from __future__ import annotations

import jsonschema
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from serverlib import MODEL


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@tool
def get_time(city: str) -> str:
    """The local time in a city."""
    return f"noon in {city}"


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture(scope="module")
def chat_openai(server):
    return ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=60,
                      max_retries=0)


@pytest.mark.parametrize("tool_choice, names", [("get_time", {"get_time"}),
                                                ("required", {"get_weather", "get_time"})])
def test_bind_tools_invoke(chat_openai, tool_choice, names):
    llm = chat_openai.bind_tools([get_weather, get_time], tool_choice=tool_choice, parallel_tool_calls=False)
    message = llm.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call["name"] in names and call["id"]
    jsonschema.validate(call["args"], CITY)
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_bind_tools_stream(chat_openai):
    llm = chat_openai.bind_tools([get_weather], tool_choice="get_weather")
    merged = None
    for chunk in llm.stream("What is the weather in Paris?"):
        assert isinstance(chunk, AIMessageChunk)
        merged = chunk if merged is None else merged + chunk
    (call,) = merged.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], CITY)
    assert get_weather.invoke(call["args"]).startswith("sunny in ")  # the args fit the Python tool


PERSON = {"title": "person", "description": "A person.", "type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def test_with_structured_output_json_schema_openai(chat_openai):
    person = chat_openai.with_structured_output(PERSON, method="json_schema").invoke("Describe a person as JSON.")
    jsonschema.validate(person, PERSON)


def test_with_structured_output_json_schema_ollama(server):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(base_url=server.url, model=MODEL, temperature=0, num_predict=60)
    person = llm.with_structured_output(PERSON, method="json_schema").invoke("Describe a person as JSON.")
    jsonschema.validate(person, PERSON)
