"""Ollama-compatible routes on the same port: /api/generate and /api/chat (NDJSON stream by default),
/api/tags, /api/show, /api/ps, /api/version.
"""
from __future__ import annotations

import time
import uuid

from sanic import Blueprint, Request
from sanic.response import json as json_response

import jaxserve
from jaxserve.async_engine import RequestRefusedError
from jaxserve.input_processor import RequestValidationError, check_token_ids
from jaxserve.server import logprobs
from jaxserve.server import ollama_protocol as proto
from jaxserve.server.chat import normalize_messages, render_chat
from jaxserve.server.streaming import NDJSON, Shape, respond
from jaxserve.server.validation import RequestError, get, parse_json_body

bp = Blueprint("ollama")


def _model(request: Request, body: dict) -> str:
    name = get(body, "model", "str") or get(body, "name", "str")  # "name" is the older spelling
    if not name:
        raise RequestError("model is required", param="model")
    if not request.app.ctx.card.matches(name):
        raise RequestError(f'model "{name}" not found, try pulling it first', param="model", status=404)
    return name


def _loaded(model: str, key: str, empty) -> dict:
    """Ollama's answer to an empty prompt: the model is loaded, nothing generated."""
    return {"model": model, "created_at": proto.now_rfc3339(), key: empty, "done": True, "done_reason": "load"}


class _OllamaShape(Shape):
    """/api/generate and /api/chat: one completion; text pieces as `piece(text)`, then a closing
    object with done, done_reason, the route's `final_extra(output_ids)` fields and the timings."""

    def __init__(self, model: str, num_prompt: int, start: float, num_top: int | None, piece, final_extra):
        self.model, self.num_prompt, self.start, self.num_top = model, num_prompt, start, num_top
        self.piece, self.final_extra = piece, final_extra
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
        objs = []
        if c.text or (self.num_top is not None and c.token_ids):
            chunk = {"model": self.model, "created_at": proto.now_rfc3339(), **self.piece(c.text), "done": False}
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
        if self.num_top is not None:
            self.logprobs += self._logprobs(c)
        self.reason, self.metrics = c.finish_reason or self.reason, out.metrics

    def body(self):
        obj = self._closing()
        obj.update(self.piece("".join(self.pieces)))
        if self.num_top is not None:
            obj["logprobs"] = self.logprobs
        return obj

    def error(self, error):
        return proto.error_body(error.message if isinstance(error, RequestError) else str(error))


async def _run(request: Request, body: dict, model: str, ids: list[int], text: str, piece, final_extra,
               admission):
    """Submit one request (its place held by ``admission``) and answer as NDJSON (default) or one
    JSON object (stream false). ``piece(text) -> dict`` is the per-chunk payload;
    ``final_extra(output_ids)`` adds the closing object's route-specific fields."""
    engine = request.app.ctx.engine
    num_top = proto.logprobs_request(body)
    params = proto.parse_options(body, num_prompt_tokens=len(ids), max_model_len=engine.max_model_len,
                                 logprobs=num_top)
    streaming = get(body, "stream", "bool", True)
    try:
        stream = await engine.add_request(f"ollama-{uuid.uuid4().hex}", ids, params, prompt_text=text,
                                          log_id=request.ctx.request_id, admission=admission, stream=streaming)
    except RequestRefusedError as e:  # a constraint the engine refused came from `format`
        raise e.renamed({"structured_outputs.json": "format", "structured_outputs.json_object": "format"}) from None
    shape = _OllamaShape(model, len(ids), request.ctx.start, num_top, piece, final_extra)
    return await respond(request, [stream], shape, stream=streaming, framing=NDJSON)


@bp.post("/api/generate")
async def generate(request: Request):
    body = parse_json_body(request.body)
    model = _model(request, body)
    proto.refuse_unsupported(body)
    engine, config = request.app.ctx.engine, request.app.ctx.config
    prompt = get(body, "prompt", "str", "")
    system = get(body, "system", "str")
    context = get(body, "context", "int_list", [])
    if not isinstance(body.get("keep_alive"), (str, int, float, type(None))):
        raise RequestError("keep_alive must be a duration string or a number of seconds", param="keep_alive")
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
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return render_chat(tokenizer, messages, config.chat_template)

    with engine.admit(1) as admission:  # before the prompt waits for the tokenizer thread
        text, ids = await engine.with_tokenizer(encode)
        ids = list(context) + ids
        return await _run(request, body, model, ids, text, lambda t: {"response": t},
                          lambda out_ids: {"context": ids + out_ids}, admission)


@bp.post("/api/chat")
async def chat(request: Request):
    body = parse_json_body(request.body)
    model = _model(request, body)
    proto.refuse_unsupported(body)
    engine, config = request.app.ctx.engine, request.app.ctx.config
    messages = normalize_messages(get(body, "messages", "array", []))
    if not messages:
        return json_response(_loaded(model, "message", {"role": config.response_role, "content": ""}))
    role = config.response_role
    with engine.admit(1) as admission:  # before the template waits for the tokenizer thread
        text, ids = await engine.with_tokenizer(lambda tokenizer: render_chat(tokenizer, messages,
                                                                             config.chat_template))
        return await _run(request, body, model, ids, text, lambda t: {"message": {"role": role, "content": t}},
                          lambda out_ids: {}, admission)


@bp.get("/api/tags")
async def tags(request: Request):
    return json_response(proto.tags(request.app.ctx.card))


@bp.post("/api/show")
async def show(request: Request):
    body = parse_json_body(request.body)
    return json_response(proto.show(request.app.ctx.card, _model(request, body)))


@bp.get("/api/ps")
async def ps(request: Request):
    return json_response(proto.ps(request.app.ctx.card))


@bp.get("/api/version")
async def version(request: Request):
    return json_response({"version": jaxserve.__version__})
