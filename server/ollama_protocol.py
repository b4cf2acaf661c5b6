"""The Ollama wire format: /api/generate and /api/chat bodies -> SamplingParams (``options`` mapped
onto vLLM's fields, Ollama's defaults), and the NDJSON objects and model descriptions sent back.

Pure functions over dicts, tested without a server. Durations are nanoseconds, as Ollama's.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging

from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from jaxserve.server.validation import RequestError, device_ints, get, sampling_error

logger = logging.getLogger(__name__)

# Ollama's defaults for the sampling options it shares with us (api/types.go DefaultOptions).
DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.1, presence_penalty=0.0,
                frequency_penalty=0.0)
# option -> (SamplingParams field, kind)
_MAPPED = {"temperature": ("temperature", "number"), "top_k": ("top_k", "int"), "top_p": ("top_p", "number"),
           "min_p": ("min_p", "number"), "repeat_penalty": ("repetition_penalty", "number"),
           "presence_penalty": ("presence_penalty", "number"), "frequency_penalty": ("frequency_penalty", "number")}
# Options that only tune llama.cpp's runtime (threads, GPU layers, mmap...): no effect here, but
# type-checked as Ollama does (api/types.go Options.FromMap refuses a wrong type).
_RUNTIME = {"numa": "bool", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "low_vram": "bool",
            "logits_all": "bool", "vocab_only": "bool", "use_mmap": "bool", "use_mlock": "bool",
            "embedding_only": "bool", "num_thread": "int", "num_keep": "int", "penalize_newline": "bool"}
# Ollama sampling options named as SamplingParams fields: passed through when SamplingParams has
# the field; otherwise refused unless they hold their no-op value (None: ignored while mirostat is 0).
_SAME_NAME = {"typical_p": ("number", 1.0), "tfs_z": ("number", 1.0), "mirostat": ("int", 0),
              "mirostat_tau": ("number", None), "mirostat_eta": ("number", None)}
_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}
_KNOWN = set(DEFAULTS) | set(_RUNTIME) | set(_SAME_NAME) | {"seed", "stop", "num_predict", "num_ctx", "repeat_last_n"}
_ALIASES = {"repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"}
# SamplingParams fields set from the request's top level, not from options.
_TOP_LEVEL = {"logprobs": "top_logprobs"}


def error_body(message: str) -> dict:
    return {"error": message}


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_options(body: dict, *, num_prompt_tokens: int, max_model_len: int,
                  logprobs: int | None = None, keep_special_tokens: bool = False) -> SamplingParams:
    """``options`` -> SamplingParams; num_ctx caps the context, num_predict -1/-2 fill it.
    keep_special_tokens: the output keeps special tokens' text (tool-call marks to parse)."""
    options = get(body, "options", "object", {})
    kwargs = {"skip_special_tokens": False} if keep_special_tokens else {}
    for name, (field, kind) in _MAPPED.items():
        kwargs[field] = get(options, name, kind, DEFAULTS[name], where="options.")
    if kwargs["top_k"] <= 0:  # llama.cpp's top-k keeps every token for k <= 0
        kwargs["top_k"] = -1
    seed = get(options, "seed", "int", where="options.")
    kwargs["seed"] = None if seed is None or seed < 0 else seed  # Ollama: -1 = random
    stop = get(options, "stop", "str_or_list", where="options.")
    for name, (kind, neutral) in _SAME_NAME.items():
        value = get(options, name, kind, where="options.")
        if value is not None and name in _FIELDS:
            kwargs[name] = value
        elif value is not None and neutral is not None and value != neutral:
            raise RequestError(f"options.{name} is not supported (only {neutral!r})", param=f"options.{name}")
    repeat_last_n = get(options, "repeat_last_n", "int", 64, where="options.")
    if repeat_last_n < -1:
        raise RequestError(f"options.repeat_last_n must be -1, 0 or positive, got {repeat_last_n}",
                           param="options.repeat_last_n")
    if "repeat_last_n" in _FIELDS:
        kwargs["repeat_last_n"] = repeat_last_n
    elif repeat_last_n == 0:  # without windows, at least Ollama's "0 disables the penalties" holds
        kwargs.update(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    for name, kind in _RUNTIME.items():
        get(options, name, kind, where="options.")
    unknown = sorted(set(options) - _KNOWN)
    if unknown:  # a few names, cut short: the client writes this line
        logger.warning("ignoring unknown Ollama options: %s%s", ", ".join(repr(n[:40]) for n in unknown[:8]),
                       f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
    num_ctx = get(options, "num_ctx", "int", where="options.")
    if num_ctx is not None and num_ctx < 1:
        raise RequestError(f"options.num_ctx must be >= 1, got {num_ctx}", param="options.num_ctx")
    context = min(num_ctx or max_model_len, max_model_len)
    if num_prompt_tokens >= context:
        raise RequestError(f"the prompt has {num_prompt_tokens} tokens and the context length is {context} "
                           f"(num_ctx {num_ctx}, server max {max_model_len}): no room to generate",
                           param="prompt")
    num_predict = get(options, "num_predict", "int", -1, where="options.")
    if num_predict in (-1, -2):
        max_tokens = context - num_prompt_tokens
    elif num_predict >= 1:
        max_tokens = min(num_predict, context - num_prompt_tokens)
    else:
        raise RequestError(f"options.num_predict must be -1, -2 or >= 1, got {num_predict}",
                           param="options.num_predict")
    device_ints(kwargs, lambda name: f"options.{name}")
    try:
        return SamplingParams(**kwargs, stop=stop, max_tokens=max_tokens, logprobs=logprobs,
                              structured_outputs=format_constraint(body))
    except ValueError as e:
        err = sampling_error(e, {**_ALIASES, **_TOP_LEVEL})
        if err.param not in _TOP_LEVEL.values():
            err.message = f"options.{err.message}"
            err.param = f"options.{err.param}" if err.param else None
        err.args = (err.message,)
        raise err from None


def format_constraint(body: dict) -> StructuredOutputsParams | None:
    """Ollama's `format`: "json" (any JSON object) or a JSON schema; none when absent or empty."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return StructuredOutputsParams(json_object=True)
    if isinstance(fmt, dict):
        return StructuredOutputsParams(json=fmt)
    raise RequestError(f"format must be \"json\" or a JSON schema object, got {fmt!r:.60}", param="format")


def refuse_unsupported(body: dict) -> None:
    format_constraint(body)
    if body.get("images"):
        raise RequestError("this model does not take images", param="images")
    for name in ("suffix", "template"):
        if body.get(name):
            raise RequestError(f"{name} is not supported", param=name)


def think(body: dict, model: str, formats) -> bool | None:
    """Ollama's `think`: true (or a level, "high" / "medium" / "low"), false, or None when absent.
    Thinking needs a model served with a reasoning parser."""
    value = body.get("think")
    if value is None:
        return None
    if not isinstance(value, (bool, str)) or (isinstance(value, str) and value not in ("high", "medium", "low")):
        raise RequestError(f"think must be true, false, \"high\", \"medium\" or \"low\", got {value!r:.40}",
                           param="think")
    if value is not False and formats.reasoning is None:
        raise RequestError(f'"{model}" does not support thinking (serve it with --reasoning-parser)', param="think")
    return value is not False


def logprobs_request(body: dict) -> int | None:
    if not get(body, "logprobs", "bool", False):
        return None
    return get(body, "top_logprobs", "int", 0)


def final_stats(*, start: float, arrival: float, first_token: float | None, finish: float, num_prompt: int,
                num_generated: int) -> dict:
    """The closing object's counts and durations (ns). Times are time.monotonic() seconds."""
    first = first_token if first_token is not None else finish
    ns = lambda seconds: max(0, int(seconds * 1e9))  # noqa: E731
    return {"total_duration": ns(finish - start), "load_duration": ns(arrival - start),
            "prompt_eval_count": num_prompt, "prompt_eval_duration": ns(first - arrival),
            "eval_count": num_generated, "eval_duration": ns(finish - first)}


def done_reason(finish_reason: str | None) -> str:
    return {"length": "length", "abort": "abort"}.get(finish_reason, "stop")


# ---- model descriptions --------------------------------------------------------------------------

def details(card) -> dict:
    return {"parent_model": "", "format": card.format, "family": card.family, "families": [card.family],
            "parameter_size": card.parameter_size, "quantization_level": card.quantization}


def tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def tags(card) -> dict:
    return {"models": [{"name": tag(n), "model": tag(n), "modified_at": card.modified_at, "size": card.size_bytes,
                        "digest": card.digest, "details": details(card)} for n in card.names]}


# The engine's capabilities (models/registry.py) as Ollama names them in /api/show.
_CAPABILITIES = {"generate": "completion", "embed": "embedding"}


def show(card, name: str) -> dict:
    parameters = "\n".join(f"stop {s!r}".replace("'", '"') for s in card.stop)
    template = card.chat_template or ""
    modelfile = (f"# Modelfile generated by jaxserve\nFROM {card.source}\nTEMPLATE \"\"\"{template}\"\"\"\n"
                 + "".join(f"PARAMETER {line}\n" for line in parameters.splitlines()))
    return {"modelfile": modelfile, "parameters": parameters, "template": template, "details": details(card),
            "model_info": dict(card.model_info), "capabilities": [_CAPABILITIES[c] for c in card.capabilities],
            "modified_at": card.modified_at}


def ps(loaded: list[tuple[list[str], object]]) -> dict:
    """/api/ps of the loaded models: (names it answers to, its model_pool.LoadedModel) each."""
    far = "2318-01-01T00:00:00Z"  # a model kept until the process stops (the served one, keep_alive < 0)
    models = []
    for names, m in loaded:
        expires = far if m.expires_at == float("inf") else datetime.datetime.fromtimestamp(
            m.expires_at, datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        models += [{"name": tag(n), "model": tag(n), "size": m.size, "digest": m.card.digest,
                    "details": details(m.card), "expires_at": expires, "size_vram": m.device_bytes,
                    "context_length": m.card.max_model_len} for n in names]
    return {"models": models}


def stored_details(model, card) -> dict:
    """A stored model's details: its weights' card when they are loaded, else what its source says."""
    base = details(card) if card is not None else {
        "parent_model": "", "format": "gguf" if model.source.endswith(".gguf") else "safetensors", "family": "",
        "families": [], "parameter_size": "", "quantization_level": ""}
    return {**base, "parent_model": model.base if model.base != model.source else ""}


def stored_tag(model, card) -> dict:
    return {"name": model.name, "model": model.name, "modified_at": model.modified_at, "size": model.size,
            "digest": model.digest, "details": stored_details(model, card)}


def show_stored(model, card) -> dict:
    """/api/show of a stored model; model_info and capabilities come from its weights' card when
    they are loaded (a model not yet loaded is assumed to generate)."""
    template = model.template if model.template is not None else (card.chat_template or "" if card else "")
    return {"modelfile": model.show_modelfile(), "parameters": model.parameters_text(), "template": template,
            "system": model.system or "", "license": "\n".join(model.license),
            "messages": [{"role": m.role, "content": m.content} for m in model.messages],
            "details": stored_details(model, card), "model_info": dict(card.model_info) if card else {},
            "capabilities": [_CAPABILITIES[c] for c in card.capabilities] if card else ["completion"],
            "modified_at": model.modified_at}
