"""A stored model's defaults on a request, as Ollama applies them (server/routes.go): its PARAMETERs
under the request's own options, its SYSTEM and MESSAGEs around the conversation, its TEMPLATE.
``jaxserve run NAME`` and the server's routes (Ollama's and OpenAI's) all take them from here.
"""
from __future__ import annotations

import functools

from jaxserve.model_store import StoredModel


def options(model: StoredModel, given: dict | None) -> dict:
    """The request's options over the model's parameters (a request's ``stop`` replaces the model's)."""
    return {**model.parameters, **(given or {})}


# Ollama options -> the OpenAI (and vLLM) request fields a stored model's parameter fills in when
# the request leaves them out, as Ollama's OpenAI layer does.
_OPENAI_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
                  "stop": "stop", "num_predict": "max_tokens", "repeat_penalty": "repetition_penalty",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def openai_body(model: StoredModel, body: dict) -> dict:
    """An OpenAI request body with the model's parameters where the request sets nothing."""
    out = dict(body)
    for option, field in _OPENAI_FIELDS.items():
        value = model.parameters.get(option)
        if value is None or body.get(field) is not None or (option == "num_predict" and (
                value < 0 or body.get("max_completion_tokens") is not None)):
            continue
        out[field] = value
    return out


def chat_messages(model: StoredModel, messages: list[dict]) -> list[dict]:
    """Ollama's /api/chat: the model's messages before the request's, and its system prompt first
    unless the request begins with a system message of its own."""
    out = [{"role": m.role, "content": m.content} for m in model.messages] + list(messages)
    if model.system and (not messages or messages[0].get("role") != "system"):
        out.insert(0, {"role": "system", "content": model.system})
    return out


def generate_messages(model: StoredModel, prompt: str, system: str | None, *, with_context: bool) -> list[dict]:
    """Ollama's /api/generate: the request's system prompt, else the model's; the model's messages
    unless the request continues a ``context``; then the prompt."""
    system = system or model.system
    out = [{"role": "system", "content": system}] if system else []
    if not with_context:
        out += [{"role": m.role, "content": m.content} for m in model.messages]
    return out + [{"role": "user", "content": prompt}]


def template(model: StoredModel):
    """The model's GoTemplate (parsed once per source text), or None: the tokenizer's chat template."""
    return None if model.template is None else _parsed(model.template)


@functools.lru_cache(maxsize=64)
def _parsed(source: str):
    from jaxserve.go_template import GoTemplate

    return GoTemplate(source)
