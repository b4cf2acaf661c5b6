"""Tool calling and reasoning without a server: the parsers of each format (whole and streamed a
character at a time), tools and tool_choice checks, the constrained grammar (a call in the format
always parses), and the chat template's tools or the default tool prompt."""
from __future__ import annotations

import json

import llguidance
import pytest

from jaxserve.server.chat import ChoiceParser, normalize_messages, render_chat
from jaxserve.server.reasoning import REASONING_FORMATS, ReasoningParser
from jaxserve.server.tool_calls import (FORMATS, ToolCallParser, ToolChoice, format_for, parse_text,
                                        parse_tool_choice, parse_tools)
from jaxserve.server.validation import RequestError

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

CASES = [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"a": "}"}]}}\n'
               '</tool_call>\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
     "Sure.\n", [("get_weather", {"city": "Paris", "n": [1, {"a": "}"}]}), ("f", {})]),
    ("llama3_json", ' {"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {"y": true}}',
     "", [("f", {"x": 1}), ("g", {"y": True})]),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"x": "a\\"b"}}', "", [("f", {"x": 'a"b'})]),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {"y": "z"}}]',
     "", [("f", {"x": 1}), ("g", {"y": "z"})]),
    ("hermes", '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call> done', "done", [("f", {"x": 1})]),
    ("hermes", 'no calls <tool_ here, <tool_call> not json', "no calls <tool_ here, <tool_call> not json", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1', '<tool_call>\n{"name": "f", "arguments": {"a": 1',
     []),  # cut off: all content, nothing half-parsed
    ("llama3_json", 'Hello {"name": "f"}', 'Hello {"name": "f"}', []),
]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_parsers_whole_and_streamed(fmt, text, content, calls):
    got_content, got_calls = parse_text(FORMATS[fmt], text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    # streamed a character at a time: the fragments rebuild the same calls, ids and names first
    parser = ToolCallParser(FORMATS[fmt])
    pieces = [parser.feed(ch) for ch in text] + [parser.finish()]
    arguments, names = {}, {}
    for piece in pieces:
        for f in piece.calls:
            if f.name is not None:
                assert f.index not in names and f.id
                names[f.index] = f.name
            assert f.index in names  # nothing before the call's first fragment
            arguments[f.index] = arguments.get(f.index, "") + f.arguments
    if calls:
        assert [(names[i], json.loads(arguments[i])) for i in sorted(names)] == calls
        assert "".join(p.content for p in pieces) == content


def test_max_calls_keeps_the_first():
    text = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    content, calls = parse_text(FORMATS["hermes"], text, max_calls=1)
    assert [c.name for c in calls] == ["f"] and content == ""


def test_mistral_ids_are_nine_characters():
    _, calls = parse_text(FORMATS["mistral"], '[TOOL_CALLS][{"name": "f", "arguments": {}}]')
    assert len(calls[0].id) == 9 and calls[0].id.isalnum()
    _, calls = parse_text(FORMATS["hermes"], '<tool_call>{"name": "f", "arguments": {}}</tool_call>')
    assert calls[0].id.startswith("call_")


@pytest.mark.parametrize("name, text, reasoning, content", [
    ("deepseek_r1", "Let me think.\nOK</think>\n\nThe answer is 4.", "Let me think.\nOK", "The answer is 4."),
    ("deepseek_r1", "<think>hmm</think>Yes", "hmm", "Yes"),
    ("qwen3", "<think>why</think>\n\nBecause.", "why", "Because."),
    ("qwen3", "Just an answer <think> x", "", "Just an answer <think> x"),
])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_reasoning_parsers(name, text, reasoning, content, step):
    parser = ReasoningParser(REASONING_FORMATS[name])
    got = [parser.feed(text[i:i + step]) for i in range(0, len(text), step)] + [parser.finish()]
    assert "".join(r for r, _ in got) == reasoning
    assert "".join(c for _, c in got) == content


def test_choice_parser_reasoning_then_tools():
    parser = ChoiceParser(REASONING_FORMATS["qwen3"], FORMATS["hermes"])
    text = '<think>need weather</think>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for i, ch in enumerate(text):
        parser.feed(ch, last=i == len(text) - 1)
    reasoning, content, calls = parser.result()
    assert reasoning == "need weather" and content == ""
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Oslo"}


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], None,
     "tools[0].function.parameters"),
    ([{"type": "function", "function": {"parameters": {}}}], None, "tools[0].function.name"),
    ([WEATHER, WEATHER], None, "tools[1].function.name"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ([], "required", "tool_choice"),
    ([], {"type": "function", "function": {"name": "get_weather"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
])
def test_bad_tools_name_the_field(tools, choice, param):
    with pytest.raises(RequestError) as e:
        parse_tool_choice(choice, parse_tools(tools))
    assert e.value.param == param, e.value.message


def test_tool_choice_defaults():
    assert parse_tool_choice(None, parse_tools([WEATHER])) == ToolChoice("auto")
    assert parse_tool_choice(None, []) == ToolChoice("none")


def test_format_from_the_template():
    assert format_for(None, None).name == "hermes"  # no template tools: the default prompt's format
    assert format_for(None, "{% if tools %}[TOOL_CALLS]{% endif %}").name == "mistral"
    assert format_for(None, "{% for tool in tools %}<|python_tag|>{% endfor %}").name == "llama3_json"
    assert format_for(None, "{% if tools %}<tool_call>{% endif %}").name == "hermes"
    assert format_for("mistral", "{{ tools }}<tool_call>").name == "mistral"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from jaxserve.models.loader import bundled_model_path
    from jaxserve.models.loader_gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(bundled_model_path())


@pytest.mark.parametrize("fmt, parallel", [("hermes", False), ("hermes", True), ("llama3_json", True),
                                           ("mistral", False)])
def test_constrained_grammar_accepts_the_format_and_parses(smollm2_tokenizer, fmt, parallel):
    """The grammar of `required` accepts a call written in the format (with schema-valid
    arguments), refuses a wrong name, and what it accepts parses back into the same call."""
    import llguidance.hf

    tok = smollm2_tokenizer
    lltok = llguidance.hf.from_tokenizer(tok, len(tok), [tok.eos_token_id])
    grammar = llguidance.LLMatcher.grammar_from_lark(
        FORMATS[fmt].grammar(parse_tools([WEATHER]), parallel=parallel, special_tokens={}))
    assert llguidance.LLMatcher.validate_grammar(grammar, lltok) == ""
    one = {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
           "llama3_json": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
           "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'}[fmt]

    def accepts(text):
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        return all(m.consume_token(t) for t in tok(text, add_special_tokens=False).input_ids) and m.is_accepting()

    assert accepts(one)
    assert not accepts(one.replace("get_weather", "get_wether"))
    assert not accepts(one.replace('"city"', '"town"'))
    assert parse_text(FORMATS[fmt], one)[1][0].name == "get_weather"


def test_default_tool_prompt_for_a_template_without_tools(smollm2_tokenizer):
    messages = normalize_messages([
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    text, ids = render_chat(smollm2_tokenizer, messages, None, tools=parse_tools([WEATHER]))
    assert '"name": "get_weather"' in text and "<tools>" in text  # the tools described
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert ids and text.endswith("<|im_start|>assistant\n")


def test_history_arguments_must_be_json():
    with pytest.raises(RequestError) as e:
        normalize_messages([{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}])
    assert e.value.param == "messages[0].tool_calls[0].function.arguments"


def test_a_template_with_tools_gets_them(smollm2_tokenizer):
    template = ("{% for t in tools %}TOOL {{ t.function.name }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    text, _ = render_chat(smollm2_tokenizer, [{"role": "user", "content": "hi"}], template,
                          tools=parse_tools([WEATHER]))
    assert text.startswith("TOOL get_weather\n") and "<tools>" not in text
