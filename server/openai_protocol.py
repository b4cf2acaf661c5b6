"""The OpenAI wire format: request bodies -> validated requests with SamplingParams, and engine
outputs -> completion / chat objects, stream chunks, logprobs and error bodies.

Pure functions over dicts; no Sanic here, so the conversion is tested without a server.
"""
from __future__ import annotations

import dataclasses
import re

from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from jaxserve.server import logprobs as logprob_format
from jaxserve.server.chat import ChatOutputFormats, normalize_messages
from jaxserve.server.tool_calls import Tool, ToolChoice, parse_tool_choice, parse_tools
from jaxserve.server.validation import RequestError, device_ints, get, sampling_error

# OpenAI (and vLLM extra) sampling fields -> (SamplingParams name, kind).
_SAMPLING_FIELDS = {
    "temperature": "number", "top_p": "number", "n": "int", "seed": "int", "presence_penalty": "number",
    "frequency_penalty": "number", "top_k": "int", "min_p": "number", "repetition_penalty": "number",
    "min_tokens": "int", "ignore_eos": "bool", "stop_token_ids": "int_list", "skip_special_tokens": "bool",
    "include_stop_str_in_output": "bool", "spaces_between_special_tokens": "bool",
    # jaxserve's pluggable samplers, under Ollama's option names (see SamplingParams)
    "sampler": "str", "typical_p": "number", "tfs_z": "number", "mirostat": "int", "mirostat_tau": "number",
    "mirostat_eta": "number", "repeat_last_n": "int",
}


def error_body(message: str, *, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass
class CompletionRequest:
    model: str
    prompts: list                   # each a string or a list of token ids
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    constraint_field: str | None = None  # where the structured-output constraint came from


@dataclasses.dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    add_generation_prompt: bool
    max_tokens_field: str = "max_tokens"  # the client's name for it: max_completion_tokens or max_tokens
    constraint_field: str | None = None   # where the structured-output constraint came from
    tools: list[Tool] = dataclasses.field(default_factory=list)
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    template_kwargs: dict = dataclasses.field(default_factory=dict)  # vLLM's chat_template_kwargs

    @property
    def parses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice.mode != "none"


# vLLM's older guided_* fields -> the StructuredOutputsParams field each sets.
_GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                  "guided_grammar": "grammar"}
_STRUCTURED_FIELDS = ("json", "json_object", "regex", "choice", "grammar", "whitespace_pattern",
                      "disable_any_whitespace")


def structured_outputs(body: dict) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's output constraint and the field it came from: OpenAI's response_format
    (json_object; json_schema with its schema), vLLM's structured_outputs object, or its older
    guided_* fields. At most one of the three ways."""
    fmt = get(body, "response_format", "object")
    given = [name for name in ("structured_outputs", *_GUIDED_FIELDS) if body.get(name) is not None]
    if fmt is not None and fmt.get("type") != "text":
        given.insert(0, "response_format")
    if len(given) > 1 and not all(name.startswith("guided_") for name in given):
        raise RequestError(f"set one of response_format, structured_outputs or guided_*, not {given}",
                           param=given[1], code="invalid_value")
    if not given:
        return None, None
    kwargs: dict = {}
    field = given[0]
    if field == "response_format":
        kind = fmt.get("type")
        if kind == "json_object":
            kwargs["json_object"] = True
        elif kind == "json_schema":
            spec = get(fmt, "json_schema", "object", where="response_format.")
            if spec is None or not isinstance(spec.get("schema", {}), dict):
                raise RequestError("response_format.json_schema must be an object with a 'schema' object",
                                   param="response_format.json_schema")
            kwargs["json"] = spec.get("schema", {})  # strict or not, the output follows the schema
        else:
            raise RequestError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                               param="response_format.type", code="invalid_value")
    elif field == "structured_outputs":
        value = get(body, "structured_outputs", "object")
        unknown = sorted(set(value) - set(_STRUCTURED_FIELDS))
        if unknown:
            raise RequestError(f"structured_outputs.{unknown[0]} is not a structured-output field "
                               f"(known: {', '.join(_STRUCTURED_FIELDS)})", param=f"structured_outputs.{unknown[0]}")
        kwargs = {k: v for k, v in value.items() if v is not None}
    else:
        kwargs = {_GUIDED_FIELDS[name]: body[name] for name in given}
        field = given[0]
    if body.get("guided_whitespace_pattern") is not None:
        kwargs["whitespace_pattern"] = body["guided_whitespace_pattern"]
    try:
        return StructuredOutputsParams(**kwargs), field
    except (ValueError, TypeError) as e:
        message = str(e)
        if field != "structured_outputs":  # say the field the client sent
            message = re.sub(r"^structured_outputs(\.\w+)?", field, message)
        raise RequestError(message, param=field, code="invalid_value") from None


def _refuse_unsupported(body: dict) -> None:
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported yet", param="logit_bias", code="unsupported_parameter")
    if body.get("functions") or body.get("function_call"):
        name = "functions" if body.get("functions") else "function_call"
        raise RequestError(f"{name} is OpenAI's deprecated form: send tools and tool_choice", param=name,
                           code="unsupported_parameter")
    if body.get("use_beam_search"):
        raise RequestError("use_beam_search is not supported", param="use_beam_search",
                           code="unsupported_parameter")


def _stream_fields(body: dict) -> tuple[bool, bool]:
    stream = get(body, "stream", "bool", False)
    options = get(body, "stream_options", "object")
    if options is not None and not stream:
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    include_usage = bool(options and get(options, "include_usage", "bool", False, where="stream_options."))
    return stream, include_usage


def _sampling_params(body: dict, *, max_tokens, logprobs: int | None, prompt_logprobs: int | None = None,
                     constraint: StructuredOutputsParams | None = None, keep_special_tokens: bool = False
                     ) -> SamplingParams:
    kwargs = {"skip_special_tokens": False} if keep_special_tokens else {}
    for name, kind in _SAMPLING_FIELDS.items():
        value = get(body, name, kind)
        if value is not None:
            kwargs[name] = value
    stop = get(body, "stop", "str_or_list")
    best_of = get(body, "best_of", "int")
    if best_of is not None and best_of != kwargs.get("n", 1):
        raise RequestError("best_of different from n is not supported", param="best_of",
                           code="unsupported_parameter")
    device_ints(kwargs, lambda name: name)
    try:
        return SamplingParams(**kwargs, stop=stop, max_tokens=max_tokens, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, structured_outputs=constraint)
    except ValueError as e:
        raise sampling_error(e) from None


def parse_completion(body: dict) -> CompletionRequest:
    _refuse_unsupported(body)
    if body.get("tools"):
        raise RequestError("tools are for /v1/chat/completions", param="tools", code="unsupported_parameter")
    model = get(body, "model", "str", required=True)
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise RequestError("'prompt' must be a string, an array of strings, an array of token ids or an array "
                           "of token id arrays (non-empty)", param="prompt", code="invalid_type")
    if body.get("suffix"):
        raise RequestError("suffix is not supported", param="suffix", code="unsupported_parameter")
    stream, include_usage = _stream_fields(body)
    echo = get(body, "echo", "bool", False)
    logprobs = get(body, "logprobs", "int")
    constraint, constraint_field = structured_outputs(body)
    params = _sampling_params(body, max_tokens=get(body, "max_tokens", "int", 16), logprobs=logprobs,
                              constraint=constraint,
                              prompt_logprobs=logprobs if echo and logprobs is not None else None)
    return CompletionRequest(model, prompts, params, stream, include_usage, echo, constraint_field)


def _tools(body: dict, constraint, constraint_field, formats: ChatOutputFormats | None):
    """(tools, tool_choice, parallel_tool_calls, constraint, constraint_field): required or a named
    function holds decoding to the tool-call format, in place of any other constraint."""
    tools = parse_tools(body.get("tools"))
    choice = parse_tool_choice(body.get("tool_choice"), tools)
    parallel = get(body, "parallel_tool_calls", "bool", True)
    if choice.constrained:
        if constraint is not None:
            raise RequestError(f"tool_choice {choice.mode!r} cannot be combined with {constraint_field}",
                               param="tool_choice", code="invalid_value")
        if formats is None:
            raise RequestError("tool calling is not available on this server", param="tools")
        return tools, choice, parallel, formats.tool_constraint(tools, choice, parallel), "tools"
    return tools, choice, parallel, constraint, constraint_field


def parse_chat(body: dict, formats: ChatOutputFormats | None = None) -> ChatRequest:
    _refuse_unsupported(body)
    model = get(body, "model", "str", required=True)
    if "messages" not in body:
        raise RequestError("'messages' is required", param="messages", code="missing_required_parameter")
    messages = normalize_messages(body["messages"])
    if not messages:
        raise RequestError("'messages' must hold at least one message", param="messages", code="invalid_value")
    stream, include_usage = _stream_fields(body)
    logprobs = get(body, "logprobs", "bool", False)
    top_logprobs = get(body, "top_logprobs", "int")
    if top_logprobs is not None and not logprobs:
        raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    max_tokens = get(body, "max_completion_tokens", "int")
    if max_tokens is None:
        max_tokens = get(body, "max_tokens", "int")
    elif body.get("max_tokens") is not None:
        get(body, "max_tokens", "int")  # still type-checked
    constraint, constraint_field = structured_outputs(body)
    tools, tool_choice, parallel, constraint, constraint_field = _tools(body, constraint, constraint_field, formats)
    template_kwargs = get(body, "chat_template_kwargs", "object") or {}
    keep_special = bool(tools) and tool_choice.mode != "none" and formats is not None and formats.needs_special_tokens
    try:
        params = _sampling_params(body, max_tokens=max_tokens, logprobs=(top_logprobs or 0) if logprobs else None,
                                  constraint=constraint, keep_special_tokens=keep_special)
    except RequestError as e:
        # SamplingParams names its own fields; say the one the client sent.
        renamed = {"max_tokens": "max_completion_tokens" if body.get("max_completion_tokens") is not None else None,
                   "logprobs": "top_logprobs"}.get(e.param)
        if renamed:
            e.message = e.message.replace(e.param, renamed, 1)
            e.param = renamed
            e.args = (e.message,)
        raise
    if get(body, "continue_final_message", "bool", False):
        raise RequestError("continue_final_message is not supported", param="continue_final_message",
                           code="unsupported_parameter")
    return ChatRequest(model, messages, params, stream, include_usage, logprobs,
                       get(body, "add_generation_prompt", "bool", True),
                       "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens",
                       constraint_field, tools, tool_choice, parallel, template_kwargs)


# ---- completion choices --------------------------------------------------------------------------

class CompletionChoices:
    """The deltas of one /v1/completions request (each prompt n times) as choice fragments for
    stream chunks, accumulated into the final choices. Choice index = prompt index * n + sample."""

    def __init__(self, tokenizer, prompts: list[tuple[list[int], str | None]], n: int, echo: bool,
                 num_top: int | None):
        self.tokenizer, self.prompts, self.n, self.echo, self.num_top = tokenizer, prompts, n, echo, num_top
        self._logprobs: dict[int, logprob_format.CompletionLogprobs] = {}
        self._prompt_logprobs: dict[int, list] = {}   # prompt index -> its prompt logprobs (first delta only)
        self.choices: dict[int, dict] = {}
        self.num_generated = 0

    def fragment(self, prompt_index: int, out, c) -> dict | None:
        """The choice fragment one CompletionOutput delta makes (None when it carries nothing)."""
        if out.prompt_logprobs is not None:
            self._prompt_logprobs[prompt_index] = out.prompt_logprobs
        choice = prompt_index * self.n + c.index
        text, lp = c.text, None
        builder = self._logprobs.get(choice)
        if builder is None:  # the choice's first fragment: the echoed prompt goes first
            builder = self._logprobs[choice] = logprob_format.CompletionLogprobs(self.tokenizer, self.num_top or 0)
            if self.echo:
                ids, prompt = self.prompts[prompt_index]
                prompt = prompt if prompt is not None else self.tokenizer.decode(ids)
                if self.num_top is not None:
                    entries = self._prompt_logprobs.get(prompt_index) or [None] * len(ids)
                    lp = builder.piece(entries, ids)
                else:
                    builder.skip_text(prompt)
                text = prompt + text
        if self.num_top is not None:
            lp = logprob_format.merge(lp, builder.piece(c.logprobs or [], c.token_ids))
        self.num_generated += len(c.token_ids)
        if not text and not c.token_ids and c.finish_reason is None:
            return None
        return {"index": choice, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason}

    def add(self, fragment: dict) -> None:
        entry = self.choices.get(fragment["index"])
        if entry is None:
            self.choices[fragment["index"]] = dict(fragment)
            return
        entry["text"] += fragment["text"]
        if fragment["logprobs"] is not None:
            entry["logprobs"] = logprob_format.merge(entry["logprobs"], fragment["logprobs"])
        if fragment["finish_reason"] is not None:
            entry["finish_reason"], entry["stop_reason"] = fragment["finish_reason"], fragment["stop_reason"]

    def final(self) -> list[dict]:
        return [self.choices[k] for k in sorted(self.choices)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
