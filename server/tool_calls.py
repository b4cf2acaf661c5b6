"""Tool calling: a request's tools and tool_choice checked, the model's tool-call format (Hermes /
Qwen `<tool_call>` tags, Llama 3 JSON, Mistral `[TOOL_CALLS]`), the parser that turns generated
text into calls as it streams, and the grammar that holds `required` or a named choice to the
format.

Both APIs share it: /v1/chat/completions answers OpenAI's `tool_calls` (arguments as a JSON
string, streamed as fragments: id, type and name first, argument text after), /api/chat Ollama's
(arguments as an object, each call once complete).

The parser reads the text a character at a time, so a call's argument text is passed on exactly as
the model writes it while it streams, with no re-serialising of partial JSON: `_CallScanner`
follows one JSON object's structure (strings, escapes, nesting) far enough to know the call's name
and where its arguments value begins and ends.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import string

from jaxserve.server.validation import RequestError

# ---- the request's tools -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict           # a JSON schema of the arguments object

    def as_template_dict(self) -> dict:
        """The form chat templates (transformers' apply_chat_template(tools=...)) take."""
        function = {"name": self.name, "parameters": self.parameters}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


def _check_schema(schema: dict, param: str) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise RequestError(f"'{param}' is not a valid JSON schema: {e.message}", param=param,
                           code="invalid_value") from None


def parse_tools(value, param: str = "tools") -> list[Tool]:
    """OpenAI's (and Ollama's) tools: [{"type": "function", "function": {name, description, parameters}}]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RequestError(f"'{param}' must be an array of tools", param=param, code="invalid_type")
    tools, seen = [], set()
    for i, entry in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(entry, dict):
            raise RequestError(f"'{where}' must be an object", param=where, code="invalid_type")
        if entry.get("type", "function") != "function":
            raise RequestError(f"'{where}.type' must be \"function\", got {entry.get('type')!r}",
                               param=f"{where}.type", code="invalid_value")
        function = entry.get("function")
        if not isinstance(function, dict):
            raise RequestError(f"'{where}.function' must be an object", param=f"{where}.function",
                               code="invalid_type")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"'{where}.function.name' must be a non-empty string", param=f"{where}.function.name",
                               code="invalid_value")
        if name in seen:
            raise RequestError(f"'{where}.function.name': {name!r} is given twice", param=f"{where}.function.name",
                               code="invalid_value")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise RequestError(f"'{where}.function.description' must be a string",
                               param=f"{where}.function.description", code="invalid_type")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise RequestError(f"'{where}.function.parameters' must be a JSON schema object",
                               param=f"{where}.function.parameters", code="invalid_type")
        _check_schema(parameters, f"{where}.function.parameters")
        tools.append(Tool(name, description, parameters))
    return tools


@dataclasses.dataclass(frozen=True)
class ToolChoice:
    mode: str                  # "none", "auto", "required" or "function"
    name: str | None = None    # the function, when mode is "function"

    @property
    def constrained(self) -> bool:
        """Decoding is held to the tool-call format (the call always parses)."""
        return self.mode in ("required", "function")


def parse_tool_choice(value, tools: list[Tool], param: str = "tool_choice") -> ToolChoice:
    """OpenAI's tool_choice: "none", "auto", "required" or {"type": "function", "function": {"name"}};
    absent means auto with tools, none without."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise RequestError(f"'{param}' must be none, auto, required or a named function, got {value!r}",
                               param=param, code="invalid_value")
        if value == "required" and not tools:
            raise RequestError(f"'{param}' is required but no tools were given", param=param, code="invalid_value")
        return ToolChoice(value)
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(value.get("function"), dict):
        raise RequestError(f"'{param}' must be a string or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                           param=param, code="invalid_type")
    name = value["function"].get("name")
    if not tools:
        raise RequestError(f"'{param}' names function {name!r} but no tools were given", param=param,
                           code="invalid_value")
    if name not in {t.name for t in tools}:
        raise RequestError(f"'{param}.function.name' {name!r} is not one of the tools "
                           f"({', '.join(t.name for t in tools)})", param=f"{param}.function.name",
                           code="invalid_value")
    return ToolChoice("function", name)


# ---- the model's tool-call format ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ToolCallFormat:
    """How a model writes its calls: one JSON object {"name", ARGUMENTS_KEY} per call, inside a block
    that `trigger` opens (`opening` right after it), calls parted by `separator`, the block ended
    by `closing`."""
    name: str
    trigger: str | None            # text that starts a block of calls
    argument_keys: tuple[str, ...]  # the object's key for the arguments (the first is the one written)
    opening: str = ""
    separator: str | None = None
    closing: str = ""
    bare_json: bool = False        # an output that starts with "{" is a block too (Llama 3)
    id_alphabet: str = string.ascii_letters + string.digits
    id_length: int = 0             # > 0: ids of exactly this many characters (Mistral's templates check)

    def new_call_id(self) -> str:
        if self.id_length:
            return "".join(secrets.choice(self.id_alphabet) for _ in range(self.id_length))
        return f"call_{secrets.token_hex(12)}"

    def grammar(self, tools: list[Tool], *, parallel: bool, special_tokens: dict[str, int]) -> str:
        """A Lark grammar (llguidance's, with %json) of one call (or, parallel, one or more) of
        `tools` in this format, each call's arguments following its tool's schema."""
        key = self.argument_keys[0]
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, key: t.parameters},
                  "required": ["name", key], "additionalProperties": False} for t in tools]
        # Compact JSON spaced as models write it; no free whitespace for a sampler to wander in.
        schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                                                 "key_separator": ": "}}

        def literal(text: str) -> str:  # a special token is written by id: its text is not its bytes
            return f"<[{special_tokens[text]}]>" if text in special_tokens else json.dumps(text)

        if self.name == "hermes":
            call = f'{literal(self.trigger)} "\\n" obj "\\n" {literal(self.closing)}'
            more = f'("\\n" {call})*' if parallel else ""
            return f"start: {call} {more}\nobj: %json {json.dumps(schema)}\n"
        if self.name == "llama3_json":
            more = '("; " obj)*' if parallel else ""
            return f"start: obj {more}\nobj: %json {json.dumps(schema)}\n"
        more = '(", " obj)*' if parallel else ""
        return (f'start: {literal(self.trigger)} "[" obj {more} "]"\n'
                f"obj: %json {json.dumps(schema)}\n")


FORMATS = {
    # Hermes 2 Pro, Qwen 2.5 / 3 and jaxserve's default tool prompt
    "hermes": ToolCallFormat("hermes", "<tool_call>", ("arguments",), closing="</tool_call>"),
    # Llama 3.1 - 3.3: {"name": ..., "parameters": ...}, several parted by ";"
    "llama3_json": ToolCallFormat("llama3_json", "<|python_tag|>", ("parameters", "arguments"), separator=";",
                                  bare_json=True),
    # Mistral: [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]; its templates need 9-character ids
    "mistral": ToolCallFormat("mistral", "[TOOL_CALLS]", ("arguments",), opening="[", separator=",",
                              closing="]", id_length=9),
}
PARSER_NAMES = tuple(FORMATS)


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def format_for(parser_name: str | None, chat_template: str | None) -> ToolCallFormat:
    """--tool-call-parser's format, else the one the chat template writes, else Hermes (the
    format of jaxserve's default tool prompt)."""
    if parser_name is not None:
        return FORMATS[parser_name]
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<tool_call>" in template or not template_supports_tools(template):
        return FORMATS["hermes"]
    if "<|python_tag|>" in template or "<|eom_id|>" in template or '"parameters"' in template:
        return FORMATS["llama3_json"]
    return FORMATS["hermes"]


def special_token_ids(tokenizer, fmt: ToolCallFormat) -> dict[str, int]:
    """The format's marks that are special tokens of this tokenizer (a grammar names them by id,
    and their text survives detokenising only with skip_special_tokens off)."""
    marks = {fmt.trigger, fmt.closing} - {None, ""}
    return {tok.content: i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if tok.special and tok.content in marks}


# A template with no tools section gets this system text (in the Hermes format the parser reads),
# the assistant's earlier calls written as <tool_call> blocks and the tools' results as user turns.
DEFAULT_TOOL_PROMPT = (
    "You can call functions to answer. They are described by these JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call functions, reply with nothing but one block per call, each a JSON object with the function's "
    "name and its arguments:\n<tool_call>\n{{\"name\": \"function name\", \"arguments\": {{\"argument\": "
    "\"value\"}}}}\n</tool_call>\nThe results come back inside <tool_response></tool_response>.")


def with_default_tool_prompt(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """`messages` for a chat template that knows no tools: the tools described in the system
    message, calls and results written as text."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                 ensure_ascii=False) for c in m["tool_calls"]]
            text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
            out.append({"role": "assistant", "content": f"{m['content']}\n{text}" if m["content"] else text})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t.as_template_dict(), ensure_ascii=False)
                                                            for t in tools))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": out[0]["role"], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ---- parsing generated text ----------------------------------------------------------------------

@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""        # the arguments' JSON text as the model wrote it
    complete: bool = False     # the call's object closed (a cut-off call is not)

    def arguments_object(self):
        """The arguments parsed (Ollama's form); None when they are not valid JSON."""
        try:
            return json.loads(self.arguments or "{}")
        except json.JSONDecodeError:
            return None


@dataclasses.dataclass
class CallFragment:
    """A piece of one call for a stream: the first carries id and name."""
    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclasses.dataclass
class ParsedText:
    content: str = ""
    calls: list[CallFragment] = dataclasses.field(default_factory=list)
    completed: list[ToolCall] = dataclasses.field(default_factory=list)  # calls that closed in this piece

    def extend(self, other: ParsedText) -> ParsedText:
        self.content += other.content
        self.calls += other.calls
        self.completed += other.completed
        return self


_WHITESPACE = " \t\r\n"


class _CallScanner:
    """One call's JSON object, a character at a time: its name once that string is whole, and its
    arguments value's raw text as it arrives. `feed` says whether the character belonged to the
    object (False once the object is closed, or on text that is not such an object: `failed`)."""

    def __init__(self, argument_keys: tuple[str, ...]):
        self.argument_keys = argument_keys
        self.state = "start"   # start, key_or_end, key, colon, value, after_value, done, failed
        self.raw: list[str] = []
        self.key_raw: list[str] = []
        self.key: str | None = None
        self.value: list[str] = []
        self.nesting = 0
        self.in_string = self.escaped = False
        self.name: str | None = None
        self.arguments: str | None = None
        self.pending_arguments: list[str] = []   # argument text not handed out yet

    @property
    def reading_arguments(self) -> bool:
        return self.state == "value" and self.key in self.argument_keys and self.value[:1] == ["{"]

    def feed(self, ch: str) -> bool:
        if self.state in ("done", "failed"):
            return False
        handled = getattr(self, f"_{self.state}")(ch)
        if handled:
            self.raw.append(ch)
        return handled

    def _fail(self) -> bool:
        self.state = "failed"
        return False

    def _start(self, ch):
        if ch in _WHITESPACE:
            return True
        if ch != "{":
            return self._fail()
        self.state = "key_or_end"
        return True

    def _key_or_end(self, ch):
        if ch in _WHITESPACE:
            return True
        if ch == '"':
            self.state, self.key_raw = "key", [ch]
            return True
        if ch == "}":
            self.state = "done" if self.name is not None else "failed"
            return self.state == "done"
        return self._fail()

    def _string_closed_by(self, ch: str) -> bool:
        """Inside a JSON string: whether `ch` is its closing quote (escapes followed)."""
        if self.escaped:
            self.escaped = False
        elif ch == "\\":
            self.escaped = True
        else:
            return ch == '"'
        return False

    def _key(self, ch):
        self.key_raw.append(ch)
        if self._string_closed_by(ch):
            self.key, self.state = json.loads("".join(self.key_raw)), "colon"
        return True

    def _colon(self, ch):
        if ch in _WHITESPACE:
            return True
        if ch != ":":
            return self._fail()
        self.state, self.value, self.nesting = "value", [], 0
        return True

    def _value(self, ch):
        if not self.value:
            if ch in _WHITESPACE:
                return True
            self.value.append(ch)
            if ch in "{[":
                self.nesting = 1
            elif ch == '"':
                self.in_string = True
            if self.reading_arguments:
                self.pending_arguments.append(ch)
            return True
        if not self.in_string and self.nesting == 0 and self.value[0] != '"' and ch in ",}" + _WHITESPACE:
            self._end_value()                  # a number or literal ends before this character
            return self._after_value(ch)
        self.value.append(ch)
        if self.reading_arguments:
            self.pending_arguments.append(ch)
        if self.in_string:
            if self._string_closed_by(ch):
                self.in_string = False
                if self.nesting == 0:
                    self._end_value()
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.nesting += 1
        elif ch in "}]":
            self.nesting -= 1
            if self.nesting == 0:
                self._end_value()
        return True

    def _end_value(self) -> None:
        text = "".join(self.value)
        if self.key == "name":
            try:
                name = json.loads(text)
            except json.JSONDecodeError:
                name = None
            if not isinstance(name, str):
                self.state = "failed"
                return
            self.name = name
        elif self.key in self.argument_keys and self.arguments is None:
            if text.startswith('"'):  # arguments written as a JSON string holding the JSON
                try:
                    text = json.loads(text)
                except json.JSONDecodeError:
                    pass
                self.pending_arguments.append(text)
            self.arguments = text
        self.state = "after_value"

    def _after_value(self, ch):
        if ch in _WHITESPACE:
            return True
        if ch == ",":
            self.state = "key_or_end"
            return True
        if ch == "}":
            self.state = "done" if self.name is not None else "failed"
            return self.state == "done"
        return self._fail()


class ToolCallParser:
    """Generated text -> content and tool calls, one piece at a time. `feed` returns what a piece
    makes (content text, call fragments, calls that closed); text that may still turn out to be
    part of a call (a trigger's first characters, a call's object before its name) is held until
    it is known. `max_calls` (1 when parallel calls are off) drops the calls after it."""

    def __init__(self, fmt: ToolCallFormat, *, max_calls: int | None = None):
        self.fmt, self.max_calls = fmt, max_calls
        self.calls: list[ToolCall] = []
        self.content = ""                 # the content handed out so far
        self.text = ""                    # everything fed
        self.state = "start" if fmt.bare_json else "content"
        self.held = ""                    # content characters not yet known to be content
        self.literal, self.literal_pos, self.literal_next = "", 0, ""
        self.scanner: _CallScanner | None = None
        self.current: ToolCall | None = None  # the call being read, once its name is known
        self.current_kept = False         # ... and within max_calls
        self.opened_with = ""             # the text that opened the call being read
        self.after_call = False           # whitespace right after a call is not content

    def feed(self, text: str) -> ParsedText:
        out = ParsedText()
        self.text += text
        for ch in text:
            self._char(ch, out)
        self.content += out.content
        return out

    def finish(self) -> ParsedText:
        """The end of the output: held text is content after all (a cut-off call stays incomplete)."""
        out = ParsedText()
        if self.state == "call" and self.current is None:      # an object that never became a call
            out.content += self.opened_with + "".join(self.scanner.raw)
        elif self.state == "literal" and self.literal_next == "call":  # a block's opening, cut short
            out.content += self.opened_with + self.literal[:self.literal_pos]
        if self.held and not (self.after_call and not self.held.strip()):
            out.content += self.held
        self.held, self.state = "", "content"
        self.content += out.content
        return out

    def result(self) -> tuple[str, list[ToolCall]]:
        """(content, calls) once everything was fed and finished. A call cut off, or with arguments
        that are not JSON, makes the whole text content, as vLLM answers: nothing half-parsed."""
        calls = self.calls[:self.max_calls] if self.max_calls is not None else self.calls
        if any(not c.complete or c.arguments_object() is None for c in calls):
            return self.text, []
        return self.content, calls

    # -- states --

    def _char(self, ch: str, out: ParsedText) -> None:
        if self.state == "start":    # Llama 3: a reply that opens with "{" is a call
            if ch in _WHITESPACE:
                self.held += ch
                return
            self.state = "content"
            if ch == "{":
                self.held = ""
                self._open_call("")
                self._call_char(ch, out)
            else:
                self._content_char(ch, out)
        elif self.state == "content":
            self._content_char(ch, out)
        elif self.state == "literal":
            self._literal_char(ch, out)
        elif self.state == "call":
            self._call_char(ch, out)
        else:
            self._after_call_char(ch, out)

    def _content_char(self, ch: str, out: ParsedText) -> None:
        self.held += ch
        trigger = self.fmt.trigger
        if trigger and self.held.endswith(trigger):
            before, self.held = self.held[:-len(trigger)], ""
            if not (self.after_call and not before.strip()):
                out.content += before
            self.after_call = False
            self.opened_with = trigger
            self._expect(self.fmt.opening, "call")
            return
        keep = 0  # hold only the longest tail that could still become the trigger
        if trigger:
            for n in range(min(len(trigger) - 1, len(self.held)), 0, -1):
                if trigger.startswith(self.held[-n:]):
                    keep = n
                    break
        emit, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        if self.after_call and not emit.strip():
            return
        self.after_call = False
        out.content += emit

    def _expect(self, literal: str, then: str) -> None:
        if not literal:
            self._enter(then)
        else:
            self.state, self.literal, self.literal_pos, self.literal_next = "literal", literal, 0, then

    def _enter(self, state: str) -> None:
        if state == "call":
            self._open_call(self.opened_with)
        else:
            self.state, self.after_call = "content", True

    def _literal_char(self, ch: str, out: ParsedText) -> None:
        if self.literal_pos == 0 and ch in _WHITESPACE:
            return
        if ch == self.literal[self.literal_pos]:
            self.literal_pos += 1
            if self.literal_pos == len(self.literal):
                self.opened_with += self.literal
                self._enter(self.literal_next)
            return
        # Not the format after all: what was read goes out as content.
        if self.literal_next == "call":
            out.content += self.opened_with
        out.content += self.literal[:self.literal_pos]
        self.state = "content"
        self._content_char(ch, out)

    def _open_call(self, opened_with: str) -> None:
        self.scanner, self.current, self.opened_with = _CallScanner(self.fmt.argument_keys), None, opened_with
        self.state = "call"

    def _call_char(self, ch: str, out: ParsedText) -> None:
        scanner = self.scanner
        consumed = scanner.feed(ch)
        if self.current is None and scanner.name is not None:
            self.current = ToolCall(self.fmt.new_call_id(), scanner.name)
            self.current_kept = self.max_calls is None or len(self.calls) < self.max_calls
            if self.current_kept:
                self.calls.append(self.current)
                out.calls.append(CallFragment(len(self.calls) - 1, "", self.current.id, self.current.name))
        call, emitting = self.current, self.current_kept
        if call is not None and scanner.pending_arguments:
            piece = "".join(scanner.pending_arguments)
            scanner.pending_arguments.clear()
            call.arguments += piece
            if emitting:
                if out.calls and out.calls[-1].index == len(self.calls) - 1:
                    out.calls[-1].arguments += piece
                else:
                    out.calls.append(CallFragment(len(self.calls) - 1, piece))
        if scanner.state == "failed":
            if call is None:   # never a call: the object's text is content
                out.content += self.opened_with + "".join(scanner.raw)
            self.scanner, self.current, self.state = None, None, "content"
            if not consumed:
                self._content_char(ch, out)
        elif scanner.state == "done":
            call.complete = True
            if scanner.arguments is None:  # a call written without arguments takes none
                call.arguments = "{}"
                if emitting:
                    out.calls.append(CallFragment(len(self.calls) - 1, "{}"))
            if emitting:
                out.completed.append(call)
            self.scanner, self.current, self.state = None, None, "after_call"

    def _after_call_char(self, ch: str, out: ParsedText) -> None:
        if ch in _WHITESPACE:
            return
        if self.fmt.separator and ch == self.fmt.separator:
            self._open_call(ch)
        elif self.fmt.closing:
            self.opened_with = ""
            self._expect(self.fmt.closing, "content")
            self._literal_char(ch, out)
        else:
            self.state, self.after_call = "content", True
            self._content_char(ch, out)


def parse_text(fmt: ToolCallFormat, text: str, *, max_calls: int | None = None) -> tuple[str, list[ToolCall]]:
    """A whole output's (content, calls)."""
    parser = ToolCallParser(fmt, max_calls=max_calls)
    parser.feed(text)
    parser.finish()
    return parser.result()
