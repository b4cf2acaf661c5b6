"""Modelfiles parse as Ollama's do (instructions in any case, comments, quoted and triple-quoted
values, typed PARAMETERs), errors name the line at fault, and rendering parses back to the same model."""
from __future__ import annotations

import pytest

from jaxserve.modelfile import Message, Modelfile, ModelfileError, check_parameters, parse_modelfile

# The guide's example (its 11.1), with a MESSAGE and a REQUIRES.
GUIDE = '''# Specify base model (required)
FROM llama3.1:8b

# Parameter settings
PARAMETER temperature 0.7
PARAMETER top_p 0.9
PARAMETER top_k 40
PARAMETER num_ctx 4096
PARAMETER num_predict 512
PARAMETER repeat_penalty 1.1
PARAMETER stop "<|eot_id|>"
PARAMETER stop "<|end_of_text|>"

# System prompt
SYSTEM """
You are a friendly Korean AI assistant.
You provide accurate and concise answers, explaining with examples when needed.
"""

# Chat template (Jinja2 or Go template)
TEMPLATE """
{{- if .System }}<|start_header_id|>system<|end_header_id|>
{{ .System }}<|eot_id|>{{ end }}
"""

# LoRA adapter (optional)
ADAPTER /path/to/lora-adapter

MESSAGE user Hello, please introduce yourself.
MESSAGE assistant Hello! I'm an AI assistant.
# License info (optional)
LICENSE """
Apache 2.0
"""
REQUIRES 0.6.0
'''


def test_the_guide_s_modelfile():
    m = parse_modelfile(GUIDE)
    assert m == Modelfile(
        base="llama3.1:8b",
        parameters={"temperature": 0.7, "top_p": 0.9, "top_k": 40, "num_ctx": 4096, "num_predict": 512,
                    "repeat_penalty": 1.1, "stop": ["<|eot_id|>", "<|end_of_text|>"]},
        system="\nYou are a friendly Korean AI assistant.\nYou provide accurate and concise answers, explaining "
               "with examples when needed.\n",
        template="\n{{- if .System }}<|start_header_id|>system<|end_header_id|>\n{{ .System }}<|eot_id|>{{ end }}\n",
        adapters=("/path/to/lora-adapter",), license=("\nApache 2.0\n",),
        messages=(Message("user", "Hello, please introduce yourself."),
                  Message("assistant", "Hello! I'm an AI assistant.")),
        requires="0.6.0")
    assert m.lines == {"FROM": 2, "SYSTEM": 15, "TEMPLATE": 21, "ADAPTER": 27, "REQUIRES": 35}
    assert isinstance(m.parameters["top_k"], int) and isinstance(m.parameters["temperature"], float)


def test_instructions_and_parameter_names_in_any_case_comments_and_crlf():
    m = parse_modelfile("  # a comment\r\nfrom ./model.gguf\r\n\r\nParameter Seed 42\r\nsystem Be brief.  \r\n"
                        "message USER hi there\r\n")
    assert m == Modelfile(base="./model.gguf", parameters={"seed": 42}, system="Be brief.",
                          messages=(Message("user", "hi there"),))


def test_quoted_values():
    m = parse_modelfile('SYSTEM "say \\"hi\\" \\\\o/ \\n"\n'
                        'TEMPLATE """  keep  \n  spaces  """\n'
                        'MESSAGE assistant "two\nlines"\n'
                        'LICENSE """one line"""\n'
                        'PARAMETER stop "  "\n'
                        'PARAMETER stop """\n"""\n')
    assert m.system == 'say "hi" \\o/ \\n'  # only \" and \\ escape
    assert m.template == "  keep  \n  spaces  "
    assert m.messages == (Message("assistant", "two\nlines"),)
    assert m.license == ("one line",)
    assert m.parameters == {"stop": ["  ", "\n"]}


@pytest.mark.parametrize("line,value", [
    ("PARAMETER penalize_newline true", True), ("PARAMETER penalize_newline F", False),
    ("PARAMETER use_mmap 0", False), ("PARAMETER temperature 1", 1.0), ("PARAMETER temperature .5", 0.5),
    ("PARAMETER temperature 2e-1", 0.2), ("PARAMETER seed -1", -1), ("PARAMETER num_predict -2", -2),
    ("PARAMETER mirostat 2", 2), ("PARAMETER mirostat_tau 5", 5.0), ("PARAMETER repeat_last_n -1", -1),
    ("PARAMETER top_k 0", 0), ("PARAMETER presence_penalty -1.5", -1.5), ("PARAMETER num_thread 8", 8),
])
def test_parameter_types(line, value):
    (got,) = parse_modelfile(line).parameters.values()
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text,message", [
    ("FROM x\nBOGUS y", "line 2: unknown instruction 'BOGUS'; expected one of FROM, PARAMETER, TEMPLATE, SYSTEM, "
                        "ADAPTER, LICENSE, MESSAGE, REQUIRES"),
    ("FROM x\n\nPARAMETER temperature hot", "line 3: PARAMETER temperature needs a number, got 'hot'"),
    ("PARAMETER top_k 4.5", "line 1: PARAMETER top_k needs an integer, got '4.5'"),
    ("PARAMETER temperature nan", "line 1: PARAMETER temperature needs a number, got 'nan'"),
    ("PARAMETER use_mlock yes", "line 1: PARAMETER use_mlock needs true or false, got 'yes'"),
    ("# c\nPARAMETER temprature 0.5", "line 2: unknown parameter 'temprature'"),
    ("PARAMETER top_p 1.5", "line 1: PARAMETER top_p must be in (0, 1], got 1.5"),
    ("PARAMETER mirostat 3", "line 1: PARAMETER mirostat must be 0 (off), 1 or 2, got 3"),
    ("PARAMETER num_predict 0", "line 1: PARAMETER num_predict must be -1 (no limit), -2 (fill the context) "
                                "or >= 1, got 0"),
    ('PARAMETER stop ""', "line 1: PARAMETER stop must not be empty"),
    ("PARAMETER temperature 0.1\nPARAMETER temperature 0.2",
     "line 2: PARAMETER temperature given twice (first on line 1)"),
    ("PARAMETER", "line 1: PARAMETER needs a name and a value"),
    ("PARAMETER stop", "line 1: PARAMETER needs a name and a value"),
    ("MESSAGE user", "line 1: MESSAGE needs a role and a message"),
    ("MESSAGE tool result", "line 1: MESSAGE role must be one of system, user, assistant, got 'tool'"),
    ("FROM a\n# b\nFROM b", "line 3: FROM given twice (first on line 1)"),
    ("SYSTEM a\nSYSTEM b", "line 2: SYSTEM given twice (first on line 1)"),
    ("ADAPTER a\nADAPTER b", "line 2: ADAPTER given twice (first on line 1)"),
    ("FROM", "line 1: FROM needs a value"),
    ("LICENSE ", "line 1: LICENSE needs a value"),
    ("REQUIRES soon", "line 1: REQUIRES needs a version such as 0.6.0, got 'soon'"),
    ('FROM x\nSYSTEM """\nnever\nclosed', 'line 2: the """ opened here is never closed'),
    ('FROM x\nSYSTEM "never\nclosed', 'line 2: the " string opened here is never closed'),
    ('SYSTEM """a\nb""" trailing', "line 2: unexpected text after the closing quote: 'trailing'"),
])
def test_errors_name_the_line(text, message):
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text)
    assert str(e.value) == message


def test_the_line_after_a_multiline_value_is_counted():
    with pytest.raises(ModelfileError, match=r"^line 5: unknown parameter 'x'$"):
        parse_modelfile('FROM m\nSYSTEM """a\nb\n"""\nPARAMETER x 1')


def test_render_writes_a_modelfile_that_parses_back():
    m = Modelfile(base="/models/a b.gguf", parameters={"stop": ["<|im_end|>", " lead", 'quote"'], "temperature": 0.7,
                                                       "top_k": 40, "use_mmap": False, "mirostat_eta": 1e-05},
                  template='{{ .System }}\n"""{{ .Prompt }}', system="  indented\nand \\ back\\slash ",
                  adapters=("./adapter",), license=("MIT", "line one\nline two"),
                  messages=(Message("user", ""), Message("assistant", '"quoted" ends with "quote"')), requires="0.6")
    text = m.render()
    assert text == (
        'FROM /models/a b.gguf\n'
        'ADAPTER ./adapter\n'
        'TEMPLATE "{{ .System }}\n\\"\\"\\"{{ .Prompt }}"\n'
        'SYSTEM """  indented\nand \\ back\\slash """\n'
        'PARAMETER mirostat_eta 1e-05\n'
        'PARAMETER stop <|im_end|>\n'
        'PARAMETER stop """ lead"""\n'
        'PARAMETER stop quote"\n'
        'PARAMETER temperature 0.7\n'
        'PARAMETER top_k 40\n'
        'PARAMETER use_mmap false\n'
        'MESSAGE user ""\n'
        'MESSAGE assistant "\\"quoted\\" ends with \\"quote\\""\n'
        'LICENSE MIT\n'
        'LICENSE """line one\nline two"""\n'
        'REQUIRES 0.6\n')
    assert parse_modelfile(text) == m
    assert parse_modelfile(parse_modelfile(GUIDE).render()) == parse_modelfile(GUIDE)


def test_fields_are_checked_as_the_modelfile_s():
    m = Modelfile.from_fields(base="llama3", parameters={"temperature": 1, "stop": "x", "penalize_newline": True},
                              system="s", messages=[{"role": "user", "content": "hi"}], license="MIT")
    assert m == Modelfile(base="llama3", parameters={"temperature": 1.0, "stop": ["x"], "penalize_newline": True},
                          system="s", messages=(Message("user", "hi"),), license=("MIT",))
    for kwargs, message in [
        (dict(parameters={"top_k": True}), "parameter top_k must be an integer, got True"),
        (dict(parameters={"top_k": 1.5}), "parameter top_k must be an integer, got 1.5"),
        (dict(parameters={"temperature": "hot"}), "parameter temperature must be a number, got 'hot'"),
        (dict(parameters={"stop": [1]}), "parameter stop must be a string or a list of strings, got [1]"),
        (dict(parameters={"nope": 1}), "unknown parameter 'nope'"),
        (dict(parameters={"top_p": 0}), "parameter top_p must be in (0, 1], got 0.0"),
        (dict(messages=[{"role": "tool", "content": "x"}]),
         "messages[0].role must be one of system, user, assistant, got 'tool'"),
        (dict(adapters=["a", "b"]), "2 adapters given: jaxserve runs one adapter per model"),
        (dict(system=3), "system must be a string, got 3"),
        (dict(base=""), "from, license and adapters must be non-empty strings"),
        (dict(license=["MIT", 1]), "from, license and adapters must be non-empty strings"),
        (dict(requires="v1"), "requires must be a version such as 0.6.0, got 'v1'"),
    ]:
        with pytest.raises(ValueError) as e:
            Modelfile.from_fields(**kwargs)
        assert str(e.value) == message


def test_check_parameters_keeps_ollama_s_types():
    assert check_parameters({"num_ctx": 2048, "top_p": 1, "seed": -1}) == {"num_ctx": 2048, "top_p": 1.0, "seed": -1}
    assert type(check_parameters({"top_p": 1})["top_p"]) is float
