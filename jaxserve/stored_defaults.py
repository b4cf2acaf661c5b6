"""A stored model's defaults on a request, as Ollama applies them (server/routes.go): its PARAMETERs
under the request's own options, its SYSTEM and MESSAGEs around the conversation, its TEMPLATE and
its ADAPTER. ``jaxserve run NAME`` and the server's Ollama routes both take them from here.
"""
from __future__ import annotations

import functools

from jaxserve.model_store import StoredModel


def options(model: StoredModel, given: dict | None) -> dict:
    """The request's options over the model's parameters (a request's ``stop`` replaces the model's)."""
    return {**model.parameters, **(given or {})}


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
