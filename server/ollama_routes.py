"""Ollama-compatible routes on the same port: /api/generate and /api/chat (NDJSON stream by default),
/api/tags, /api/show, /api/ps, /api/version (the embedding routes are server/embedding_routes.py; the
store's, /api/create, /api/copy, /api/delete, /api/pull and /api/push, server/store_routes.py).
A stored model answers with its defaults (jaxserve/stored_defaults.py): parameters under the
request's options, system prompt and messages around the conversation, template, adapter.
"""
from __future__ import annotations

import time
import uuid

from sanic import Blueprint, Request
from sanic.response import json as json_response

import jaxserve
from jaxserve import stored_defaults
from jaxserve.async_engine import GENERATE, RequestRefusedError
from jaxserve.input_processor import RequestValidationError, check_token_ids
from jaxserve.server import logprobs
from jaxserve.server import ollama_protocol as proto
from jaxserve.server.chat import ChoiceParser, normalize_messages
from jaxserve.server.model_targets import (Target, holds_model, keep_alive_of, not_found, render_prompt,
                                           resolve, stored_model, weights_of)
from jaxserve.server.streaming import NDJSON, Shape, respond
from jaxserve.server.tool_calls import parse_tools
from jaxserve.server.validation import RequestError, get, parse_json_body, require_capability

bp = Blueprint("ollama")


def model_name(body: dict) -> str:
    name = get(body, "model", "str") or get(body, "name", "str")  # "name" is the older spelling
    if not name:
        raise RequestError("model is required", param="model")
    return name


async def target_of(request: Request, body: dict, *, adapters: bool = True) -> Target:
    """The model a request names: the served one, a served adapter, a stored model or weights by
    path, loaded if they are not (the route must be wrapped in @holds_model)."""
    return await resolve(request, model_name(body), adapters=adapters, keep_alive=keep_alive_of(body))


async def _unload(request: Request, name: str, key: str, empty) -> dict:
    """Ollama's empty request with keep_alive 0: the model unloads (the served model stays)."""
    pool = request.app.ctx.pool
    source = pool.served.card.source if request.app.ctx.card.matches(name) else weights_of(request, name)
    if source is None:
        raise not_found(name, "ollama")
    loaded = pool.models.get(pool.key_of(source))
    if loaded is not None:
        await pool.unload(loaded)
    return {"model": name, "created_at": proto.now_rfc3339(), key: empty, "done": True, "done_reason": "unload"}


def _with_options(body: dict, target: Target) -> dict:
    """The body with a stored model's parameters under its own options."""
    if target.stored is None:
        return body
    return {**body, "options": stored_defaults.options(target.stored, get(body, "options", "object", {}))}


def _loaded(model: str, key: str, empty) -> dict:
    """Ollama's answer to an empty prompt: the model is loaded, nothing generated."""
    return {"model": model, "created_at": proto.now_rfc3339(), key: empty, "done": True, "done_reason": "load"}


class _OllamaShape(Shape):
    """/api/generate and /api/chat: one completion; each piece as `piece(text, thinking, calls)`,
    then a closing object with done, done_reason, the route's `final_extra(output_ids)` fields and
    the timings. With a `parser`, the thinking is split off and tool calls are sent whole, each in
    the piece in which it closes (arguments as an object, as Ollama sends them)."""

    def __init__(self, model: str, num_prompt: int, start: float, num_top: int | None, piece, final_extra,
                 parser: ChoiceParser | None = None, show_thinking: bool = True):
        self.model, self.num_prompt, self.start, self.num_top = model, num_prompt, start, num_top
        self.piece, self.final_extra = piece, final_extra
        self.parser, self.show_thinking = parser, show_thinking
        self.out_ids: list[int] = []
        self.pieces: list[str] = []
        self.logprobs: list[dict] = []
        self.reason, self.metrics = None, {}

    def _logprobs(self, c) -> list[dict]:
        return logprobs.ollama(logprobs.token_logprobs(c.logprobs, c.token_ids, self.num_top))

    def _closing(self) -> dict:
        obj = {"model": self.model, "created_at": proto.now_rfc3339(), **self.piece(""), "done": True,
               "done_reason": proto.done_reason(self.reason)}
        obj.update(self.final_extra(self.out_ids))
        m = self.metrics
        obj.update(proto.final_stats(start=self.start, arrival=m.get("arrival_time", self.start),
                                     first_token=m.get("first_token_time"),
                                     finish=m.get("finish_time", time.monotonic()),
                                     num_prompt=self.num_prompt, num_generated=len(self.out_ids)))
        return obj

    def chunks(self, prompt_index, out, c):
        self.out_ids += c.token_ids
        thinking, text, calls = "", c.text, []
        if self.parser is not None:
            thinking, parsed = self.parser.feed(c.text, last=c.finish_reason is not None)
            text, calls = parsed.content, _ollama_calls(parsed.completed)
            thinking = thinking if self.show_thinking else ""
        objs = []
        if text or thinking or calls or (self.num_top is not None and c.token_ids):
            chunk = {"model": self.model, "created_at": proto.now_rfc3339(), **self.piece(text, thinking, calls),
                     "done": False}
            if self.num_top is not None:
                chunk["logprobs"] = self._logprobs(c)
            objs.append(chunk)
        if c.finish_reason is not None:  # the closing object carries no text, only stats
            self.reason, self.metrics = c.finish_reason, out.metrics
            objs.append(self._closing())
        return objs

    def add(self, prompt_index, out, c):
        self.out_ids += c.token_ids
        self.pieces.append(c.text)
        if self.parser is not None:
            self.parser.feed(c.text, last=c.finish_reason is not None)
        if self.num_top is not None:
            self.logprobs += self._logprobs(c)
        self.reason, self.metrics = c.finish_reason or self.reason, out.metrics

    def body(self):
        obj = self._closing()
        if self.parser is None:
            obj.update(self.piece("".join(self.pieces)))
        else:
            thinking, content, calls = self.parser.result()
            obj.update(self.piece(content, thinking if self.show_thinking else "", _ollama_calls(calls)))
        if self.num_top is not None:
            obj["logprobs"] = self.logprobs
        return obj

    def error(self, error):
        return proto.error_body(error.message if isinstance(error, RequestError) else str(error))


def _ollama_calls(calls) -> list[dict]:
    """Ollama's tool_calls: arguments as an object (a call whose arguments are not JSON is left out)."""
    out = []
    for call in calls:
        arguments = call.arguments_object()
        if isinstance(arguments, dict):
            out.append({"function": {"name": call.name, "arguments": arguments}})
    return out


def _generate_piece(text: str, thinking: str = "", calls=()) -> dict:
    return {"response": text, **({"thinking": thinking} if thinking else {})}


def _chat_piece(role: str):
    def piece(text: str, thinking: str = "", calls=()) -> dict:
        message = {"role": role, "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = list(calls)
        return {"message": message}
    return piece


async def _run(request: Request, body: dict, target: Target, ids: list[int], text: str, piece, final_extra,
               admission, parser: ChoiceParser | None = None, show_thinking: bool = True,
               keep_special_tokens: bool = False):
    """Submit one request (its place held by ``admission``) and answer as NDJSON (default) or one
    JSON object (stream false). ``piece(text, thinking, calls) -> dict`` is the per-chunk payload;
    ``final_extra(output_ids)`` adds the closing object's route-specific fields."""
    engine, model = target.engine, target.name
    num_top = proto.logprobs_request(body)
    params = proto.parse_options(body, num_prompt_tokens=len(ids), max_model_len=engine.max_model_len,
                                 logprobs=num_top, keep_special_tokens=keep_special_tokens)
    streaming = get(body, "stream", "bool", True)
    try:
        stream = await engine.add_request(f"ollama-{uuid.uuid4().hex}", ids, params, prompt_text=text,
                                          log_id=request.ctx.request_id, admission=admission, stream=streaming,
                                          lora_request=target.lora)
    except RequestRefusedError as e:  # a constraint the engine refused came from `format`
        raise e.renamed({"structured_outputs.json": "format", "structured_outputs.json_object": "format"}) from None
    shape = _OllamaShape(model, len(ids), request.ctx.start, num_top, piece, final_extra, parser, show_thinking)
    return await respond(request, [stream], shape, stream=streaming, framing=NDJSON)


def _thinking(body: dict, model: str, formats) -> tuple[dict, bool]:
    """(template kwargs, whether thinking is shown) for Ollama's `think`: thinking models think
    unless it is false; what they think is shown unless it is false."""
    think = proto.think(body, model, formats)
    return ({} if think is None else {"enable_thinking": think}), think is not False


@bp.post("/api/generate")
@holds_model
async def generate(request: Request):
    body = parse_json_body(request.body)
    prompt = get(body, "prompt", "str", "")
    context = get(body, "context", "int_list", [])
    if not prompt and not context and keep_alive_of(body) == 0:
        return json_response(await _unload(request, model_name(body), "response", ""))
    target = await target_of(request, body)
    model, engine, config = target.name, target.engine, request.app.ctx.config
    require_capability(engine, GENERATE, f'"{model}" does not support generate')
    proto.refuse_unsupported(body)
    system = get(body, "system", "str")
    if not prompt and not context:
        return json_response(_loaded(model, "response", ""))
    raw = get(body, "raw", "bool", False)
    try:
        check_token_ids(context, engine.vocab_size, "context")
    except RequestValidationError as e:
        raise RequestError(str(e), param=e.param) from None

    def encode(tokenizer) -> tuple[str, list[int]]:
        if raw:
            return prompt, tokenizer(prompt).input_ids if prompt else []
        if target.stored is not None:
            messages = stored_defaults.generate_messages(target.stored, prompt, system, with_context=bool(context))
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return render_prompt(tokenizer, target, messages, template_kwargs=template_kwargs)

    formats = target.formats
    template_kwargs, show_thinking = _thinking(body, model, formats)
    parser = formats.parser(tools=False) if not raw else None
    with engine.admit(1) as admission:  # before the prompt waits for the tokenizer thread
        text, ids = await engine.with_tokenizer(encode)
        ids = list(context) + ids
        return await _run(request, _with_options(body, target), target, ids, text, _generate_piece,
                          lambda out_ids: {"context": ids + out_ids}, admission, parser, show_thinking)


@bp.post("/api/chat")
@holds_model
async def chat(request: Request):
    body = parse_json_body(request.body)
    messages = normalize_messages(get(body, "messages", "array", []))
    config = request.app.ctx.config
    if not messages and keep_alive_of(body) == 0:
        return json_response(await _unload(request, model_name(body), "message",
                                           {"role": config.response_role, "content": ""}))
    target = await target_of(request, body)
    model, engine = target.name, target.engine
    require_capability(engine, GENERATE, f'"{model}" does not support chat')
    proto.refuse_unsupported(body)
    if not messages:
        return json_response(_loaded(model, "message", {"role": config.response_role, "content": ""}))
    if target.stored is not None:
        messages = stored_defaults.chat_messages(target.stored, messages)
    formats = target.formats
    tools = parse_tools(body.get("tools"))
    template_kwargs, show_thinking = _thinking(body, model, formats)
    parser = formats.parser(tools=bool(tools))
    with engine.admit(1) as admission:  # before the template waits for the tokenizer thread
        text, ids = await engine.with_tokenizer(lambda tokenizer: render_prompt(
            tokenizer, target, messages, tools=tools, template_kwargs=template_kwargs))
        return await _run(request, _with_options(body, target), target, ids, text, _chat_piece(config.response_role),
                          lambda out_ids: {},
                          admission, parser, show_thinking,
                          keep_special_tokens=bool(tools) and formats.needs_special_tokens)


@bp.get("/api/tags")
async def tags(request: Request):
    card = request.app.ctx.card
    listed = proto.tags(card)
    listed["models"] += [proto.stored_tag(m, _card_of(request, m)) for m in request.app.ctx.store.list()
                         if not card.matches(m.name)]
    return json_response(listed)


def _card_of(request: Request, model) -> object | None:
    """The ModelCard of a stored model's weights when they are loaded, else None."""
    pool = request.app.ctx.pool
    loaded = pool.models.get(pool.key_of(model.source))
    return loaded.card if loaded is not None else None


@bp.post("/api/show")
async def show(request: Request):
    body = parse_json_body(request.body)
    name = model_name(body)
    request.ctx.model = name
    card = request.app.ctx.card
    if card.matches(name):
        return json_response(proto.show(card, name))
    model = stored_model(request, name)
    if model is None:
        raise RequestError(f"model '{name}' not found", param="model", status=404)
    return json_response(proto.show_stored(model, _card_of(request, model)))


@bp.get("/api/ps")
async def ps(request: Request):
    pool, store = request.app.ctx.pool, request.app.ctx.store
    names: dict[str, list[str]] = {m.key: [] for m in pool.loaded()}
    for stored in store.list():  # the stored models over each loaded model's weights
        names.get(pool.key_of(stored.source), []).append(stored.name)
    names[pool.served.key] = list(pool.served.card.names)
    return json_response(proto.ps([(names[m.key] or list(m.card.names), m) for m in pool.loaded()]))


@bp.get("/api/version")
async def version(request: Request):
    return json_response({"version": jaxserve.__version__})
