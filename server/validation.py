"""The one JSON body parser of both API families (bounded: depth, number sizes, finite numbers,
well-formed text), typed reads of the fields, and the error a bad body or field turns into.

Each API renders `RequestError` in its own wire format (OpenAI's error object, Ollama's
``{"error": ...}``). Messages name the field, as a path such as ``messages[0].content``.
"""
from __future__ import annotations

import json
import math
import numbers
import re

import numpy as np

MISSING = object()

# What a body may hold before any route reads it. A real request nests a few levels
# (messages[i].content[j].text is 4 below the body) and its numbers are counts, token ids and
# seeds; past these limits it is a broken or hostile client, refused before it can cost a deep
# recursion in the parser or Python's int() (which raises past 4,300 digits).
MAX_DEPTH = 64            # arrays and objects nested, the body object counting as 1
MAX_NUMBER_CHARS = 100    # characters in one number token: sign, digits, point and exponent
# Integers a field of kind "int" takes: int64, what every counter, id and seed fits (and what
# numpy and the device arrays hold).
INT_RANGE = (-2 ** 63, 2 ** 63 - 1)
# The largest top_k or token id the sampler's int32 device arrays hold: the protocols keep
# larger ones from reaching a step, where they would fail every request in the batch.
DEVICE_INT_MAX = 2 ** 31 - 1


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


# A JSON string, matched without backtracking (linear on any text): an unterminated one runs to
# the end. _TOKEN adds the punctuation _deep_path follows.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}:,]', re.S)
_MAX_PATH_TOKENS = 200_000  # how far _deep_path reads to name the field (about 0.1 s)
_BRACKET_STEP = np.zeros(256, np.int32)  # byte -> change of nesting depth
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
# Strict UTF-8 cannot carry a surrogate, so only a \uD800-\uDFFF escape can put one in a string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Refused:
    """Stands in the parsed body for a number the parser would not take; `reason` says why."""
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _body_error(message: str, param: str | None = None) -> RequestError:
    return RequestError(message, param=param or None, code="invalid_json")


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _too_deep(text: str) -> bool:
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # most bodies: nothing to scan
        return False
    codes = np.frombuffer(_STRING.sub("", text).encode(), np.uint8)  # what is left outside the strings
    return int(np.cumsum(_BRACKET_STEP[codes], dtype=np.int32).max()) > MAX_DEPTH


def _deep_path(text: str) -> str:
    """The field whose value nests past MAX_DEPTH, as "messages[0].content" ("" for the body)."""
    stack: list[list] = []  # per open container: [is object, its current key or index, a key is next]
    for n, m in enumerate(_TOKEN.finditer(text)):
        if n == _MAX_PATH_TOKENS:  # past a huge valid prefix: refuse without a name, but quickly
            return ""
        token = m.group()
        if token in ("[", "{"):
            if len(stack) == MAX_DEPTH:
                break
            stack.append([token == "{", None if token == "{" else 0, token == "{"])
        elif token in ("]", "}"):
            if stack:
                stack.pop()
        elif not stack:
            continue
        elif token == ",":
            if stack[-1][0]:
                stack[-1][2] = True
            else:
                stack[-1][1] += 1
        elif token == ":":
            stack[-1][2] = False
        elif stack[-1][0] and stack[-1][2]:
            try:
                stack[-1][1] = json.loads(token)
            except ValueError:  # an unterminated key: the body is broken there anyway
                stack[-1][1] = "?"
    keys = []
    for _, key, _ in stack if stack and stack[0][0] else ():
        if key is None:  # "{{": no key to name
            break
        keys.append(key)
    # Name the field, not each level of the pile: drop trailing [0]s and repeats of one key.
    while keys and (keys[-1] == 0 or (len(keys) > 1 and keys[-1] == keys[-2] and isinstance(keys[-1], str))):
        keys.pop()
    path = ""
    for key in keys[:8]:
        path = _join(path, key)
    return path


def _lone_surrogate(s: str) -> str | None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"\\u{ord(s[e.start]):04x}"
    return None


def _first_refused(body, check_strings: bool) -> tuple[str, str] | None:
    """(path, reason) of the first value the parser refused, in document order."""
    todo = [("", body)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, _Refused):
            return path, value.reason
        if isinstance(value, str):
            bad = check_strings and _lone_surrogate(value)
            if bad:
                return path, f"holds a lone UTF-16 surrogate ({bad}), which is not text"
        elif isinstance(value, dict):
            for key in value if check_strings else ():
                bad = _lone_surrogate(key)
                if bad:
                    return path, f"has a key with a lone UTF-16 surrogate ({bad}), which is not text"
            todo.extend((_join(path, k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            todo.extend((_join(path, i), v) for i, v in reversed(list(enumerate(value))))
    return None


def parse_json_body(raw: bytes) -> dict:
    """The body as a JSON object, or a RequestError (code "invalid_json", the field as param when one
    is known) saying what is wrong with it: not UTF-8, not JSON, nested past MAX_DEPTH, a number
    longer than MAX_NUMBER_CHARS or not finite (NaN, Infinity, 1e999), a lone surrogate escape."""
    if not raw:
        raise _body_error("the request body is empty; expected a JSON object")
    try:
        text = bytes(raw).decode("utf-8-sig")  # RFC 8259: UTF-8; a leading byte order mark is ignored
    except UnicodeDecodeError as e:
        raise _body_error(f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                          f"{e.start})") from None
    if _too_deep(text):
        path = _deep_path(text)
        where = f" (at '{path}')" if path else ""
        raise _body_error(f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep{where}",
                          path)
    refused = []

    def refuse(reason: str) -> _Refused:
        refused.append(reason)
        return _Refused(reason)

    def parse_int(token: str):
        if len(token) > MAX_NUMBER_CHARS:
            return refuse(f"is an integer of {len(token.lstrip('-'))} digits; numbers may have at most "
                          f"{MAX_NUMBER_CHARS} characters")
        return int(token)

    def parse_float(token: str):
        if len(token) > MAX_NUMBER_CHARS:
            return refuse(f"is a number of {len(token)} characters; numbers may have at most {MAX_NUMBER_CHARS}")
        value = float(token)
        if not math.isfinite(value):
            return refuse(f"is {token}, past the largest finite number (about 1.8e308)")
        return value

    def parse_constant(name: str):
        return refuse(f"is {name}, which is not JSON: numbers must be finite")

    try:
        body = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except json.JSONDecodeError as e:
        raise _body_error(f"the request body is not valid JSON: {e}") from None
    except RecursionError:  # _too_deep stops this first; kept so that no nesting can make a 500
        raise _body_error(f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep") from None
    if not isinstance(body, dict):
        raise _body_error(f"the request body must be a JSON object, got {_type_name(body)}")
    check_strings = _SURROGATE_ESCAPE.search(text) is not None
    if refused or check_strings:
        found = _first_refused(body, check_strings)
        if found is None and refused:  # a later duplicate key replaced the value: still not accepted
            found = "", refused[0]
        if found is not None:
            path, reason = found
            if path:
                raise _body_error(f"'{path}' {reason}", path)
            whose = "the request body" if reason.startswith("has a key") else "a value in the request body"
            raise _body_error(f"{whose} {reason}")
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
    if kind in ("int", "int_list"):
        low, high = INT_RANGE
        bad = [v for v in ([value] if kind == "int" else value) if not low <= v <= high]
        if bad:
            raise RequestError(f"'{label}' holds {bad[0]}, outside the 64-bit integers [-2**63, 2**63 - 1]",
                               param=label, code="invalid_value")
    return float(value) if kind == "number" else value


def device_ints(kwargs: dict, label_of) -> None:
    """Bound what SamplingParams passes to the sampler's int32 arrays: a top_k past them keeps
    every token anyway (-1, off); a stop token id past them is refused, naming the field."""
    if kwargs.get("top_k", -1) > DEVICE_INT_MAX:
        kwargs["top_k"] = -1
    bad = [t for t in kwargs.get("stop_token_ids") or () if t > DEVICE_INT_MAX]
    if bad:
        label = label_of("stop_token_ids")
        raise RequestError(f"'{label}' holds {bad[0]}, larger than any token id", param=label, code="invalid_value")


def sampling_error(e: ValueError, aliases: dict[str, str] | None = None) -> RequestError:
    """Turn a SamplingParams ValueError ("top_p must be ...") into a RequestError naming the field
    by the API's own name (e.g. max_tokens -> num_predict for Ollama)."""
    message = str(e)
    field = message.split(" ", 1)[0]
    if aliases and field in aliases:
        field = aliases[field]
        message = f"{field} {message.split(' ', 1)[1]}"
    return RequestError(message, param=field if field.isidentifier() else None, code="invalid_value")


def require_capability(engine, capability: str, message: str) -> None:
    """A 400 naming `model` unless the served engine can `capability` ("generate", "embed"): a
    route of the other kind on a model that cannot serve it."""
    if capability not in engine.capabilities:
        raise RequestError(message, param="model")
