"""Ollama's Go templates give the prompts Ollama builds: real templates (ChatML, Llama 3, Llama 3.1
with tools, Mistral) against expected prompts worked out by hand from Go's text/template rules."""
from __future__ import annotations

import pytest

from jaxserve.go_template import GoTemplate, collate, go_json

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

# Ollama's llama3 template: the legacy form, one run per turn over .System / .Prompt / .Response.
LLAMA3 = """{{ if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>

{{ .Prompt }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

{{ .Response }}<|eot_id|>"""

LEGACY_CHATML = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""

# Ollama's llama3.1 template (tools in the last user turn, tool calls as JSON, ipython results).
LLAMA31 = """{{- if or .System .Tools }}<|start_header_id|>system<|end_header_id|>
{{- if .System }}

{{ .System }}
{{- end }}
{{- if .Tools }}

Cutting Knowledge Date: December 2023

When you receive a tool call response, use the output to format an answer to the orginal user question.

You are a helpful assistant with tool calling capabilities.
{{- end }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>
{{- if and $.Tools $last }}

Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.

{{ range $.Tools }}
{{- . }}
{{ end }}
Question: {{ .Content }}<|eot_id|>
{{- else }}

{{ .Content }}<|eot_id|>
{{- end }}{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}
{{ range .ToolCalls }}
{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ .Content }}<|eot_id|>{{ if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""

# Ollama's mistral template: $.System in the last user turn, json of the tools and arguments.
MISTRAL = """{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and (eq (len (slice $.Messages $index)) 1) $.Tools }}[AVAILABLE_TOOLS] {{ json $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and $.System (eq (len (slice $.Messages $index)) 1) }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}</s>
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}} [/TOOL_RESULTS]
{{- end }}
{{- end }}"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string", "description": "the city"}}}}}
WEATHER_JSON = ('{"type":"function","function":{"name":"get_weather","description":"Weather in a city",'
                '"parameters":{"type":"object","required":["city"],"properties":{"city":{"type":"string",'
                '"description":"the city"}}}}}')
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2+2?"}]


def test_chatml_renders_every_message_then_opens_the_answer():
    got = GoTemplate(CHATML).render(CONVERSATION)
    assert got == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                   "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                   "<|im_start|>assistant\n")


def test_legacy_llama3_runs_once_per_turn_and_stops_at_the_response():
    t = GoTemplate(LLAMA3)
    assert not t.uses_messages
    assert t.render(CONVERSATION) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_legacy_template_continues_a_prefilled_answer():
    got = GoTemplate(LEGACY_CHATML).render([{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Sure,"}])
    assert got == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nSure,"


def test_llama31_with_tools_a_tool_call_and_its_result():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "22C"}]
    got = GoTemplate(LLAMA31).render(messages, tools=[WEATHER_TOOL])
    assert got == (
        "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n"
        "When you receive a tool call response, use the output to format an answer to the orginal user "
        "question.\n\nYou are a helpful assistant with tool calling capabilities.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city":"Paris"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n22C<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama31_lists_the_tools_in_the_last_user_turn():
    got = GoTemplate(LLAMA31).render([{"role": "system", "content": "S"},
                                      {"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL])
    assert got == (
        "<|start_header_id|>system<|end_header_id|>\n\nS\n\nCutting Knowledge Date: December 2023\n\n"
        "When you receive a tool call response, use the output to format an answer to the orginal user "
        "question.\n\nYou are a helpful assistant with tool calling capabilities.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
        "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n"
        f"{WEATHER_JSON}\n\nQuestion: Weather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_mistral_puts_the_system_prompt_in_the_last_user_turn():
    assert GoTemplate(MISTRAL).render(CONVERSATION) == (
        "[INST] Hi[/INST] Hello</s>[INST] Be brief.\n\nWhat is 2+2?[/INST]")


def test_mistral_tools_and_calls_as_json():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                                   "arguments": {"city": "<Paris>"}}}]},
                {"role": "tool", "content": "22C"}, {"role": "user", "content": "And Rome?"}]
    assert GoTemplate(MISTRAL).render(messages, tools=[WEATHER_TOOL]) == (
        '[INST] Weather?[/INST][TOOL_CALLS] [{"name": "get_weather", "arguments": {"city":"\\u003cParis\\u003e"}}]</s>'
        '[TOOL_RESULTS] {"content": 22C} [/TOOL_RESULTS]'
        f"[AVAILABLE_TOOLS] [{WEATHER_JSON}][/AVAILABLE_TOOLS][INST] And Rome?[/INST]")


def test_collate_merges_a_role_s_consecutive_messages_and_gathers_the_system_prompts():
    system, messages = collate([{"role": "system", "content": "A"}, {"role": "system", "content": "B"},
                                {"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                                {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}])
    assert system == "A\n\nB"
    assert [(m["role"], m["content"]) for m in messages] == [("system", "A\n\nB"), ("user", "x\n\ny"),
                                                            ("tool", "1"), ("tool", "2")]
    got = GoTemplate("{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}").render(
        [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}, {"role": "user", "content": "x"}])
    assert got == "A\n\nB|system=A\n\nB;user=x;"


@pytest.mark.parametrize("source,values,want", [
    ("{{ if and .System (not .Prompt) }}S{{ else if or .Prompt .Response }}P{{ else }}none{{ end }}",
     {"System": "s"}, "S"),
    ("{{ if and .System (not .Prompt) }}S{{ else if or .Prompt .Response }}P{{ else }}none{{ end }}",
     {"Response": "r"}, "P"),
    ("{{ if and .System (not .Prompt) }}S{{ else if or .Prompt .Response }}P{{ else }}none{{ end }}", {}, "none"),
    ("a  {{- .Prompt -}}  b", {"Prompt": "x"}, "axb"),
    ("{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}/{{ $.System }} {{ end }}",
     {"System": "s", "Messages": [{"Role": "user"}, {"Role": "assistant"}]}, "0:user/s 1:assistant/s "),
    ("{{ len .Messages }} {{ slice .Prompt 1 3 }}", {"Messages": [1, 2, 3], "Prompt": "abcd"}, "3 bc"),
    ("{{ json .Tools }}", {"Tools": [{"a": "<&>"}]}, '[{"a":"\\u003c\\u0026\\u003e"}]'),
    ("{{ if .Think }}think:{{ .ThinkLevel }}{{ end }}", {"Think": True, "ThinkLevel": "high"}, "think:high"),
])
def test_execute_follows_go_text_template(source, values, want):
    assert GoTemplate(source).execute(values) == want


def test_think_reaches_the_template():
    t = GoTemplate("{{ if .IsThinkSet }}{{ if .Think }}on{{ else }}off{{ end }}{{ else }}unset{{ end }}"
                   "{{ range .Messages }}{{ end }}")
    msgs = [{"role": "user", "content": "x"}]
    assert [t.render(msgs, think=v) for v in (True, False, None)] == ["on", "off", "unset"]


def test_go_json_is_compact_and_escapes_html_characters():
    assert go_json({"a": "<b> & \u2028", "n": [1, 2.5, None, True]}) == \
        '{"a":"\\u003cb\\u003e \\u0026 \\u2028","n":[1,2.5,null,true]}'


def test_a_syntax_error_is_refused_when_the_template_is_made():
    with pytest.raises(ValueError, match=r"^template line 2, column 7: unexpected EOF$"):
        GoTemplate("{{ if .System }}\nno end")
    with pytest.raises(ValueError, match=r"^template line 1, column 14: function 'bogus' not defined$"):
        GoTemplate("{{ .Prompt | bogus }}")


def test_a_misspelt_message_field_is_an_error_not_an_empty_string():
    with pytest.raises(ValueError, match=r"^template line 1, column 25: missing key or attribute 'Contnet'$"):
        GoTemplate("{{ range .Messages }}{{ .Contnet }}{{ end }}").render([{"role": "user", "content": "x"}])


def test_tool_properties_range_as_a_go_map_in_key_order():
    tool = {"type": "function", "function": {"name": "w", "description": "d", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"unit": {"type": "string", "description": "u", "enum": ["c", "f"]},
                       "city": {"type": "string", "description": "the city"}}}}}
    t = GoTemplate("{{ range .Tools }}{{ .Function.Name }}: {{ .Function.Description }}"
                   "{{ range $k, $v := .Function.Parameters.Properties }} [{{ $k }} ({{ $v.Type }}): "
                   "{{ $v.Description }}{{ if $v.Enum }} {{ $v.Enum }}{{ end }}]{{ end }} "
                   "req={{ .Function.Parameters.Required }}{{ end }}{{ range .Messages }}{{ end }}")
    assert t.render([{"role": "user", "content": "x"}], tools=[tool]) == (
        "w: d [city (string): the city] [unit (string): u [c f]] req=[city]")
