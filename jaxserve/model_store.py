"""The model store: named models (Ollama's ``[host/][namespace/]model[:tag]``) kept as JSON manifests
under ``JAXSERVE_MODELS`` (default ``~/.jaxserve/models``), each a Modelfile over a weights source.

    store = ModelStore()                    # or ModelStore(root)
    store.create(name, modelfile, base_dir=None) -> StoredModel   # ModelfileError names FROM's line
    store.get(name) -> StoredModel          # ModelNotFoundError (a FileNotFoundError)
    store.exists(name) -> bool
    store.list() -> list[StoredModel]       # most recently modified first
    store.copy(src, dst) -> StoredModel
    store.delete(name) -> None
    parse_name(name) -> ModelName           # InvalidModelName (a ValueError): nothing outside the store

    StoredModel.modelfile() -> Modelfile    # FROM its weights source: recreates the same model
    StoredModel.show_modelfile() -> str     # what `show --modelfile` prints
    StoredModel.parameters_text() -> str    # Ollama's /api/show "parameters"

A model's base is a stored model, a ``.gguf`` file, an HF folder or the bundled ``smollm2``. A base
that is a stored model is copied into the new manifest when it is created (as Ollama shares layers):
its parameters (the new ones override each), template, system prompt, messages, adapter and license
carry over unless the Modelfile sets them; so ``source`` is always weights, the model keeps working
when its base is deleted, and no chain is followed at load. The store holds no weights: a manifest
names its source's absolute path. Layout: ``<root>/manifests/<host>/<namespace>/<model>/<tag>.json``,
each written to a temporary file and renamed over the old one.
"""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import glob
import hashlib
import json
import logging
import os
import re
import tempfile

from jaxserve.modelfile import Message, Modelfile, ModelfileError

logger = logging.getLogger(__name__)

MODELS_ENV = "JAXSERVE_MODELS"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
# Ollama's name parts (types/model/name.go), lower case: names match case-insensitively, as Ollama's.
# Every part starts with a letter or digit, so none is "." or ".."; "/" and "\" never enter one.
_HOST = re.compile(r"[a-z0-9][a-z0-9._-]{0,349}(:[0-9]{1,5})?")
_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
_TAG = re.compile(r"[a-z0-9_][a-z0-9._-]{0,79}")
_SCHEMA = 1


class InvalidModelName(ValueError):
    pass


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        """The short form Ollama shows: default host and namespace left out."""
        prefix = [self.host, self.namespace] if self.host != DEFAULT_HOST else (
            [self.namespace] if self.namespace != DEFAULT_NAMESPACE else [])
        return "/".join(prefix + [self.model]) + ":" + self.tag


def parse_name(name: str) -> ModelName:
    """``model``, ``namespace/model`` or ``host/namespace/model``, each with an optional ``:tag``."""
    if not isinstance(name, str):
        raise InvalidModelName(f"a model name must be a string, got {name!r:.60}")
    *parts, last = name.lower().split("/")
    model, colon, tag = last.partition(":")
    parts.append(model)
    tag = tag if colon else DEFAULT_TAG
    if len(parts) > 3 or not (all(_PART.fullmatch(p) for p in parts[-2:]) and _TAG.fullmatch(tag)) or (
            len(parts) == 3 and not _HOST.fullmatch(parts[0])):
        raise InvalidModelName(f"invalid model name {name!r:.100}: use model[:tag], namespace/model[:tag] or "
                               f"host/namespace/model[:tag], each part letters, digits, '.', '_' or '-' "
                               f"(starting with a letter or digit)")
    host, namespace = [DEFAULT_HOST, DEFAULT_NAMESPACE][:3 - len(parts)] + parts[:-1]
    return ModelName(host, namespace, parts[-1], tag)


@dataclasses.dataclass(frozen=True)
class StoredModel:
    name: str                           # as Ollama shows it: "mymodel:latest"
    base: str                           # FROM as written
    source: str                         # the weights: an absolute .gguf or HF folder path, or "smollm2"
    parameters: dict                    # Ollama option -> value (modelfile.PARAMETERS' types)
    template: str | None                # Go template (go_template.py); None: the tokenizer's own
    system: str | None
    messages: tuple[Message, ...]
    adapters: tuple[str, ...]           # absolute PEFT adapter folders; at most one
    license: tuple[str, ...]
    requires: str | None
    created_at: str                     # RFC 3339, UTC
    modified_at: str
    size: int                           # bytes of the weights and adapter files
    digest: str                         # sha256 of what the model runs; its first 12 digits are its ID

    @property
    def id(self) -> str:
        return self.digest[:12]

    def modelfile(self) -> Modelfile:
        return Modelfile(base=self.source, parameters=dict(self.parameters), template=self.template,
                         system=self.system, adapters=self.adapters, license=self.license,
                         messages=self.messages, requires=self.requires)

    def show_modelfile(self) -> str:
        return (f'# Modelfile generated by "jaxserve show"\n# To build a new Modelfile based on this, replace '
                f"FROM with:\n# FROM {self.name}\n\n{self.modelfile().render()}")

    def parameters_text(self) -> str:
        """One line a value, Ollama's ``%-30s %#v`` (a stop string quoted, numbers as Go prints them)."""
        lines = []
        for name in sorted(self.parameters):
            values = self.parameters[name]
            lines += [f"{name:<30} {_go_value(v)}" for v in (values if isinstance(values, list) else [values])]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"schema": _SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict) -> StoredModel:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        return cls(**{**d, "messages": tuple(Message(m["role"], m["content"]) for m in d["messages"]),
                      "adapters": tuple(d["adapters"]), "license": tuple(d["license"])})


class ModelStore:
    def __init__(self, root: str | None = None):
        root = root or os.environ.get(MODELS_ENV) or os.path.join("~", ".jaxserve", "models")
        self.root = os.path.abspath(os.path.expanduser(root))
        self.manifests = os.path.join(self.root, "manifests")

    def _path(self, name: ModelName) -> str:
        path = os.path.join(self.manifests, name.host, name.namespace, name.model, name.tag + ".json")
        # The name's parts cannot climb out; a symlinked folder inside the store still could.
        inside = os.path.realpath(self.manifests)
        if os.path.commonpath([os.path.realpath(path), inside]) != inside:
            raise InvalidModelName(f"model {name} would be stored outside {self.manifests}")
        return path

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(parse_name(name)))

    def get(self, name: str) -> StoredModel:
        path = self._path(parse_name(name))
        try:
            with open(path) as f:
                return StoredModel.from_json(json.load(f))
        except FileNotFoundError:
            raise ModelNotFoundError(f"model '{parse_name(name)}' not found") from None

    def list(self) -> list[StoredModel]:
        models = []
        for path in glob.glob(os.path.join(self.manifests, "*", "*", "*", "*.json")):
            try:
                with open(path) as f:
                    models.append(StoredModel.from_json(json.load(f)))
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("skipping the unreadable manifest %s: %s", path, e)
        return sorted(models, key=lambda m: m.modified_at, reverse=True)

    def create(self, name: str, modelfile: Modelfile, base_dir: str | None = None,
               served: dict[str, str] | None = None) -> StoredModel:
        """Create (or replace) ``name``; relative FROM and ADAPTER paths are read from ``base_dir``
        (the Modelfile's folder; default the working directory). ``served``: names a server answers
        to that are not in the store -> their weights (FROM may name them)."""
        target = parse_name(name)
        base_dir = base_dir or os.getcwd()
        if modelfile.base is None:
            raise ModelfileError("no FROM line: a model needs a base (a stored model, a .gguf file, an HF folder "
                                 "or 'smollm2')")
        source, parent = self._resolve_base(modelfile.base, base_dir, modelfile.lines.get("FROM"), served or {})
        m = modelfile
        adapters = tuple(_adapter_path(a, base_dir, m.lines.get("ADAPTER")) for a in m.adapters)
        if parent is not None:  # carried over, unless this Modelfile sets it
            m = dataclasses.replace(
                m, parameters={**parent.parameters, **m.parameters},
                template=parent.template if m.template is None else m.template,
                system=parent.system if m.system is None else m.system,
                messages=m.messages or parent.messages, license=m.license or parent.license,
                requires=m.requires or parent.requires)
            adapters = adapters or parent.adapters
        if m.template is not None:
            from jaxserve.go_template import GoTemplate

            try:
                GoTemplate(m.template)
            except ValueError as e:
                raise ModelfileError(f"TEMPLATE does not parse: {e}", m.lines.get("TEMPLATE")) from None
        path = self._path(target)
        old = self._read_if_exists(path)
        now = _now()
        content = dict(source=source, parameters=m.parameters, template=m.template, system=m.system,
                       messages=[dataclasses.asdict(x) for x in m.messages], adapters=list(adapters),
                       license=list(m.license), requires=m.requires)
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        model = StoredModel(name=str(target), base=modelfile.base, source=source, parameters=m.parameters,
                            template=m.template, system=m.system, messages=m.messages, adapters=adapters,
                            license=m.license, requires=m.requires,
                            created_at=old.created_at if old else now, modified_at=now,
                            size=_source_size(source) + sum(_size(a) for a in adapters), digest=digest)
        self._write(path, model)
        return model

    def copy(self, src: str, dst: str) -> StoredModel:
        model = self.get(src)
        target = parse_name(dst)
        now = _now()
        copied = dataclasses.replace(model, name=str(target), created_at=now, modified_at=now)
        self._write(self._path(target), copied)
        return copied

    def delete(self, name: str) -> None:
        path = self._path(parse_name(name))
        try:
            os.remove(path)
        except FileNotFoundError:
            raise ModelNotFoundError(f"model '{parse_name(name)}' not found") from None
        folder = os.path.dirname(path)
        while folder != self.manifests and not os.listdir(folder):  # no empty folders left behind
            os.rmdir(folder)
            folder = os.path.dirname(folder)

    def _resolve_base(self, base: str, base_dir: str, line: int | None,
                      served: dict[str, str]) -> tuple[str, StoredModel | None]:
        """(weights source, the stored model it came from or None)."""
        path = os.path.join(base_dir, os.path.expanduser(base))
        if os.path.exists(path):
            return _weights_path(path, line), None
        if base in served or base.removesuffix(":latest") in served:
            return served.get(base) or served[base.removesuffix(":latest")], None
        from jaxserve.models.loader import BUNDLED_ALIAS  # imports jax: only when no path matched

        if base == BUNDLED_ALIAS:
            return BUNDLED_ALIAS, None
        try:
            name = parse_name(base)
        except InvalidModelName:
            raise ModelfileError(f"FROM {base}: no such file or folder (nor a model name)", line) from None
        try:
            parent = self.get(str(name))
        except ModelNotFoundError:
            raise ModelfileError(f"FROM {base}: no model {name} in the store ({self.root}) and no file or "
                                 f"folder of that name", line) from None
        return parent.source, parent

    def _read_if_exists(self, path: str) -> StoredModel | None:
        try:
            with open(path) as f:
                return StoredModel.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write(self, path: str, model: StoredModel) -> None:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(model.to_json(), f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _weights_path(path: str, line: int | None) -> str:
    path = os.path.abspath(path)
    if os.path.isfile(path) and path.endswith(".gguf"):
        return path
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "config.json"))
                                or len(glob.glob(os.path.join(path, "*.gguf"))) == 1):
        return path
    raise ModelfileError(f"FROM {path}: not a .gguf file, an HF folder (with config.json) or a folder of one "
                         f".gguf file", line)


def _adapter_path(adapter: str, base_dir: str, line: int | None) -> str:
    from jaxserve.lora import CONFIG_FILE

    path = os.path.abspath(os.path.join(base_dir, os.path.expanduser(adapter)))
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise ModelfileError(f"ADAPTER {adapter}: not a PEFT adapter folder (with {CONFIG_FILE} and "
                             f"adapter_model.safetensors)", line)
    return path


def _source_size(source: str) -> int:
    from jaxserve.models.loader import BUNDLED_ALIAS, bundled_model_path

    return _size(bundled_model_path() if source == BUNDLED_ALIAS else source)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(path, "*")) if os.path.isfile(p))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _go_value(value) -> str:
    """A parameter as Go's %#v prints it (strings quoted; floats as %v: 1, 0.7, 1e+06)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    number = decimal.Decimal(repr(value)).normalize()
    sign, digits, exponent = number.as_tuple()
    if not isinstance(exponent, int) or value == 0:  # inf or nan cannot be stored; zero is "0"
        return "0"
    point = len(digits) + exponent  # the decimal point's place after the first digit's
    # strconv.FormatFloat(v, 'g', -1): the exponent form when the exponent is < -4 or >= this limit
    limit = len(digits) if 6 > len(digits) >= point else 6
    text = "".join(map(str, digits))
    if point - 1 < -4 or point - 1 >= limit:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        e = point - 1
        body = f"{mantissa}e{'-' if e < 0 else '+'}{abs(e):02d}"
    else:
        body = format(abs(number), "f")
    return ("-" if sign else "") + body
