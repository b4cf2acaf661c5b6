"""Ollama's model-store routes over the server's ModelStore (jaxserve/model_store.py):
/api/create (the current client's fields, or a ``modelfile`` text), /api/copy, /api/delete,
/api/pull (``hf.co/{user}/{repo}:{quant}`` through huggingface_hub) and /api/push (refused).

Create and pull answer as Ollama: NDJSON ``{"status": ...}`` lines ending in "success", or one
object with ``stream`` false; a request refused before any work gets an HTTP error. Relative paths
in ``from`` and ``adapters`` are read from the server's working directory.
"""
from __future__ import annotations

import asyncio
import dataclasses

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

from jaxserve import hub_pull
from jaxserve.model_store import InvalidModelName, ModelNotFoundError, parse_name
from jaxserve.modelfile import Modelfile, ModelfileError, parse_modelfile
from jaxserve.server.ollama_routes import model_name
from jaxserve.server.streaming import dumps
from jaxserve.server.validation import RequestError, get, parse_json_body

bp = Blueprint("store")
# Seconds a pull waits for the hub to answer before saying it cannot be reached.
HUB_TIMEOUT = 10.0
_FIELDS = ("from", "parameters", "template", "system", "adapters", "license", "messages")


def _statuses(body: dict, statuses: list[dict]) -> HTTPResponse:
    """The status lines as Ollama streams them, or the last one alone (stream false)."""
    if not get(body, "stream", "bool", True):
        return json_response(statuses[-1])
    return HTTPResponse("".join(dumps(s) + "\n" for s in statuses), content_type="application/x-ndjson")


def _adapters(value) -> tuple[str, ...]:
    """``adapters`` as folder paths: a list, or the client's {name: path} object. Ollama's uploaded
    blobs ({file: "sha256:..."}) have no counterpart here."""
    paths = list(value.values()) if isinstance(value, dict) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise RequestError("adapters must be a list of adapter folder paths", param="adapters")
    if any(p.startswith("sha256:") for p in paths):
        raise RequestError("adapters given as uploaded blobs (sha256 digests) are not supported: give the PEFT "
                           "adapter's folder path", param="adapters")
    return tuple(paths)


def _modelfile(body: dict) -> Modelfile:
    """The fields' Modelfile; with a ``modelfile`` text, the fields given override its instructions."""
    given = {k: body[k] for k in _FIELDS if body.get(k) not in (None, "", [], {})}
    if "adapters" in given:
        given["adapters"] = _adapters(given["adapters"])
    text = get(body, "modelfile", "str")
    try:
        fields = Modelfile.from_fields(base=given.pop("from", None), **given)
        if text is None:
            return fields
        parsed = parse_modelfile(text)
    except ModelfileError as e:
        raise RequestError(f"modelfile {e}", param="modelfile") from None
    except ValueError as e:
        raise RequestError(str(e)) from None
    overrides = {"base": fields.base} if "from" in body and fields.base else {}
    overrides.update({k: getattr(fields, k) for k in given})
    if "parameters" in overrides:
        overrides["parameters"] = {**parsed.parameters, **fields.parameters}
    return dataclasses.replace(parsed, **overrides)


def _served(request: Request) -> dict[str, str]:
    """The served model's names -> its weights: FROM may name it."""
    card = request.app.ctx.card
    return {name: card.source for name in card.names}


@bp.post("/api/create")
async def create(request: Request):
    body = parse_json_body(request.body)
    name = model_name(body)
    for field, why in (("quantize", "quantizing is not supported: serve with --quantization int8 instead"),
                       ("files", "uploaded files (sha256 blobs) are not supported: name the weights with "
                                 "'from' (a .gguf file, an HF folder, a stored model or 'smollm2')")):
        if body.get(field):
            raise RequestError(why, param=field)
    modelfile = _modelfile(body)
    try:
        model = await asyncio.to_thread(request.app.ctx.store.create, name, modelfile, served=_served(request))
    except InvalidModelName as e:
        raise RequestError(str(e), param="model") from None
    except ModelfileError as e:  # a base or adapter that is not there
        raise RequestError(e.problem, param="from" if e.problem.startswith("FROM") else None) from None
    statuses = [{"status": "parsing modelfile"}] if "modelfile" in body else []
    statuses += [{"status": f"using existing layer sha256:{model.digest}"}, {"status": "writing manifest"},
                 {"status": "success"}]
    return _statuses(body, statuses)


@bp.post("/api/copy")
async def copy(request: Request):
    body = parse_json_body(request.body)
    source = get(body, "source", "str", required=True)
    destination = get(body, "destination", "str", required=True)
    store, card = request.app.ctx.store, request.app.ctx.card
    try:
        if card.matches(source) and not store.exists(source):  # the served model: a manifest of its weights
            await asyncio.to_thread(store.create, destination, Modelfile(base=source), served=_served(request))
        else:
            await asyncio.to_thread(store.copy, source, destination)
    except InvalidModelName as e:
        raise RequestError(str(e)) from None
    except ModelNotFoundError:
        raise RequestError(f"model '{source}' not found", param="source", status=404) from None
    return HTTPResponse(status=200)


@bp.route("/api/delete", methods=["DELETE"], ignore_body=False)
async def delete(request: Request):
    body = parse_json_body(request.body)
    name = model_name(body)
    store, pool = request.app.ctx.store, request.app.ctx.pool
    try:
        source = store.get(name).source
        await asyncio.to_thread(store.delete, name)
    except InvalidModelName as e:
        raise RequestError(str(e), param="model") from None
    except ModelNotFoundError:
        raise RequestError(f"model '{name}' not found", param="model", status=404) from None
    # As Ollama's: its weights unload, unless another stored model runs on them (or they are busy).
    loaded = pool.models.get(pool.key_of(source))
    if loaded is not None and not any(pool.key_of(m.source) == loaded.key for m in store.list()):
        await pool.unload(loaded)
    return HTTPResponse(status=200)


@bp.post("/api/pull")
async def pull(request: Request):
    body = parse_json_body(request.body)
    name = model_name(body)
    try:
        stored_name = str(parse_name(name))
    except InvalidModelName as e:
        raise RequestError(str(e), param="model") from None
    repo = hub_pull.hf_repo(name)
    if repo is None:
        raise RequestError(f"cannot pull {name}: jaxserve pulls GGUF files from the Hugging Face hub only, named "
                           f"hf.co/{{user}}/{{repo}}:{{quantization}} (or create a model from a local file)",
                           param="model")
    try:  # a thread may outlive its timeout (DNS): the answer does not wait for it
        found = await asyncio.wait_for(asyncio.to_thread(hub_pull.find_gguf, *repo, HUB_TIMEOUT), HUB_TIMEOUT + 2)
    except asyncio.TimeoutError:
        raise RequestError(f"cannot reach the Hugging Face hub for {repo[0]} within {HUB_TIMEOUT:g} s",
                           status=502) from None
    except hub_pull.HubError as e:
        raise RequestError(str(e), status=502 if str(e).startswith("cannot reach") else 404) from None
    lines = _pulled(request, found, stored_name)
    if not get(body, "stream", "bool", True):
        async for line in lines:
            if "error" in line:
                raise RequestError(line["error"], status=502)
        return json_response(line)
    response = await request.respond(content_type="application/x-ndjson")
    async for line in lines:
        await response.send(dumps(line) + "\n")
    await response.eof()


async def _pulled(request: Request, found: hub_pull.HubFile, stored_name: str):
    """Ollama's pull lines: the manifest, the file's progress (about twice a second), then the
    store's manifest; an error ends them with {"error": ...}."""
    yield {"status": "pulling manifest"}
    digest = f"sha256:{found.sha256}" if found.sha256 else f"{found.repo}/{found.filename}"
    status = f"pulling {found.sha256[:12] if found.sha256 else found.filename}"
    download = asyncio.ensure_future(asyncio.to_thread(hub_pull.download, found))
    yield {"status": status, "digest": digest, "total": found.size, "completed": 0}
    while not download.done():
        await asyncio.wait([download], timeout=0.5)
        if not download.done():
            done_bytes = hub_pull.downloaded_bytes(found)
            yield {"status": status, "digest": digest, "total": found.size, "completed": min(done_bytes, found.size)}
    try:
        path = download.result()
        yield {"status": status, "digest": digest, "total": found.size, "completed": found.size}
        if found.sha256:
            yield {"status": "verifying sha256 digest"}
            await asyncio.to_thread(hub_pull.verify, path, found.sha256)
        yield {"status": "writing manifest"}
        await asyncio.to_thread(request.app.ctx.store.create, stored_name, Modelfile(base=path))
    except (hub_pull.HubError, ModelfileError) as e:
        yield {"error": str(e)}
        return
    yield {"status": "success"}


@bp.post("/api/push")
async def push(request: Request):
    body = parse_json_body(request.body)
    name = model_name(body)
    raise RequestError(f"cannot push {name}: jaxserve has no registry to push to (a stored model is a manifest "
                       f"in JAXSERVE_MODELS over its weights' files: copy them instead)", status=501)
