"""vLLM's runtime LoRA routes: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST
/v1/unload_lora_adapter {"lora_name"}, answering in plain text on success as vLLM does.

They exist only on a server started with JAXSERVE_ALLOW_RUNTIME_LORA_UPDATING (or
--allow-runtime-lora-updating), as vLLM's with VLLM_ALLOW_RUNTIME_LORA_UPDATING: whoever reaches
them can make the server read files from its disk. Otherwise they are 404, like any unknown route.
"""
from __future__ import annotations

from sanic import Blueprint, Request
from sanic.response import text

from jaxserve.server.validation import RequestError, get, parse_json_body

bp = Blueprint("lora")


def _check_allowed(request: Request) -> None:
    if not request.app.ctx.config.allow_runtime_lora_updating:
        raise RequestError(f"route POST {request.path} not found: start the server with "
                           "JAXSERVE_ALLOW_RUNTIME_LORA_UPDATING=true to load and unload LoRA adapters",
                           status=404)
    if not request.app.ctx.engine.lora_enabled:
        raise RequestError("LoRA is not enabled: start the server with --enable-lora")


@bp.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    _check_allowed(request)
    body = parse_json_body(request.body)
    name, path = get(body, "lora_name", "str"), get(body, "lora_path", "str")
    if not name or not path:
        raise RequestError("Both 'lora_name' and 'lora_path' must be provided.",
                           param="lora_path" if name else "lora_name")
    engine = request.app.ctx.engine
    if name in engine.loras:
        raise RequestError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    if request.app.ctx.card.matches(name):
        raise RequestError(f"'{name}' is the name of the base model", param="lora_name")
    try:
        await engine.load_lora(name, path)
    except ValueError as e:  # the engine's LoRAAdapterError: the message names the problem
        not_found = getattr(e, "not_found", False)
        raise RequestError(str(e), param="lora_path", status=404 if not_found else 400,
                           code="not_found" if not_found else "invalid_value") from None
    return text(f"Success: LoRA adapter '{name}' added successfully.")


@bp.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    _check_allowed(request)
    body = parse_json_body(request.body)
    name = get(body, "lora_name", "str")
    if not name:
        raise RequestError("'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
    if not await request.app.ctx.engine.unload_lora(name):
        raise RequestError(f"The lora adapter '{name}' cannot be found.", param="lora_name", status=404,
                           code="not_found")
    return text(f"Success: LoRA adapter '{name}' removed successfully.")
