"""Ollama's TEMPLATE: Go text/template source, executed by gotpl (a pure-Python Go template engine)
with the values Ollama documents: ``.System``, ``.Prompt``, ``.Response``, ``.Messages`` (``.Role``,
``.Content``, ``.Thinking``, ``.ToolCalls``, ``.ToolName``), ``.Tools``, ``.Suffix``, ``.Think``.

    t = GoTemplate(source)                      # ValueError on a syntax error
    t.render(messages, tools=None, think=None)  # the prompt for a chat, as Ollama's Template.Execute
    t.execute(values)                           # the template run on raw values (Go field names)

Messages and tools are the JSON objects of Ollama's API (``{"role": ..., "content": ...}``); the
template reads them by Go field name (``.ToolCalls`` is ``tool_calls``), and the ``json`` function
writes them back as Go's encoding/json would (compact, ``<``, ``>`` and ``&`` escaped).
"""
from __future__ import annotations

import dataclasses
import json
import re

import gotpl


@dataclasses.dataclass(frozen=True)
class _Shape:
    """An API type as Ollama decodes it (api/types.go): its Go fields, their JSON keys, and the
    fields that hold other types (one, a list or a map of them)."""
    keys: dict[str, str]
    nested: dict[str, tuple[_Shape, str]] = dataclasses.field(default_factory=dict)


_TOOL_PROPERTY = _Shape({"Type": "type", "Description": "description", "Enum": "enum", "Items": "items"})
_TOOL_PARAMETERS = _Shape({"Type": "type", "Required": "required", "Properties": "properties", "Defs": "$defs",
                           "Items": "items"}, {"Properties": (_TOOL_PROPERTY, "map")})
_TOOL_FUNCTION = _Shape({"Name": "name", "Description": "description", "Parameters": "parameters"},
                        {"Parameters": (_TOOL_PARAMETERS, "one")})
_TOOL = _Shape({"Type": "type", "Function": "function", "Items": "items"}, {"Function": (_TOOL_FUNCTION, "one")})
_CALL_FUNCTION = _Shape({"Index": "index", "Name": "name", "Arguments": "arguments"})
_TOOL_CALL = _Shape({"Function": "function"}, {"Function": (_CALL_FUNCTION, "one")})
_MESSAGE = _Shape({"Role": "role", "Content": "content", "Thinking": "thinking", "Images": "images",
                   "ToolCalls": "tool_calls", "ToolName": "tool_name"}, {"ToolCalls": (_TOOL_CALL, "list")})
_STRING_FIELDS = {"Role", "Content", "Thinking", "ToolName", "Name", "Description"}
_RESPONSE_MARK = "\x00jaxserve-response\x00"


def go_json(value) -> str:
    """Go's json.Marshal of a value: compact, HTML characters escaped as Go escapes them."""
    text = json.dumps(_plain(value), ensure_ascii=False, separators=(",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


class _Struct:
    """A JSON object read as the Go struct Ollama decodes it to: a field the struct lacks is an
    error (a typo in a template), a field the object lacks is Go's zero value."""

    __slots__ = ("obj", "shape")

    def __init__(self, obj: dict, shape: _Shape):
        self.obj, self.shape = obj, shape

    def __gotemplate_lookup__(self, name: str):
        value = self.obj.get(self.shape.keys[name])  # KeyError: gotpl reports the missing field
        if name in self.shape.nested:
            shape, how = self.shape.nested[name]
            if how == "list":
                return [_Struct(v, shape) for v in value or ()]
            if how == "map":
                return {k: _Struct(v, shape) for k, v in (value or {}).items()}
            return _Struct(value or {}, shape)
        if name == "Arguments":  # an object in Ollama's API; a JSON string in OpenAI's
            return _Arguments(json.loads(value) if isinstance(value, str) else value or {})
        if value is None:
            return "" if name in _STRING_FIELDS else []
        return value

    def __str__(self) -> str:  # Ollama's Tool and ToolFunction print as JSON (their String methods)
        return go_json(self.obj)


class _Arguments:
    """A tool call's arguments: ``.Function.Arguments`` prints as JSON (Ollama's
    ToolCallFunctionArguments.String), ``.Function.Arguments.city`` reads one. Not a Mapping, which
    gotpl would print as Go's map[city:Paris]; so ``range`` over them is not supported."""

    __slots__ = ("obj",)

    def __init__(self, obj: dict):
        self.obj = obj

    def __gotemplate_lookup__(self, name: str):
        return self.obj[name]

    def __str__(self) -> str:
        return go_json(self.obj)


def _plain(value):
    if isinstance(value, (_Struct, _Arguments)):
        return value.obj
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_FUNCTIONS = {"json": go_json}


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's collate: consecutive messages of one role (tool results excepted) merge, their
    contents joined by a blank line; returns every system message's content joined the same way."""
    system, out = [], []
    for m in messages:
        if m.get("role") == "system":
            system.append(m.get("content") or "")
        if out and out[-1].get("role") == m.get("role") and m.get("role") != "tool":
            out[-1] = {**out[-1], "content": f"{out[-1].get('content') or ''}\n\n{m.get('content') or ''}"}
        else:
            out.append(dict(m))
    return "\n\n".join(system), out


class GoTemplate:
    def __init__(self, source: str):
        if not isinstance(source, str):
            raise ValueError(f"template must be a string, got {source!r:.60}")
        self.source = source
        try:
            self._template = gotpl.Template(source, name="TEMPLATE", functions=_FUNCTIONS, missing_key="error")
        except gotpl.TemplateError as e:
            raise _error(e) from None
        # Ollama picks the chat form when the template reads .Messages anywhere (Template.Vars).
        self.uses_messages = re.search(r"\.Messages\b", source) is not None

    def execute(self, values: dict) -> str:
        """The template run on ``values`` (missing Ollama variables take their zero values)."""
        try:
            return self._template.render(_values(**values))
        except gotpl.TemplateError as e:
            raise _error(e) from None

    def render(self, messages: list[dict], *, tools: list[dict] | None = None, think: bool | str | None = None) -> str:
        """The prompt Ollama builds for these messages: with a template that reads ``.Messages``,
        one run over them all; else ``.System``/``.Prompt``/``.Response`` once per turn, the last
        run cut just after ``.Response`` so that the model answers there."""
        system, messages = collate(messages)
        think_values = dict(Think=bool(think), ThinkLevel=think if isinstance(think, str) else "",
                            IsThinkSet=think is not None)
        if self.uses_messages:
            return self.execute(_values(System=system, Messages=[_Struct(m, _MESSAGE) for m in messages],
                                        Tools=[_Struct(t, _TOOL) for t in tools or ()], **think_values))
        out, turn = [], dict(System="", Prompt="", Response="")
        for m in messages:
            role, content = m.get("role"), m.get("content") or ""
            if (role == "system" and (turn["Prompt"] or turn["Response"])) or (role == "user" and turn["Response"]):
                out.append(self.execute(_values(**turn, **think_values)))
                turn = dict(System="", Prompt="", Response="")
            key = {"system": "System", "user": "Prompt", "assistant": "Response"}.get(role)
            if key is not None:
                turn[key] = content
        # Ollama deletes the template's nodes after .Response; a mark after the response (a
        # prefilled answer, else empty) finds that place in the output.
        last = self.execute(_values(**{**turn, "Response": turn["Response"] + _RESPONSE_MARK}, **think_values))
        out.append(last.split(_RESPONSE_MARK, 1)[0])
        return "".join(out)


def _error(e: gotpl.TemplateError) -> ValueError:
    """gotpl's "template: NAME:1:4: executing "NAME": problem" as "template line 1, column 4: problem"."""
    m = re.search(r':(\d+):(\d+): (?:executing "[^"]*": )?(.*)$', str(e), re.S)
    return ValueError(f"template line {m[1]}, column {m[2]}: {m[3]}" if m else f"template: {e}")


def _values(**values) -> dict:
    return dict(System="", Prompt="", Response="", Suffix="", Messages=[], Tools=[], Think=False, ThinkLevel="",
                IsThinkSet=False) | values
