"""LoRA adapters on the host: `LoRARequest` (vLLM's), the engine's `LoRAConfig`, and reading a PEFT
adapter folder (adapter_config.json + adapter_model.safetensors) into per-module A/B arrays, checked
against the base model; a bad adapter is refused here with a message naming the problem.

Which adapter is the base model's: the shapes decide. Every tensor must fit the base model's
projection (in and out features, layer index below its layer count). `base_model_name_or_path`
is checked only where it names a local model (a folder with config.json, or a .gguf file): its
shapes must then equal the served model's. A hub id is not compared by name, since the same
weights are served under many names (a GGUF, a local copy); a different model's shapes differ.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# layers.<l>.<self_attn|mlp>.<module>.lora_<A|B>[.<adapter name>].weight, under any prefix (PEFT's
# base_model.model.model.; older saves kept the adapter's name before .weight)
_TENSOR = re.compile(r"^(?P<prefix>.*\.)?layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<module>\w+)"
                     r"\.lora_(?P<ab>[AB])(\.\w+)?\.weight$")
# PEFT options whose adapters compute something else than x + scale * B @ A x.
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)", "lora_bias": "lora_bias",
                "modules_to_save": "modules_to_save (fully trained modules)", "layer_replication": "layer_replication",
                "trainable_token_indices": "trainable_token_indices", "target_parameters": "target_parameters"}


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter a request runs with (vLLM's): a name, an id unique among adapters, and the folder
    PEFT saved it to. ``base_model_name`` (optional) is the model /v1/models lists as its parent."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be a non-empty string, got {self.lora_path!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class LoRAConfig:
    max_loras: int       # adapters resident on the device at once (the slots a step's rows pick from)
    max_lora_rank: int   # every adapter is padded to this rank; a higher rank is refused

    def __post_init__(self):
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served; `not_found` when its files are missing (404, not 400)."""

    def __init__(self, message: str, not_found: bool = False):
        super().__init__(message)
        self.not_found = not_found


_uids = itertools.count(1)


@dataclasses.dataclass(eq=False)
class LoRAAdapter:
    """One adapter read and checked: each targeted module's A and B over all layers (zeros in the
    layers it leaves alone), B already scaled. `uid` is unique to this reading: the prefix cache
    keys pages by it, so pages computed under one adapter never serve another (or the same name
    reloaded from other files)."""

    request: LoRARequest
    rank: int                    # its largest rank over modules
    a: dict[str, np.ndarray]     # module -> [L, I, r] float32
    b: dict[str, np.ndarray]     # module -> [L, r, O] float32, times alpha/r
    uid: int = dataclasses.field(default_factory=lambda: next(_uids))

    @property
    def name(self) -> str:
        return self.request.lora_name

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.a)

    def slot_arrays(self, shapes: dict[str, tuple[int, int]], num_layers: int, max_rank: int, dtype) -> tuple[dict, dict]:
        """Every module's a [L, I, max_rank] and b [L, max_rank, O], zero-padded (zeros for modules it
        does not target): the fixed-shape contents of one device slot."""
        a, b = {}, {}
        for module, (fan_in, fan_out) in shapes.items():
            a[module] = np.zeros((num_layers, fan_in, max_rank), dtype)
            b[module] = np.zeros((num_layers, max_rank, fan_out), dtype)
            if module in self.a:
                r = self.a[module].shape[-1]
                a[module][:, :, :r] = self.a[module]
                b[module][:, :r, :] = self.b[module]
        return a, b


def _fail(request: LoRARequest, problem: str, not_found: bool = False) -> LoRAAdapterError:
    return LoRAAdapterError(f"LoRA adapter '{request.lora_name}' ({request.lora_path}): {problem}", not_found)


def _pattern_value(patterns: dict, module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the module path's tail."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    tensors = {}
    with safe_open(path, framework="numpy") as f:
        names = list(f.keys())
        bf16 = [n for n in names if f.get_slice(n).get_dtype() == "BF16"]
        for name in names:
            if name not in bf16:
                tensors[name] = np.asarray(f.get_tensor(name), np.float32)
    if bf16:  # numpy has no bfloat16: read those through JAX
        with safe_open(path, framework="flax") as f:
            tensors.update({n: np.asarray(f.get_tensor(n), np.float32) for n in bf16})
    return tensors


def _check_base_model(request: LoRARequest, adapter_config: dict, model_config) -> None:
    """A local base_model_name_or_path must have the served model's shapes (see the module docstring)."""
    base = adapter_config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        return
    path = os.path.expanduser(base)
    if not (os.path.isfile(os.path.join(path, "config.json")) or (os.path.isfile(path) and path.endswith(".gguf"))):
        logger.debug("LoRA adapter %s: base model %r is not a local model; its tensor shapes decide", request.lora_name, base)
        return
    from jaxserve.models import load_model_config

    theirs, _ = load_model_config(path)
    fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
    differ = [f"{f} {getattr(theirs, f)} vs {getattr(model_config, f)}" for f in fields
              if getattr(theirs, f) != getattr(model_config, f)]
    if differ:
        raise _fail(request, f"it was trained on {base}, another model than the one served ({', '.join(differ)})")


def read_adapter(request: LoRARequest, model_config, max_rank: int) -> LoRAAdapter:
    """Read and check a PEFT LoRA folder for the model `model_config` describes; raises
    LoRAAdapterError naming what is wrong (missing files, an unsupported PEFT option, a module the
    model lacks, a shape or layer of another model, a rank above `max_rank`)."""
    from jaxserve.models.lora import module_shapes

    folder = os.path.expanduser(request.lora_path)
    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isdir(folder):
        raise _fail(request, "no such folder", not_found=True)
    if not os.path.isfile(config_path):
        raise _fail(request, f"no {CONFIG_FILE} in the folder", not_found=True)
    if not os.path.isfile(weights_path):
        other = " (adapter_model.bin is not supported: save with safe_serialization)" \
            if os.path.isfile(os.path.join(folder, "adapter_model.bin")) else ""
        raise _fail(request, f"no {WEIGHTS_FILE} in the folder{other}", not_found=True)
    try:
        with open(config_path) as f:
            config: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as e:
        raise _fail(request, f"cannot read {CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict):
        raise _fail(request, f"{CONFIG_FILE} is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise _fail(request, f"it is a {config['peft_type']} adapter; only LoRA is supported")
    unsupported = [what for key, what in _UNSUPPORTED.items() if config.get(key)]
    if unsupported:
        raise _fail(request, f"it uses {', '.join(unsupported)}, which jaxserve does not support")
    shapes, L = module_shapes(model_config), model_config.num_layers  # the projections this model adapts
    targets = config.get("target_modules")
    if isinstance(targets, list):
        lacking = sorted({t for t in targets if str(t).rsplit(".", 1)[-1] not in shapes})
        if lacking:
            raise _fail(request, f"it targets {', '.join(lacking)}, which this model does not have as LoRA "
                                 f"targets (supported: {', '.join(shapes)})")
    _check_base_model(request, config, model_config)

    try:
        tensors = _read_tensors(weights_path)
    except Exception as e:  # a truncated or foreign file
        raise _fail(request, f"cannot read {WEIGHTS_FILE}: {e}") from None
    pairs: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    paths: dict[tuple[str, int], str] = {}
    for key, value in tensors.items():
        m = _TENSOR.match(key)
        if m is None or m["module"] not in shapes:
            raise _fail(request, f"tensor {key} is not the LoRA A/B of a projection jaxserve adapts in this "
                                 f"model ({', '.join(shapes)}): the model lacks it or it is unsupported")
        module, layer = m["module"], int(m["layer"])
        if layer >= L:
            raise _fail(request, f"tensor {key} is for layer {layer}, but the base model has {L} layers: "
                                 "the adapter belongs to another model")
        pairs.setdefault((module, layer), {})[m["ab"]] = value
        paths[module, layer] = f"{(m['prefix'] or '').removeprefix('base_model.model.')}layers.{layer}.{m['block']}.{module}"
    if not pairs:
        raise _fail(request, f"{WEIGHTS_FILE} holds no LoRA weights")

    alpha = config.get("lora_alpha", 8)  # PEFT's default
    rslora = bool(config.get("use_rslora"))
    a_out: dict[str, np.ndarray] = {}
    b_out: dict[str, np.ndarray] = {}
    for (module, layer), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _fail(request, f"{module} of layer {layer} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]  # HF: A [r, in], B [out, r]
        fan_in, fan_out = shapes[module]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fan_in or b.shape != (fan_out, r):
            raise _fail(request, f"{module} of layer {layer} has A {list(a.shape)} and B {list(b.shape)}; the base "
                                 f"model's {module} needs A [r, {fan_in}] and B [{fan_out}, r]: the adapter belongs "
                                 "to another model")
        if r > max_rank:
            raise _fail(request, f"its rank {r} ({module}) is above --max-lora-rank {max_rank}")
        module_alpha = _pattern_value(config.get("alpha_pattern"), paths[module, layer], alpha)
        scale = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        if module not in a_out:
            a_out[module] = np.zeros((L, fan_in, r), np.float32)
            b_out[module] = np.zeros((L, r, fan_out), np.float32)
        elif a_out[module].shape[-1] != r:  # rank_pattern by layer: pad the module to its largest rank
            width = max(r, a_out[module].shape[-1])
            a_out[module] = np.pad(a_out[module], ((0, 0), (0, 0), (0, width - a_out[module].shape[-1])))
            b_out[module] = np.pad(b_out[module], ((0, 0), (0, width - b_out[module].shape[1]), (0, 0)))
        a_out[module][layer, :, :r] = a.T
        b_out[module][layer, :r, :] = b.T * np.float32(scale)
    rank = max(x.shape[-1] for x in a_out.values())
    return LoRAAdapter(request=request, rank=rank, a=a_out, b=b_out)


def parse_lora_modules(items, first_id: int = 1) -> list[LoRARequest]:
    """--lora-modules as vLLM takes them: `name=path`, or a JSON object
    {"name": ..., "path": ..., "base_model_name": ...}; ids are given in order from `first_id`."""
    requests = []
    for i, item in enumerate(items or ()):
        item = item.strip()
        if item.startswith("{"):
            try:
                spec = json.loads(item)
            except ValueError as e:
                raise ValueError(f"--lora-modules: {item!r} is not valid JSON: {e}") from None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
                raise ValueError(f"--lora-modules: {item!r} needs string fields \"name\" and \"path\"")
            name, path, base = spec["name"], spec["path"], spec.get("base_model_name")
        else:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules: {item!r} is neither name=path nor a JSON object")
            base = None
        if any(r.lora_name == name for r in requests):
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        requests.append(LoRARequest(name, first_id + i, path, base))
    return requests
