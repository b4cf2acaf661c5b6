"""Chat messages -> prompt text and token ids, through the model's (or --chat-template's) Jinja
template, with the request's tools; and a chat choice's generated text -> reasoning, content and
tool calls. Shared by /v1/chat/completions, /api/chat, /api/generate and /tokenize.
"""
from __future__ import annotations

import dataclasses
import json

from jaxserve.sampling_params import StructuredOutputsParams
from jaxserve.server import tool_calls
from jaxserve.server.reasoning import REASONING_FORMATS, ReasoningFormat, ReasoningParser
from jaxserve.server.tool_calls import ParsedText, Tool, ToolCall, ToolCallFormat, ToolCallParser
from jaxserve.server.validation import RequestError, get

ROLES = ("system", "developer", "user", "assistant", "tool")


def message_text(message: dict, where: str, *, allow_images: bool = False) -> str:
    """A message's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"'{where}.content' must be a string or an array of content parts",
                           param=f"{where}.content", code="invalid_type")
    texts = []
    for j, part in enumerate(content):
        label = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise RequestError(f"'{label}' must be an object", param=label, code="invalid_type")
        kind = part.get("type")
        if kind != "text":
            raise RequestError(f"'{label}.type' {kind!r} is not supported: this model takes text parts only",
                               param=f"{label}.type", code="unsupported_value")
        texts.append(get(part, "text", "str", required=True, nullable=False, where=f"{label}."))
    return "".join(texts)


def normalize_messages(messages, param: str = "messages") -> list[dict]:
    """Validated [{"role", "content"}] with text content, for the chat template."""
    if not isinstance(messages, list):
        raise RequestError(f"'{param}' must be an array of messages", param=param, code="invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"'{where}' must be an object", param=where, code="invalid_type")
        role = get(m, "role", "str", required=True, nullable=False, where=f"{where}.")
        if role not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}",
                               param=f"{where}.role", code="invalid_value")
        if m.get("images"):
            raise RequestError(f"'{where}.images': this model does not take images", param=f"{where}.images")
        message = {"role": role, "content": message_text(m, where)}
        if m.get("tool_calls"):
            if role != "assistant":
                raise RequestError(f"'{where}.tool_calls' belongs to assistant messages only",
                                   param=f"{where}.tool_calls", code="invalid_value")
            message["tool_calls"] = _history_tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            call_id = get(m, "tool_call_id", "str", where=f"{where}.")
            name = get(m, "tool_name", "str", where=f"{where}.") or get(m, "name", "str", where=f"{where}.")
            if call_id is not None:
                message["tool_call_id"] = call_id
            if name is not None:
                message["name"] = name
        out.append(message)
    return out


def _history_tool_calls(value, where: str) -> list[dict]:
    """An assistant message's earlier calls, in the form chat templates read (arguments as an
    object): OpenAI's (arguments a JSON string, with id and type) or Ollama's (an object)."""
    if not isinstance(value, list):
        raise RequestError(f"'{where}' must be an array of tool calls", param=where, code="invalid_type")
    calls = []
    for j, call in enumerate(value):
        label = f"{where}[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RequestError(f"'{label}.function' must be an object", param=f"{label}.function",
                               code="invalid_type")
        name = get(function, "name", "str", required=True, nullable=False, where=f"{label}.function.")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError as e:
                raise RequestError(f"'{label}.function.arguments' is not valid JSON: {e}",
                                   param=f"{label}.function.arguments", code="invalid_value") from None
        if not isinstance(arguments, dict):
            raise RequestError(f"'{label}.function.arguments' must be a JSON object",
                               param=f"{label}.function.arguments", code="invalid_type")
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return calls


def render_chat(tokenizer, messages: list[dict], chat_template: str | None, *,
                add_generation_prompt: bool = True, tools: list[Tool] | None = None,
                template_kwargs: dict | None = None) -> tuple[str, list[int]]:
    """The templated prompt and its token ids (the template writes any BOS itself). Tools go to
    a template that takes them; one that does not gets jaxserve's default tool prompt."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if not template:
        raise RequestError("this model has no chat template; pass --chat-template or use /v1/completions",
                           param="messages")
    kwargs = dict(template_kwargs or {})
    if tool_calls.template_supports_tools(template):
        if tools:
            kwargs["tools"] = [t.as_template_dict() for t in tools]
    elif tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        messages = tool_calls.with_default_tool_prompt(messages, tools or [])
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=chat_template, **kwargs)
    except Exception as e:  # Jinja raises whatever the template's own checks raise
        raise RequestError(f"the chat template rejected these messages: {e}", param="messages") from None
    return text, tokenizer(text, add_special_tokens=False).input_ids


class ChoiceParser:
    """One chat choice's generated text, piece by piece: the reasoning split off first (with a
    reasoning parser), then tool calls parsed from the rest (when the request has tools)."""

    def __init__(self, reasoning: ReasoningFormat | None, tools: ToolCallFormat | None, *,
                 max_calls: int | None = None):
        self.reasoning = ReasoningParser(reasoning) if reasoning is not None else None
        self.tools = ToolCallParser(tools, max_calls=max_calls) if tools is not None else None
        self.reasoning_text = ""
        self.content_text = ""   # the answer without reasoning, calls included

    def feed(self, text: str, *, last: bool = False) -> tuple[str, ParsedText]:
        """(reasoning, parsed answer) of one piece; `last` flushes what was held."""
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if last and self.reasoning:
            more_reasoning, more_content = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        self.reasoning_text += reasoning
        self.content_text += content
        if self.tools is None:
            return reasoning, ParsedText(content)
        parsed = self.tools.feed(content)
        if last:
            parsed.extend(self.tools.finish())
        return reasoning, parsed

    def result(self) -> tuple[str, str, list[ToolCall]]:
        """(reasoning, content, calls) of the whole choice, once its last piece was fed."""
        if self.tools is None:
            return self.reasoning_text, self.content_text, []
        content, calls = self.tools.result()
        return self.reasoning_text, content, calls


@dataclasses.dataclass(frozen=True)
class ChatOutputFormats:
    """What the served model writes besides its answer, fixed at start-up: its tool-call format
    (--tool-call-parser or its chat template's) and its reasoning format (--reasoning-parser)."""
    tools: ToolCallFormat
    special_tokens: dict[str, int]      # the tool format's marks that are special tokens
    reasoning: ReasoningFormat | None

    @classmethod
    def of(cls, config, card, tokenizer) -> ChatOutputFormats:
        fmt = tool_calls.format_for(config.tool_call_parser, config.chat_template or getattr(card, "chat_template", None))
        special = tool_calls.special_token_ids(tokenizer, fmt) if tokenizer is not None else {}
        return cls(fmt, special, REASONING_FORMATS.get(config.reasoning_parser))

    def parser(self, *, tools: bool, parallel: bool = True) -> ChoiceParser | None:
        """A choice's parser: tool calls read when the request has tools (and tool_choice is not
        none), reasoning split when the server has a reasoning parser; None when there is
        neither (the text is the content as it comes)."""
        if not tools and self.reasoning is None:
            return None
        return ChoiceParser(self.reasoning, self.tools if tools else None, max_calls=None if parallel else 1)

    def tool_constraint(self, tools: list[Tool], choice: tool_calls.ToolChoice,
                        parallel: bool) -> StructuredOutputsParams:
        """tool_choice required (one call, or with parallel calls one or more) or a named function
        (exactly one call of it): decoding held to this format and the tools' schemas."""
        chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
        return StructuredOutputsParams(grammar=self.tools.grammar(
            chosen, parallel=parallel and choice.mode == "required", special_tokens=self.special_tokens))

    @property
    def needs_special_tokens(self) -> bool:
        """The format's marks are special tokens: their text must stay in the output to be parsed."""
        return bool(self.special_tokens)
