"""Typed reads of a JSON request body, and the error a bad field turns into.

Both API families validate with these helpers; each renders `RequestError` in its own wire
format (OpenAI's error object, Ollama's ``{"error": ...}``). Messages always name the field.
"""
from __future__ import annotations

import json
import numbers

MISSING = object()


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code (4xx for client mistakes)."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.kind = kind


def _type_name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number" if isinstance(value, numbers.Number) else
                                    type(value).__name__)


_CHECKS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "a boolean"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "array": (lambda v: isinstance(v, list), "an array"),
    "str_list": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "an array of strings"),
    "int_list": (lambda v: isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v),
                 "an array of integers"),
    "str_or_list": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
                    "a string or an array of strings"),
}


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object, or a RequestError saying what is wrong with it."""
    if not raw:
        raise RequestError("the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}", code="invalid_json")
    return body


def get(body: dict, name: str, kind: str, default=None, *, required: bool = False, nullable: bool = True,
        where: str = ""):
    """body[name] checked against `kind` ("int", "number", "str", ...); default when absent or null."""
    label = f"{where}{name}"
    value = body.get(name, MISSING)
    if value is MISSING or (value is None and nullable):
        if required:
            raise RequestError(f"'{label}' is required", param=label, code="missing_required_parameter")
        return default
    check, allowed = _CHECKS[kind]
    if not check(value):
        raise RequestError(f"'{label}' must be {allowed}, got {_type_name(value)}", param=label,
                           code="invalid_type")
    return float(value) if kind == "number" else value


def sampling_error(e: ValueError, aliases: dict[str, str] | None = None) -> RequestError:
    """Turn a SamplingParams ValueError ("top_p must be ...") into a RequestError naming the field
    by the API's own name (e.g. max_tokens -> num_predict for Ollama)."""
    message = str(e)
    field = message.split(" ", 1)[0]
    if aliases and field in aliases:
        field = aliases[field]
        message = f"{field} {message.split(' ', 1)[1]}"
    return RequestError(message, param=field if field.isidentifier() else None, code="invalid_value")
