"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (JSON or SSE), and
vLLM's /tokenize, /detokenize, /health, /version.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

import jaxserve
from jaxserve.async_engine import EngineStepError, RequestRefusedError
from jaxserve.input_processor import RequestValidationError, check_token_ids
from jaxserve.server import openai_protocol as proto
from jaxserve.server.chat import normalize_messages, render_chat
from jaxserve.server.validation import RequestError, get, parse_json_body

bp = Blueprint("openai")


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _model(request: Request, name: str | None) -> str:
    card = request.app.ctx.card
    if name is None:
        return card.names[0]
    if name not in card.names:
        raise RequestError(f"The model `{name}` does not exist.", param="model", status=404,
                           code="model_not_found")
    return name


def _tokenize(tokenizer, prompts) -> list[tuple[list[int], str | None]]:
    """(token ids, text) per prompt; run on the tokenizer thread (AsyncEngine.with_tokenizer)."""
    return [(tokenizer(p).input_ids, p) if isinstance(p, str) else (list(p), None) for p in prompts]


async def _add_all(request: Request, prompts: list[tuple[list[int], str | None]], params, kind: str,
                   admission, stream: bool, field_names: dict[str, str] | None = None) -> list:
    """One engine request per prompt, each taking its places from ``admission``; if any is refused,
    the ones already queued are aborted, and the refusal names its field as this API does
    (``field_names``: the engine's name -> this API's)."""
    engine = request.app.ctx.engine
    base = f"{kind}-{uuid.uuid4().hex}"
    streams = []
    try:
        if len(prompts) > 1:  # all or none: no prompt starts when another would be refused
            for ids, _ in prompts:
                engine.check_request(ids, params)
        for i, (ids, text) in enumerate(prompts):
            streams.append(await engine.add_request(base if len(prompts) == 1 else f"{base}-{i}", ids, params,
                                                    prompt_text=text, log_id=request.ctx.request_id,
                                                    admission=admission, stream=stream))
    except RequestRefusedError as e:
        for s in streams:
            s.close()
        raise e.renamed(field_names or {}) from None
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


async def _merged(streams):
    """(stream index, delta) from several request streams as they arrive; closes them all at the end."""
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                inbox.put_nowait((i, out))
            inbox.put_nowait((i, None))
        except Exception as e:
            inbox.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def _sse(request: Request, chunks) -> None:
    """Send an async iterator of dicts as server-sent events, then one ``data: [DONE]``."""
    response = await request.respond(content_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
    try:
        async for chunk in chunks:
            await response.send(f"data: {_dumps(chunk)}\n\n")
    except RequestError as e:
        body = proto.error_body(e.message, kind=e.kind, param=e.param, code=e.code)
        await response.send(f"data: {_dumps(body)}\n\n")
    except EngineStepError as e:  # the engine failed mid-stream: tell the client inside the stream
        await response.send(f"data: {_dumps(proto.error_body(str(e), kind='server_error'))}\n\n")
    await response.send("data: [DONE]\n\n")
    await response.eof()


# ---- /v1/completions -----------------------------------------------------------------------------

@bp.post("/v1/completions")
async def completions(request: Request):
    req = proto.parse_completion(parse_json_body(request.body))
    model = _model(request, req.model)
    engine = request.app.ctx.engine
    # Places are held (or refused) before the prompts wait for the tokenizer thread.
    with engine.admit(len(req.prompts) * req.params.n,
                      what="n" if len(req.prompts) == 1 else "n times the number of prompts") as admission:
        prompts = await engine.with_tokenizer(lambda tokenizer: _tokenize(tokenizer, req.prompts))
        streams = await _add_all(request, prompts, req.params, "cmpl", admission, req.stream)
    rid, created = streams[0].request_id, int(time.time())
    choices = proto.CompletionChoices(engine.tokenizer, prompts, req.params.n, req.echo, req.params.logprobs)
    num_prompt = sum(len(ids) for ids, _ in prompts)

    def body(**fields) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": model, **fields}

    if req.stream:
        async def chunks():
            usage_field = {"usage": None} if req.include_usage else {}
            async for i, out in _merged(streams):
                for c in out.outputs:
                    fragment = choices.fragment(i, out, c)
                    if fragment is not None:
                        yield body(choices=[fragment], **usage_field)
            if req.include_usage:
                yield body(choices=[], usage=proto.usage(num_prompt, choices.num_generated))
        try:
            return await _sse(request, chunks())
        finally:
            for s in streams:
                s.close()

    async for i, out in _merged(streams):
        for c in out.outputs:
            fragment = choices.fragment(i, out, c)
            if fragment is not None:
                choices.add(fragment)
    return json_response(body(choices=choices.final(), system_fingerprint=None,
                              usage=proto.usage(num_prompt, choices.num_generated)))


# ---- /v1/chat/completions ------------------------------------------------------------------------

@bp.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = proto.parse_chat(parse_json_body(request.body))
    model = _model(request, req.model)
    engine, config = request.app.ctx.engine, request.app.ctx.config
    with engine.admit(req.params.n) as admission:  # before the template waits for the tokenizer thread
        text, ids = await engine.with_tokenizer(lambda tokenizer: render_chat(
            tokenizer, req.messages, config.chat_template, add_generation_prompt=req.add_generation_prompt))
        (stream,) = await _add_all(request, [(ids, text)], req.params, "chatcmpl", admission, req.stream,
                                   {"prompt": "messages", "max_tokens": req.max_tokens_field})
    rid, created, n, role = stream.request_id, int(time.time()), req.params.n, config.response_role
    num_top = req.params.logprobs or 0

    def chunk(choices, **extra):
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices, **extra}

    if req.stream:
        async def chunks():
            usage_field = {"usage": None} if req.include_usage else {}
            for i in range(n):  # the role comes first, before any token, as OpenAI does
                yield chunk([{"index": i, "delta": {"role": role, "content": ""}, "logprobs": None,
                              "finish_reason": None}], **usage_field)
            generated = 0
            async for _, out in _merged([stream]):
                for c in out.outputs:
                    generated += len(c.token_ids)
                    if not c.text and c.finish_reason is None and not req.logprobs:
                        continue
                    lp = ({"content": proto.chat_logprobs(c.logprobs or [], c.token_ids, num_top)}
                          if req.logprobs else None)
                    yield chunk([{"index": c.index, "delta": {"content": c.text}, "logprobs": lp,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}], **usage_field)
            if req.include_usage:
                yield chunk([], usage=proto.usage(len(ids), generated))
        try:
            return await _sse(request, chunks())
        finally:
            stream.close()

    texts, lps, reasons = [""] * n, [[] for _ in range(n)], [(None, None)] * n
    generated = 0
    async for _, out in _merged([stream]):
        for c in out.outputs:
            texts[c.index] += c.text
            generated += len(c.token_ids)
            if req.logprobs:
                lps[c.index] += proto.chat_logprobs(c.logprobs or [], c.token_ids, num_top)
            if c.finish_reason is not None:
                reasons[c.index] = (c.finish_reason, c.stop_reason)
    choices = [{"index": i, "message": {"role": role, "content": texts[i], "tool_calls": []},
                "logprobs": {"content": lps[i]} if req.logprobs else None,
                "finish_reason": reasons[i][0], "stop_reason": reasons[i][1]} for i in range(n)]
    return json_response({"id": rid, "object": "chat.completion", "created": created, "model": model,
                          "choices": choices, "system_fingerprint": None,
                          "usage": proto.usage(len(ids), generated)})


# ---- models, tokenizer, health -------------------------------------------------------------------

@bp.get("/v1/models")
async def models(request: Request):
    card = request.app.ctx.card
    data = [{"id": name, "object": "model", "created": card.created, "owned_by": "jaxserve", "root": card.source,
             "parent": None, "max_model_len": card.max_model_len} for name in card.names]
    return json_response({"object": "list", "data": data})


@bp.get("/v1/models/<name:path>")
async def model(request: Request, name: str):
    card = request.app.ctx.card
    name = _model(request, name)
    return json_response({"id": name, "object": "model", "created": card.created, "owned_by": "jaxserve",
                          "root": card.source, "parent": None, "max_model_len": card.max_model_len})


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
