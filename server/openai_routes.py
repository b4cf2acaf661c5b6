"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (JSON or SSE), and
vLLM's /tokenize, /detokenize, /health, /version (/v1/embeddings is server/embedding_routes.py). A
request's `model` is a served name of the base model, the name of a LoRA adapter (listed by
/v1/models with the base model as its parent) or, on the generating routes, a stored model (its
parameters filling the fields the request leaves out; its system prompt, messages and template as
on Ollama's routes) or weights by path, loaded on demand (server/model_pool.py).
"""
from __future__ import annotations

import datetime
import time
import uuid

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

import jaxserve
from jaxserve import stored_defaults
from jaxserve.async_engine import GENERATE, RequestRefusedError
from jaxserve.input_processor import RequestValidationError, check_token_ids
from jaxserve.lora import LoRARequest
from jaxserve.server import logprobs
from jaxserve.server import openai_protocol as proto
from jaxserve.server.chat import normalize_messages, render_chat
from jaxserve.server.model_targets import STORED_ADAPTER_PREFIX, Target, holds_model, render_prompt, resolve
from jaxserve.server.streaming import Shape, respond
from jaxserve.server.tool_calls import ParsedText
from jaxserve.server.validation import RequestError, get, parse_json_body, require_capability

bp = Blueprint("openai")


def _target(request: Request, name: str | None) -> tuple[str, LoRARequest | None]:
    """The model a request names, and the LoRA adapter it runs with (None: the base model)."""
    card = request.app.ctx.card
    if name is None:
        name = card.names[0]
    request.ctx.model = name  # for the request's span
    if name in card.names:
        return name, None
    lora = request.app.ctx.engine.loras.get(name)
    if lora is None:
        raise RequestError(f"The model `{name}` does not exist.", param="model", status=404,
                           code="model_not_found")
    return name, lora


async def _resolve(request: Request, body: dict) -> tuple[Target, dict]:
    """The model a generating request names (served, an adapter, a stored model or weights by path,
    loaded if need be: the route must be wrapped in @holds_model) and the body with a stored
    model's parameters where the request sets nothing."""
    name = get(body, "model", "str") or request.app.ctx.card.names[0]
    target = await resolve(request, name, api="openai")
    return target, (stored_defaults.openai_body(target.stored, body) if target.stored is not None else body)


def _model(request: Request, name: str | None) -> str:
    return _target(request, name)[0]


def _embedding_only(model: str, api: str) -> str:
    return f"The model `{model}` does not support the {api} API: it is an embedding model (use /v1/embeddings)"


def _tokenize(tokenizer, prompts) -> list[tuple[list[int], str | None]]:
    """(token ids, text) per prompt; run on the tokenizer thread (AsyncEngine.with_tokenizer)."""
    return [(tokenizer(p).input_ids, p) if isinstance(p, str) else (list(p), None) for p in prompts]


def _constraint_field(field: str | None) -> dict[str, str]:
    """The engine's name of a refused constraint (structured_outputs.<kind>) -> the field the client used."""
    if field is None or field == "structured_outputs":
        return {}
    return {f"structured_outputs.{kind}": field for kind in ("json", "json_object", "regex", "choice", "grammar")}


async def _add_all(request: Request, prompts: list[tuple[list[int], str | None]], params, kind: str,
                   admission, stream: bool, field_names: dict[str, str] | None = None,
                   lora: LoRARequest | None = None, engine=None) -> list:
    """One engine request per prompt, each taking its places from ``admission``; if any is refused,
    the ones already queued are aborted, and the refusal names its field as this API does
    (``field_names``: the engine's name -> this API's; ``engine``: default the served model's)."""
    engine = engine or request.app.ctx.engine
    base = f"{kind}-{uuid.uuid4().hex}"
    streams = []
    try:
        if len(prompts) > 1:  # all or none: no prompt starts when another would be refused
            for ids, _ in prompts:
                engine.check_request(ids, params)
        for i, (ids, text) in enumerate(prompts):
            streams.append(await engine.add_request(base if len(prompts) == 1 else f"{base}-{i}", ids, params,
                                                    prompt_text=text, log_id=request.ctx.request_id,
                                                    admission=admission, stream=stream, lora_request=lora))
    except RequestRefusedError as e:
        for s in streams:
            s.close()
        raise e.renamed(field_names or {}) from None
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


# ---- /v1/completions -----------------------------------------------------------------------------

class _OpenAIShape(Shape):
    def __init__(self, rid: str, obj: str, model: str, include_usage: bool):
        self.head = {"id": rid, "object": obj, "created": int(time.time()), "model": model}
        self.include_usage = include_usage
        self.usage_field = {"usage": None} if include_usage else {}

    def error(self, error) -> dict:
        if isinstance(error, RequestError):
            return proto.error_body(error.message, kind=error.kind, param=error.param, code=error.code)
        return proto.error_body(str(error), kind="server_error")  # the engine failed mid-stream


class _CompletionsShape(_OpenAIShape):
    """/v1/completions: every prompt n times, choice index = prompt index * n + sample."""

    def __init__(self, rid, model, req, choices: proto.CompletionChoices, num_prompt: int):
        super().__init__(rid, "text_completion", model, req.include_usage)
        self.choices, self.num_prompt = choices, num_prompt

    def chunks(self, prompt_index, out, c):
        fragment = self.choices.fragment(prompt_index, out, c)
        return [] if fragment is None else [{**self.head, "choices": [fragment], **self.usage_field}]

    def closing(self):
        if not self.include_usage:
            return []
        return [{**self.head, "choices": [], "usage": proto.usage(self.num_prompt, self.choices.num_generated)}]

    def add(self, prompt_index, out, c):
        fragment = self.choices.fragment(prompt_index, out, c)
        if fragment is not None:
            self.choices.add(fragment)

    def body(self):
        return {**self.head, "choices": self.choices.final(), "system_fingerprint": None,
                "usage": proto.usage(self.num_prompt, self.choices.num_generated)}


class _ChatShape(_OpenAIShape):
    """/v1/chat/completions: n choices of one conversation; the role comes first when streamed.
    Each choice's text goes through its parser: reasoning into `reasoning`, tool calls into
    `tool_calls` (streamed as OpenAI's fragments), the rest into `content`."""

    def __init__(self, rid, model, req, role: str, num_prompt: int, formats):
        super().__init__(rid, "chat.completion.chunk" if req.stream else "chat.completion", model, req.include_usage)
        self.head["system_fingerprint"] = None
        self.n, self.role, self.num_prompt = req.params.n, role, num_prompt
        self.logprobs, self.num_top = req.logprobs, req.params.logprobs or 0
        self.generated = 0
        self.parsers = [formats.parser(tools=req.parses_tools, parallel=req.parallel_tool_calls)
                        for _ in range(self.n)]
        self.texts = [""] * self.n  # the choices' text, where no parser reads it
        self.lps, self.reasons = [[] for _ in range(self.n)], [(None, None)] * self.n

    def _logprobs(self, c) -> list[dict]:
        return logprobs.openai_chat(logprobs.token_logprobs(c.logprobs, c.token_ids, self.num_top))

    def _parsed(self, c) -> tuple[str, ParsedText]:
        """(reasoning, content and call fragments) of one choice's delta."""
        parser = self.parsers[c.index]
        if parser is None:
            return "", ParsedText(c.text)
        return parser.feed(c.text, last=c.finish_reason is not None)

    def _finish_reason(self, index: int, reason: str | None) -> str | None:
        """A choice that stopped after calling tools finished with "tool_calls", as OpenAI's do."""
        parser = self.parsers[index]
        called = parser is not None and parser.tools is not None and parser.tools.calls
        return "tool_calls" if reason == "stop" and called else reason

    def opening(self):
        return [{**self.head, "choices": [{"index": i, "delta": {"role": self.role, "content": ""}, "logprobs": None,
                                           "finish_reason": None}], **self.usage_field} for i in range(self.n)]

    def chunks(self, prompt_index, out, c):
        self.generated += len(c.token_ids)
        reasoning, parsed = self._parsed(c)
        delta = {}
        if reasoning:
            delta["reasoning"] = reasoning
        if parsed.content or not (reasoning or parsed.calls):
            delta["content"] = parsed.content
        if parsed.calls:
            delta["tool_calls"] = [_call_fragment(f) for f in parsed.calls]
        if not (reasoning or parsed.content or parsed.calls) and c.finish_reason is None and not self.logprobs:
            return []
        lp = {"content": self._logprobs(c)} if self.logprobs else None
        return [{**self.head, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                           "finish_reason": self._finish_reason(c.index, c.finish_reason),
                                           "stop_reason": c.stop_reason}],
                 **self.usage_field}]

    def closing(self):
        return [{**self.head, "choices": [], "usage": proto.usage(self.num_prompt, self.generated)}] \
            if self.include_usage else []

    def add(self, prompt_index, out, c):
        if self.parsers[c.index] is None:
            self.texts[c.index] += c.text
        else:
            self.parsers[c.index].feed(c.text, last=c.finish_reason is not None)
        self.generated += len(c.token_ids)
        if self.logprobs:
            self.lps[c.index] += self._logprobs(c)
        if c.finish_reason is not None:
            self.reasons[c.index] = (c.finish_reason, c.stop_reason)

    def _message(self, index: int) -> tuple[dict, str | None]:
        parser = self.parsers[index]
        reasoning, content, calls = parser.result() if parser is not None else ("", self.texts[index], [])
        message = {"role": self.role, "content": content if content or not calls else None,
                   "tool_calls": [{"id": call.id, "type": "function",
                                   "function": {"name": call.name, "arguments": call.arguments}} for call in calls]}
        if reasoning:
            message["reasoning"] = reasoning
        reason = self.reasons[index][0]
        return message, "tool_calls" if calls and reason == "stop" else reason

    def body(self):
        choices = []
        for i in range(self.n):
            message, reason = self._message(i)
            choices.append({"index": i, "message": message,
                            "logprobs": {"content": self.lps[i]} if self.logprobs else None,
                            "finish_reason": reason, "stop_reason": self.reasons[i][1]})
        head = {k: v for k, v in self.head.items() if k != "system_fingerprint"}
        return {**head, "choices": choices, "system_fingerprint": None,
                "usage": proto.usage(self.num_prompt, self.generated)}


def _call_fragment(f) -> dict:
    """A stream's piece of one tool call: OpenAI sends id, type and name in the call's first."""
    if f.name is None:
        return {"index": f.index, "function": {"arguments": f.arguments}}
    return {"index": f.index, "id": f.id, "type": "function", "function": {"name": f.name, "arguments": f.arguments}}


# ---- /v1/completions -----------------------------------------------------------------------------

@bp.post("/v1/completions")
@holds_model
async def completions(request: Request):
    target, body = await _resolve(request, parse_json_body(request.body))
    req = proto.parse_completion(body)
    model, lora, engine = target.name, target.lora, target.engine
    require_capability(engine, GENERATE, _embedding_only(model, "Completions"))
    # Places are held (or refused) before the prompts wait for the tokenizer thread.
    with engine.admit(len(req.prompts) * req.params.n,
                      what="n" if len(req.prompts) == 1 else "n times the number of prompts") as admission:
        prompts = await engine.with_tokenizer(lambda tokenizer: _tokenize(tokenizer, req.prompts))
        streams = await _add_all(request, prompts, req.params, "cmpl", admission, req.stream,
                                 _constraint_field(req.constraint_field), lora, engine)
    choices = proto.CompletionChoices(engine.tokenizer, prompts, req.params.n, req.echo, req.params.logprobs)
    shape = _CompletionsShape(streams[0].request_id, model, req, choices, sum(len(ids) for ids, _ in prompts))
    return await respond(request, streams, shape, stream=req.stream)


# ---- /v1/chat/completions ------------------------------------------------------------------------

@bp.post("/v1/chat/completions")
@holds_model
async def chat_completions(request: Request):
    target, body = await _resolve(request, parse_json_body(request.body))
    formats, config = target.formats, request.app.ctx.config
    req = proto.parse_chat(body, formats)
    model, lora, engine = target.name, target.lora, target.engine
    require_capability(engine, GENERATE, _embedding_only(model, "Chat Completions"))
    messages = stored_defaults.chat_messages(target.stored, req.messages) if target.stored else req.messages
    # tool_choice none: the prompt leaves the tools out, so the model answers in words.
    tools = req.tools if req.parses_tools else None
    with engine.admit(req.params.n) as admission:  # before the template waits for the tokenizer thread
        text, ids = await engine.with_tokenizer(lambda tokenizer: render_prompt(
            tokenizer, target, messages, add_generation_prompt=req.add_generation_prompt, tools=tools,
            template_kwargs=req.template_kwargs))
        (stream,) = await _add_all(request, [(ids, text)], req.params, "chatcmpl", admission, req.stream,
                                   {"prompt": "messages", "max_tokens": req.max_tokens_field,
                                    **_constraint_field(req.constraint_field)}, lora, engine)
    shape = _ChatShape(stream.request_id, model, req, config.response_role, len(ids), formats)
    return await respond(request, [stream], shape, stream=req.stream)


# ---- models, tokenizer, health -------------------------------------------------------------------

def _model_entry(card, name: str, lora: LoRARequest | None) -> dict:
    """One /v1/models entry; an adapter's root is its folder and its parent the base model (vLLM's)."""
    root, parent = (card.source, None) if lora is None else (lora.lora_path, lora.base_model_name or card.names[0])
    return {"id": name, "object": "model", "created": card.created, "owned_by": "jaxserve", "root": root,
            "parent": parent, "max_model_len": card.max_model_len}


def _stored_entry(model) -> dict:
    """A stored model's /v1/models entry: its root is its weights, its parent what it was made FROM."""
    created = int(datetime.datetime.fromisoformat(model.created_at.replace("Z", "+00:00")).timestamp())
    return {"id": model.name, "object": "model", "created": created, "owned_by": "jaxserve", "root": model.source,
            "parent": model.base}


@bp.get("/v1/models")
async def models(request: Request):
    card = request.app.ctx.card
    data = [_model_entry(card, name, None) for name in card.names]
    data += [_model_entry(card, name, lora) for name, lora in request.app.ctx.engine.loras.items()
             if not name.startswith(STORED_ADAPTER_PREFIX)]
    data += [_stored_entry(m) for m in request.app.ctx.store.list() if not card.matches(m.name)]
    return json_response({"object": "list", "data": data})


@bp.get("/v1/models/<name:path>")
async def model(request: Request, name: str):
    return json_response(_model_entry(request.app.ctx.card, *_target(request, name)))


@bp.post("/tokenize")
async def tokenize(request: Request):
    body = parse_json_body(request.body)
    _model(request, get(body, "model", "str"))
    engine = request.app.ctx.engine
    with_strs = get(body, "return_token_strs", "bool")
    template = request.app.ctx.config.chat_template
    if "messages" in body:
        messages = normalize_messages(body["messages"])
        add_generation_prompt = get(body, "add_generation_prompt", "bool", True)
    else:
        messages, prompt = None, get(body, "prompt", "str", required=True)
        add_special_tokens = get(body, "add_special_tokens", "bool", True)

    def encode(tokenizer):  # on the tokenizer thread
        if messages is not None:
            ids = render_chat(tokenizer, messages, template, add_generation_prompt=add_generation_prompt)[1]
        else:
            ids = tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        return ids, tokenizer.convert_ids_to_tokens(ids) if with_strs else None

    ids, token_strs = await engine.with_tokenizer(encode)
    return json_response({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                          "token_strs": token_strs})


@bp.post("/detokenize")
async def detokenize(request: Request):
    body = parse_json_body(request.body)
    _model(request, get(body, "model", "str"))
    ids = get(body, "tokens", "int_list", required=True)
    try:
        check_token_ids(ids, request.app.ctx.engine.vocab_size, "tokens")
    except RequestValidationError as e:
        raise RequestError(str(e), param=e.param, code=e.code) from None
    text = await request.app.ctx.engine.with_tokenizer(lambda tokenizer: tokenizer.decode(ids))
    return json_response({"prompt": text})


@bp.route("/health", methods=["GET", "HEAD"])
async def health(request: Request):
    if not request.app.ctx.engine.is_running:
        raise RequestError("the engine is not running", status=503, kind="server_error")
    return HTTPResponse(status=200)


@bp.get("/version")
async def version(request: Request):
    return json_response({"version": jaxserve.__version__})
