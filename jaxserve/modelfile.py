"""Ollama's Modelfile: parsed into a `Modelfile` (FROM, PARAMETER, TEMPLATE, SYSTEM, ADAPTER, LICENSE,
MESSAGE, REQUIRES) with every PARAMETER checked against Ollama's names and types, and rendered back
to Modelfile text (`jaxserve show --modelfile`).

    parse_modelfile(text: str) -> Modelfile               # ModelfileError (a ValueError) names the line
    Modelfile.from_fields(base=..., parameters=..., ...)  # /api/create's field form; ValueError
    Modelfile.render() -> str                             # parse_modelfile(m.render()) == m
    check_parameters(dict) -> dict                        # JSON-typed options -> Ollama's types

The syntax, as Ollama's: one instruction a line, its name in any case; blank lines and lines starting
with ``#`` are skipped. A value is the rest of the line, a ``"string"`` (``\\"`` and ``\\\\`` escape;
it may span lines) or a ``\"\"\"triple-quoted\"\"\"`` text kept verbatim, newlines included.
FROM, TEMPLATE, SYSTEM, ADAPTER, REQUIRES and each PARAMETER but ``stop`` may appear once.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# Ollama's options (api/types.go Options and Runner) and their types. The runtime ones (threads,
# GPU layers, mmap...) tune llama.cpp and do nothing here, but are accepted as Ollama accepts them.
PARAMETERS: dict[str, type] = {
    "num_keep": int, "seed": int, "num_predict": int, "top_k": int, "top_p": float, "min_p": float,
    "typical_p": float, "tfs_z": float, "repeat_last_n": int, "temperature": float, "repeat_penalty": float,
    "presence_penalty": float, "frequency_penalty": float, "mirostat": int, "mirostat_tau": float,
    "mirostat_eta": float, "penalize_newline": bool, "stop": list,
    "num_ctx": int, "num_batch": int, "num_gpu": int, "main_gpu": int, "num_thread": int, "numa": bool,
    "low_vram": bool, "use_mmap": bool, "use_mlock": bool, "vocab_only": bool, "logits_all": bool,
    "embedding_only": bool,
}
# name -> (is the value allowed, what is allowed): the ranges SamplingParams and the Ollama routes
# enforce, so a model cannot be created that every request would then be refused with.
_RANGES = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "typical_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "tfs_z": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "repeat_penalty": (lambda v: v > 0, "> 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "mirostat": (lambda v: v in (0, 1, 2), "0 (off), 1 or 2"),
    "mirostat_tau": (lambda v: v > 0, "> 0"),
    "mirostat_eta": (lambda v: v > 0, "> 0"),
    "repeat_last_n": (lambda v: v >= -1, ">= -1 (-1 = the whole context, 0 = off)"),
    "num_predict": (lambda v: v in (-1, -2) or v >= 1, "-1 (no limit), -2 (fill the context) or >= 1"),
    "num_ctx": (lambda v: v >= 1, ">= 1"),
    "num_batch": (lambda v: v >= 1, ">= 1"),
}
ROLES = ("system", "user", "assistant")
INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES")
_ONCE = ("FROM", "TEMPLATE", "SYSTEM", "ADAPTER", "REQUIRES")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}
_VERSION = re.compile(r"\d+(\.\d+){0,2}")


class ModelfileError(ValueError):
    """A Modelfile refused; ``line`` is the 1-based line at fault (None: the file as a whole)."""

    def __init__(self, problem: str, line: int | None = None):
        super().__init__(f"line {line}: {problem}" if line is not None else problem)
        self.problem = problem
        self.line = line


@dataclasses.dataclass(frozen=True)
class Message:
    role: str     # system, user or assistant
    content: str


@dataclasses.dataclass(frozen=True)
class Modelfile:
    base: str | None = None                  # FROM: a stored model, a .gguf, an HF folder or 'smollm2'
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)  # Ollama name -> value; stop: list
    template: str | None = None              # Go template source (go_template.py)
    system: str | None = None
    adapters: tuple[str, ...] = ()           # PEFT LoRA folders; at most one
    license: tuple[str, ...] = ()            # each LICENSE instruction's text
    messages: tuple[Message, ...] = ()       # a conversation put before every chat's own
    requires: str | None = None              # the Ollama version the model needs, as written
    lines: dict[str, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    """The line of each once-only instruction ("FROM": 1), for errors found later (a missing file)."""

    @classmethod
    def from_fields(cls, *, base: str | None = None, parameters: dict | None = None, template: str | None = None,
                    system: str | None = None, adapters=(), license=(), messages=(),
                    requires: str | None = None) -> Modelfile:
        """The field form of /api/create: JSON values, checked as the Modelfile's are."""
        for field, value in (("from", base), ("template", template), ("system", system), ("requires", requires)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{field} must be a string, got {value!r:.60}")
        if requires is not None and not _VERSION.fullmatch(requires):
            raise ValueError(f"requires must be a version such as 0.6.0, got {requires!r:.60}")
        license = (license,) if isinstance(license, str) else tuple(license or ())
        adapters = tuple(adapters or ())
        if not all(isinstance(x, str) and x for x in license + adapters) or base == "":
            raise ValueError("from, license and adapters must be non-empty strings")
        if len(adapters) > 1:
            raise ValueError(f"{len(adapters)} adapters given: jaxserve runs one adapter per model")
        checked = []
        for i, m in enumerate(messages or ()):
            if not isinstance(m, dict) or not isinstance(m.get("content", ""), str):
                raise ValueError(f"messages[{i}] must be an object with a role and a string content")
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r:.40}")
            checked.append(Message(m["role"], m.get("content", "")))
        return cls(base=base, parameters=check_parameters(parameters or {}), template=template, system=system,
                   adapters=adapters, license=license, messages=tuple(checked), requires=requires)

    def render(self) -> str:
        """Modelfile text that parses back to this Modelfile."""
        out = [f"FROM {_quote(self.base)}"] if self.base is not None else []
        out += [f"ADAPTER {_quote(a)}" for a in self.adapters]
        if self.template is not None:
            out.append(f"TEMPLATE {_quote(self.template)}")
        if self.system is not None:
            out.append(f"SYSTEM {_quote(self.system)}")
        for name in sorted(self.parameters):
            values = self.parameters[name]
            for value in values if isinstance(values, list) else [values]:
                out.append(f"PARAMETER {name} {_quote(parameter_text(value))}")
        out += [f"MESSAGE {m.role} {_quote(m.content)}" for m in self.messages]
        out += [f"LICENSE {_quote(text)}" for text in self.license]
        if self.requires is not None:
            out.append(f"REQUIRES {self.requires}")
        return "\n".join(out) + "\n"


def parameter_text(value) -> str:
    """A parameter's value as a Modelfile writes it (Python's shortest float reads back exactly)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def check_parameters(parameters: dict) -> dict:
    """JSON-typed options (/api/create's ``parameters``) -> Ollama's types; ValueError names the bad one."""
    if not isinstance(parameters, dict):
        raise ValueError(f"parameters must be an object, got {parameters!r:.60}")
    out = {}
    for name, value in parameters.items():
        kind = PARAMETERS.get(name)
        if kind is None:
            raise ValueError(f"unknown parameter {name!r}")
        if kind is list:
            value = [value] if isinstance(value, str) else value
            ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise ValueError(f"parameter {name} must be {_KIND_WORDS[kind]}, got {value!r:.60}")
        problem = _range_problem(name, value)
        if problem:
            raise ValueError(f"parameter {problem}")
        out[name] = value
    return out


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", list: "a string or a list of strings"}


def _range_problem(name: str, value) -> str | None:
    if name == "stop":
        return "stop must not be empty" if any(s == "" for s in value) else None
    check = _RANGES.get(name)
    if check is not None and not check[0](value):
        return f"{name} must be {check[1]}, got {parameter_text(value)}"
    return None


def _parameter_value(name: str, text: str, line: int):
    kind = PARAMETERS.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter {name!r}", line)
    if kind is list or kind is str:
        value = text
    elif kind is int and _INT.fullmatch(text):
        value = int(text)
    elif kind is float and _FLOAT.fullmatch(text):
        value = float(text)
    elif kind is bool and text in _GO_BOOLS:
        value = _GO_BOOLS[text]
    else:
        raise ModelfileError(f"PARAMETER {name} needs {_KIND_WORDS[kind]}, got {text!r}", line)
    problem = _range_problem(name, [value] if kind is list else value)
    if problem:
        raise ModelfileError(f"PARAMETER {problem}", line)
    return value


def _read_value(head: str, lines: list[str], i: int) -> tuple[str, int]:
    """The value starting at ``head`` (the rest of line i); returns it and the last line it took."""
    first = i
    if head.startswith('"""'):
        text = head[3:]
        while (end := text.find('"""')) < 0:
            i += 1
            if i >= len(lines):
                raise ModelfileError('the """ opened here is never closed', first + 1)
            text += "\n" + lines[i]
        tail, value = text[end + 3:], text[:end]
    elif head.startswith('"'):
        chars, pos, text = [], 1, head
        while True:
            if pos >= len(text):
                i += 1
                if i >= len(lines):
                    raise ModelfileError('the " string opened here is never closed', first + 1)
                chars.append("\n")
                text, pos = lines[i], 0
                continue
            c = text[pos]
            if c == "\\" and text[pos + 1:pos + 2] in ('"', "\\"):
                chars.append(text[pos + 1])
                pos += 2
            elif c == '"':
                break
            else:
                chars.append(c)
                pos += 1
        tail, value = text[pos + 1:], "".join(chars)
    else:
        return head.strip(), i
    if tail.strip():
        raise ModelfileError(f"unexpected text after the closing quote: {tail.strip()!r:.40}", i + 1)
    return value, i


def _quote(value: str) -> str:
    if value and value == value.strip() and "\n" not in value and not value.startswith('"'):
        return value
    if value and '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_modelfile(text: str) -> Modelfile:
    """Parse Modelfile text; ModelfileError names the line at fault. FROM is not required here
    (the store requires it of what it creates)."""
    lines = text.replace("\r\n", "\n").split("\n")
    once: dict[str, tuple[str, int]] = {}
    parameters: dict[str, Any] = {}
    parameter_lines: dict[str, int] = {}
    licenses, messages = [], []
    i = 0
    while i < len(lines):
        line = i + 1
        stripped = lines[i].lstrip()  # trailing spaces may belong to a quoted value
        if not stripped.strip() or stripped.startswith("#"):
            i += 1
            continue
        m = re.match(r"(\S+)(?:\s+(.*))?$", stripped, re.S)
        word, rest = m.group(1).upper(), m.group(2) or ""
        if word not in INSTRUCTIONS:
            raise ModelfileError(f"unknown instruction {m.group(1)!r}; expected one of {', '.join(INSTRUCTIONS)}",
                                 line)
        if word in ("PARAMETER", "MESSAGE"):
            key, head = re.match(r"(\S*)\s*(.*)$", rest, re.S).groups()
            if not key or not head.strip():
                what = "a name and a value" if word == "PARAMETER" else "a role and a message"
                raise ModelfileError(f"{word} needs {what}", line)
        else:
            key, head = None, rest
        value, i = _read_value(head, lines, i)
        if word == "PARAMETER":
            name = key.lower()
            if name in parameter_lines and name != "stop":
                raise ModelfileError(f"PARAMETER {name} given twice (first on line {parameter_lines[name]})", line)
            parameter_lines.setdefault(name, line)
            typed = _parameter_value(name, value, line)
            if name == "stop":
                parameters.setdefault("stop", []).append(typed)
            else:
                parameters[name] = typed
        elif word == "MESSAGE":
            if key.lower() not in ROLES:
                raise ModelfileError(f"MESSAGE role must be one of {', '.join(ROLES)}, got {key!r}", line)
            messages.append(Message(key.lower(), value))
        elif not value and word != "SYSTEM" and word != "TEMPLATE":
            raise ModelfileError(f"{word} needs a value", line)
        elif word == "LICENSE":
            licenses.append(value)
        elif word in once:
            raise ModelfileError(f"{word} given twice (first on line {once[word][1]})", line)
        else:
            if word == "REQUIRES" and not _VERSION.fullmatch(value):
                raise ModelfileError(f"REQUIRES needs a version such as 0.6.0, got {value!r}", line)
            once[word] = (value, line)
        i += 1
    values = {word: value for word, (value, _) in once.items()}
    return Modelfile(base=values.get("FROM"), parameters=parameters, template=values.get("TEMPLATE"),
                     system=values.get("SYSTEM"), adapters=tuple(v for w, v in values.items() if w == "ADAPTER"),
                     license=tuple(licenses), messages=tuple(messages), requires=values.get("REQUIRES"),
                     lines={word: line for word, (_, line) in once.items()})
