"""Embedding routes on the same port: OpenAI's /v1/embeddings, Ollama's /api/embed and the legacy
/api/embeddings. Served by a pooling model (`--runner pooling`, or an embedding-only architecture);
on a generating model each answers 400 in its API's format.
"""
from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import json as json_response

from jaxserve.async_engine import EMBED, RequestRefusedError
from jaxserve.server import embedding_protocol as proto
from jaxserve.server.model_targets import holds_model
from jaxserve.server.ollama_routes import target_of
from jaxserve.server.openai_routes import _model as openai_model
from jaxserve.server.validation import parse_json_body, require_capability

bp = Blueprint("embeddings")


async def _embed(request: Request, engine, req: proto.EmbeddingRequest, field: str):
    """The request's embeddings; a refused input is named as the client's API names it (the
    engine says "prompt" or "prompt[i]"; `field` here)."""
    try:
        return await engine.embed(req.inputs, req.params, log_id=request.ctx.request_id)
    except RequestRefusedError as e:
        if e.param is None or not e.param.startswith("prompt"):
            raise
        param = field + e.param[len("prompt"):]
        message = str(e)
        if message.startswith(e.param):
            message = param + message[len(e.param):]
        raise RequestRefusedError(message, param, e.code) from None


@bp.post("/v1/embeddings")
async def embeddings(request: Request):
    req = proto.parse_openai(parse_json_body(request.body))
    model = openai_model(request, req.model)
    require_capability(request.app.ctx.engine, EMBED, f"The model `{model}` does not support the Embeddings API: "
                                                      f"it generates text (serve it with --runner pooling to embed)")
    outputs = await _embed(request, request.app.ctx.engine, req, "input")
    return json_response(proto.openai_response(model, outputs, req.encoding_format))


@bp.post("/api/embed")
@holds_model
async def embed(request: Request):
    body = parse_json_body(request.body)
    target = await target_of(request, body, adapters=False)
    model = target.name
    require_capability(target.engine, EMBED, f'"{model}" does not support embeddings')
    req = proto.parse_ollama_embed(body)
    outputs = await _embed(request, target.engine, req, "input")
    return json_response(proto.ollama_embed_response(model, outputs, start=request.ctx.start))


@bp.post("/api/embeddings")
@holds_model
async def embeddings_legacy(request: Request):
    body = parse_json_body(request.body)
    target = await target_of(request, body, adapters=False)
    model = target.name
    require_capability(target.engine, EMBED, f'"{model}" does not support embeddings')
    req = proto.parse_ollama_embeddings(body)
    (output,) = await _embed(request, target.engine, req, "prompt")
    return json_response({"embedding": output.outputs.embedding})
