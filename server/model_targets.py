"""Which model answers a request: the served model, a LoRA adapter served beside it, a stored
model (jaxserve/model_store.py), answered with its defaults (jaxserve/stored_defaults.py) and
adapter by the engine of its weights, or weights named by path (or the bundled alias). Weights
other than the served model's come from the ModelPool (server/model_pool.py), loaded on demand;
a request holds its model from resolve() until its handler (wrapped in @holds_model) returns.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import os

from sanic import Request

from jaxserve import stored_defaults
from jaxserve.lora import LoRARequest
from jaxserve.model_store import InvalidModelName, ModelNotFoundError, StoredModel
from jaxserve.server.chat import render_chat
from jaxserve.server.model_pool import LoadedModel, ModelLoadError, parse_keep_alive
from jaxserve.server.validation import RequestError

# A stored model's adapter is registered with the engine as this prefix + the model's name
# (kept out of /v1/models' adapters: the stored model is listed itself).
STORED_ADAPTER_PREFIX = "store:"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str                           # as the client wrote it
    engine: object                      # the AsyncEngine that runs it
    card: object                        # its weights' ModelCard
    formats: object                     # its ChatOutputFormats
    chat_template: str | None = None    # --chat-template (the served model's only)
    stored: StoredModel | None = None   # a stored model: its defaults apply
    lora: LoRARequest | None = None     # the adapter it runs with


def _target(name: str, model: LoadedModel, **kwargs) -> Target:
    return Target(name, model.engine, model.card, model.formats, model.chat_template, **kwargs)


def stored_model(request: Request, name: str) -> StoredModel | None:
    """The stored model ``name`` names, None if there is none; a name that could never be stored
    (``../x``, ``a/b/c/d``) is refused."""
    try:
        return request.app.ctx.store.get(name)
    except ModelNotFoundError:
        return None
    except InvalidModelName as e:
        raise RequestError(str(e), param="model") from None


def not_found(name: str, api: str) -> RequestError:
    if api == "ollama":
        return RequestError(f'model "{name}" not found, try pulling it first', param="model", status=404)
    return RequestError(f"The model `{name}` does not exist.", param="model", status=404, code="model_not_found")


def keep_alive_of(body: dict) -> float | None:
    """The request's keep_alive in seconds (None: the server's default)."""
    if body.get("keep_alive") is None:
        return None
    try:
        return parse_keep_alive(body["keep_alive"])
    except ValueError as e:
        raise RequestError(str(e), param="keep_alive") from None


def _weights(name: str) -> str | None:
    """Weights a request names directly: the bundled alias or an absolute path to a model."""
    from jaxserve.models.loader import BUNDLED_ALIAS

    return name if name == BUNDLED_ALIAS or (os.path.isabs(name) and os.path.exists(name)) else None


def _lookup(request: Request, name: str) -> tuple[StoredModel | None, str | None]:
    """(the stored model, its weights) a name means; (None, weights) for a path or the bundled
    alias; (None, None) for nothing. An absolute path is never a stored model's name."""
    model = None if os.path.isabs(name) else stored_model(request, name)
    return model, model.source if model is not None else _weights(name)


def weights_of(request: Request, name: str) -> str | None:
    """The weights a stored model or a path names, None when neither."""
    return _lookup(request, name)[1]


async def resolve(request: Request, name: str, *, api: str = "ollama", adapters: bool = True,
                  keep_alive: float | None = None) -> Target:
    """The Target of a request naming ``name``; ``adapters``: a served LoRA adapter's name is one too.
    Weights not loaded are loaded first. Raises RequestError (404 when nothing has that name)."""
    ctx = request.app.ctx
    request.ctx.model = name  # for the request's span
    if ctx.card.matches(name):
        return _target(name, ctx.pool.served)
    if adapters and (lora := _served_lora(ctx.engine, name)) is not None:
        return _target(name, ctx.pool.served, lora=lora)
    model, source = _lookup(request, name)
    if source is None:
        raise not_found(name, api)
    if ctx.pool.key_of(source) == ctx.pool.served.key:
        loaded = ctx.pool.served
    else:
        loaded = await _acquire(request, source, keep_alive)
    lora = await _adapter(request, loaded.engine, model) if model is not None and model.adapters else None
    return _target(name, loaded, stored=model, lora=lora)


async def _acquire(request: Request, source: str, keep_alive: float | None) -> LoadedModel:
    pool = request.app.ctx.pool
    try:
        loaded = await pool.acquire(source)
    except ModelLoadError as e:
        raise RequestError(str(e), status=500, kind="server_error", code="model_load_failed") from None
    if getattr(request.ctx, "lease", None) is not None:  # one model a request
        pool.release(loaded, None)
        raise RuntimeError("a request resolved two models")
    request.ctx.lease = (loaded, keep_alive)
    return loaded


def render_prompt(tokenizer, target: Target, messages: list[dict], *, tools=None, template_kwargs: dict | None = None,
                  add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a conversation: a stored model's Go template (tokenized with the
    special tokens, BOS included, as llama.cpp does), else the chat template. On the tokenizer thread."""
    template = stored_defaults.template(target.stored) if target.stored is not None else None
    if template is None:
        return render_chat(tokenizer, messages, target.chat_template, add_generation_prompt=add_generation_prompt,
                           tools=tools, template_kwargs=template_kwargs)
    try:
        text = template.render(messages, tools=[t.as_template_dict() for t in tools or ()],
                               think=(template_kwargs or {}).get("enable_thinking"))
    except ValueError as e:
        raise RequestError(f"model {target.stored.name}: {e}", param="model") from None
    return text, tokenizer(text).input_ids


def holds_model(handler):
    """A route whose request may hold a model from the pool: released (its keep_alive starting)
    when the handler returns, a streamed response being sent by then."""
    @functools.wraps(handler)
    async def wrapped(request: Request, *args, **kwargs):
        try:
            return await handler(request, *args, **kwargs)
        finally:
            lease = getattr(request.ctx, "lease", None)
            if lease is not None:
                request.ctx.lease = None
                request.app.ctx.pool.release(*lease)
    return wrapped


def _served_lora(engine, model: str) -> LoRARequest | None:
    """A served adapter by name (Ollama clients may add ":latest")."""
    loras = engine.loras
    return loras.get(model) or (loras.get(model[:-len(":latest")]) if model.endswith(":latest") else None)


async def _adapter(request: Request, engine, model: StoredModel) -> LoRARequest:
    """The stored model's adapter, registered with the engine under the model's name on first use
    (again when the manifest now names another folder)."""
    if not engine.lora_enabled:
        raise RequestError(f"model {model.name} has an adapter: serve with --enable-lora to run it", param="model")
    key = STORED_ADAPTER_PREFIX + model.name
    locks = request.app.ctx.adapter_locks
    async with locks.setdefault(key, asyncio.Lock()):
        lora = engine.loras.get(key)
        if lora is not None and lora.lora_path == model.adapters[0]:
            return lora
        if lora is not None:
            await engine.unload_lora(key)
        try:
            return await engine.load_lora(key, model.adapters[0])
        except ValueError as e:  # LoRAAdapterError: files missing or not matching the model
            raise RequestError(f"model {model.name}: its adapter cannot be loaded: {e}", param="model") from None
