"""The embedding wire formats: OpenAI's /v1/embeddings, Ollama's /api/embed and its legacy
/api/embeddings. Request bodies -> (inputs, PoolingParams); embeddings -> response bodies.

Pure functions over dicts (no Sanic, no JAX), tested without a server. Truncation follows each
API's own: Ollama's `truncate` (true by default) keeps an input's first tokens; vLLM's
`truncate_prompt_tokens` keeps its last N (-1: the model's limit); OpenAI has no truncation, so
by default an input past the model's limit is refused there.
"""
from __future__ import annotations

import base64
import dataclasses
import time
import uuid

import numpy as np

from jaxserve.pooling_params import PoolingParams
from jaxserve.server.validation import RequestError, get

ENCODING_FORMATS = ("float", "base64")


@dataclasses.dataclass
class EmbeddingRequest:
    model: str | None
    inputs: list                    # each a string or a list of token ids
    params: PoolingParams
    encoding_format: str = "float"  # OpenAI only: "float" or "base64"


def _is_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _refuse_empty(inputs: list, field: str) -> None:
    for i, item in enumerate(inputs):
        if len(item) == 0:
            label = field if len(inputs) == 1 else f"{field}[{i}]"
            raise RequestError(f"'{label}' must not be empty", param=label, code="invalid_value")


def _params(field: str, **kwargs) -> PoolingParams:
    try:
        return PoolingParams(**kwargs)
    except ValueError as e:
        raise RequestError(f"'{field}' {str(e).split(' ', 1)[1]}", param=field, code="invalid_value") from None


# ---- OpenAI -----------------------------------------------------------------------------------

def parse_openai(body: dict) -> EmbeddingRequest:
    """`input`: a string, an array of strings, an array of token ids or an array of token-id
    arrays; `encoding_format` float (default) or base64; `dimensions`; vLLM's
    `truncate_prompt_tokens`; `user` is accepted and unused."""
    model = get(body, "model", "str", required=True)
    raw = body.get("input")
    if raw is None:
        raise RequestError("'input' is required", param="input", code="missing_required_parameter")
    if isinstance(raw, str) or (_is_ids(raw) and raw):
        inputs = [raw]
    elif isinstance(raw, list) and raw and (all(isinstance(s, str) for s in raw) or all(_is_ids(p) for p in raw)):
        inputs = list(raw)
    else:
        empty = isinstance(raw, list) and not raw
        raise RequestError("'input' must not be empty" if empty else
                           "'input' must be a string, an array of strings, an array of token ids or an array of "
                           "token id arrays", param="input", code="invalid_value" if empty else "invalid_type")
    _refuse_empty(inputs, "input")
    encoding_format = get(body, "encoding_format", "str", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise RequestError(f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}, got "
                           f"{encoding_format!r:.40}", param="encoding_format", code="invalid_value")
    get(body, "user", "str")
    dimensions = get(body, "dimensions", "int")
    truncate = get(body, "truncate_prompt_tokens", "int")
    params = PoolingParams()
    if dimensions is not None:
        params = _params("dimensions", dimensions=dimensions)
    if truncate is not None:
        params = _params("truncate_prompt_tokens", dimensions=dimensions, truncate_prompt_tokens=truncate)
    return EmbeddingRequest(model, inputs, params, encoding_format)


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """float: the list as is; base64: its little-endian float32 bytes, as OpenAI sends them."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def openai_response(model: str, outputs, encoding_format: str) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": encode_vector(o.outputs.embedding, encoding_format)}
            for i, o in enumerate(outputs)]
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# ---- Ollama -----------------------------------------------------------------------------------

def _keep_alive(body: dict) -> None:
    """Accepted (a duration string or seconds) and unused: the model stays loaded while served."""
    if not isinstance(body.get("keep_alive"), (str, int, float, type(None))):
        raise RequestError("keep_alive must be a duration string or a number of seconds", param="keep_alive")


def parse_ollama_embed(body: dict) -> EmbeddingRequest:
    """/api/embed: `input` a string or an array of strings; `truncate` (default true: an input
    past the model's limit keeps its first tokens); `dimensions`; `keep_alive` and `options`
    accepted."""
    raw = body.get("input")
    if raw is None:
        raise RequestError("input is required", param="input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(s, str) for s in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and not raw:
        raise RequestError("input must not be empty", param="input")
    else:
        raise RequestError("input must be a string or an array of strings", param="input")
    _refuse_empty(inputs, "input")
    _keep_alive(body)
    get(body, "options", "object")
    truncate = get(body, "truncate", "bool", True)
    dimensions = get(body, "dimensions", "int")
    if dimensions is not None and dimensions < 1:
        raise RequestError(f"dimensions must be >= 1, got {dimensions}", param="dimensions")
    params = PoolingParams(dimensions=dimensions, truncate_prompt_tokens=-1 if truncate else None,
                           truncation_side="right")
    return EmbeddingRequest(get(body, "model", "str"), inputs, params)


def parse_ollama_embeddings(body: dict) -> EmbeddingRequest:
    """The legacy /api/embeddings: one `prompt`, truncated to the model's limit as /api/embed."""
    prompt = get(body, "prompt", "str", required=True)
    if not prompt:
        raise RequestError("prompt must not be empty", param="prompt")
    _keep_alive(body)
    get(body, "options", "object")
    return EmbeddingRequest(get(body, "model", "str"), [prompt],
                            PoolingParams(truncate_prompt_tokens=-1, truncation_side="right"))


def ollama_embed_response(model: str, outputs, *, start: float) -> dict:
    """Durations in ns; `start`: the request's time.monotonic() arrival. The model is loaded
    while it is served, so load_duration is 0."""
    return {"model": model, "embeddings": [o.outputs.embedding for o in outputs],
            "total_duration": max(0, int((time.monotonic() - start) * 1e9)), "load_duration": 0,
            "prompt_eval_count": sum(len(o.prompt_token_ids) for o in outputs)}
