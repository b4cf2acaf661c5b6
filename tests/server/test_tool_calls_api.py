"""Tool calling through the real `openai` and `ollama` clients against `jaxserve serve` (SmolLM2,
whose template has no tools section: the default tool prompt, Hermes format): every tool_choice,
streamed and not, the history's calls and results, and bad tools answered with a 400 naming the
field. `auto` is driven into a call with a structured-output regex, so the parser, not luck, is
what the test checks."""
from __future__ import annotations

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

from serverlib import MODEL

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": CITY}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# What the model writes for auto below: forced, so the parse is what is tested.
FORCED_CALL = r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\n</tool_call>'


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _check_call(call, names=("get_weather", "get_time")):
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), CITY)


@pytest.mark.parametrize("tool_choice, names", [
    ("required", ("get_weather", "get_time")),
    ({"type": "function", "function": {"name": "get_time"}}, ("get_time",)),
])
def test_constrained_choices_always_call(client, tool_choice, names):
    got = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=tool_choice,
                                         parallel_tool_calls=False, max_tokens=60, temperature=0.8, seed=5)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1 and choice.message.content is None
    _check_call(choice.message.tool_calls[0], names)


def test_auto_parses_the_call_and_keeps_the_content(client):
    got = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                         extra_body={"structured_outputs": {"regex": FORCED_CALL}})
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking.\n"
    (call,) = choice.message.tool_calls
    _check_call(call, ("get_weather",))


def test_auto_streamed_as_openai_fragments(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0,
                                            stream=True, extra_body={"structured_outputs": {"regex": FORCED_CALL}})
    chunks = [c for c in stream if c.choices]
    fragments = [f for c in chunks for f in (c.choices[0].delta.tool_calls or [])]
    first = fragments[0]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert all(f.id is None and f.function.name is None for f in fragments[1:])
    arguments = "".join(f.function.arguments or "" for f in fragments)
    assert json.loads(arguments)["city"] in ("Paris", "Rome")
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Checking.\n"  # no tag text leaks into the content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_required_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                            max_tokens=80, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    for chunk in stream:
        for f in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(f.index, {"name": f.function.name, "arguments": ""})
            entry["arguments"] += f.function.arguments or ""
    assert calls
    for entry in calls.values():  # every call that closed is schema-valid (one cut by max_tokens may not be)
        assert entry["name"] in ("get_weather", "get_time")
    jsonschema.validate(json.loads(calls[0]["arguments"]), CITY)


def test_none_leaves_the_tools_out(client):
    with_tools = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=1)
    without = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                             max_tokens=1)
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)
    assert without.usage.prompt_tokens == plain.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert not without.choices[0].message.tool_calls


def test_history_with_calls_and_results(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 C"}]
    got = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert got.choices[0].message.content
    longer = client.chat.completions.create(model=MODEL, messages=history[:-1], tools=TOOLS, max_tokens=1)
    assert got.usage.prompt_tokens > longer.usage.prompt_tokens  # the result is in the prompt


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tools_are_400_naming_the_field(server, extra, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_ollama_tools_in_the_prompt_and_history(server):
    """Ollama's tools, its tool_calls in the history (arguments an object) and tool results."""
    o = ollama.Client(host=server.url)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 25 C"}]
    got = o.chat(model=MODEL, messages=history, tools=TOOLS, options={"temperature": 0, "num_predict": 8})
    bare = o.chat(model=MODEL, messages=history[:1], options={"temperature": 0, "num_predict": 1})
    assert got.prompt_eval_count > bare.prompt_eval_count + 100  # the tool prompt and the history are in
    assert got.message.content and not got.message.tool_calls


def test_ollama_bad_tools_are_400(server):
    r = httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": ASK, "stream": False, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]})
    assert r.status_code == 400 and "tools[0].function.parameters" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/api/chat", json={"model": MODEL, "messages": ASK, "stream": False, "think": True})
    assert r.status_code == 400 and "thinking" in r.json()["error"], r.text


@pytest.fixture(scope="module")
def llama3_server(tmp_path_factory):
    """A server reading Llama 3's bare-JSON calls, so Ollama's `format` can hold the reply to one,
    and Qwen3's reasoning (a reply that opens with <think>)."""
    from serverlib import running

    with running(["--served-model-name", MODEL, "--tool-call-parser", "llama3_json",
                 "--reasoning-parser", "qwen3"],
                 tmp_path_factory.mktemp("llama3") / "serve.log") as srv:
        yield srv


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_tool_calls_parsed(llama3_server, stream):
    call_schema = {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": CITY},
                   "required": ["name", "parameters"], "additionalProperties": False}
    o = ollama.Client(host=llama3_server.url)
    got = o.chat(model=MODEL, messages=ASK, tools=TOOLS, format=call_schema, stream=stream,
                 options={"temperature": 0, "num_predict": 40})
    parts = list(got) if stream else [got]
    calls = [c for p in parts for c in (p.message.tool_calls or [])]
    assert len(calls) == 1, parts
    assert calls[0].function.name == "get_weather"
    jsonschema.validate(dict(calls[0].function.arguments), CITY)  # an object, as Ollama sends it
    assert "".join(p.message.content or "" for p in parts) == ""
    assert parts[-1].done and parts[-1].done_reason == "stop"


THOUGHT = r"<think>Paris is in France\.</think>\n\nIt is sunny\."


def test_reasoning_split_from_the_answer(llama3_server):
    client = openai.OpenAI(base_url=f"{llama3_server.url}/v1", api_key="unused", max_retries=0)
    got = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                         extra_body={"structured_outputs": {"regex": THOUGHT}})
    message = got.choices[0].message
    assert message.reasoning == "Paris is in France." and message.content == "It is sunny."
    stream = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0, stream=True,
                                            extra_body={"structured_outputs": {"regex": THOUGHT}})
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == "Paris is in France."
    assert "".join(d.content or "" for d in deltas) == "It is sunny."
    # Ollama's think is accepted where a reasoning parser is (the default server refuses it)
    answer = ollama.Client(host=llama3_server.url).chat(model=MODEL, messages=ASK, think=True,
                                                        options={"num_predict": 4})
    assert answer.done
