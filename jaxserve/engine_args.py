"""Every engine option, declared once: `EngineArgs`, a frozen dataclass whose fields carry their
type, default, help text, CLI group and environment variable, as vLLM's EngineArgs.

The same table builds the flags of ``jaxserve serve``, ``generate`` and ``run``, reads the YAML
``--config`` keys and the ``JAXSERVE_*`` variables, and is ``LLM(...)``'s keyword arguments.
Precedence: flag (or keyword) > environment > config file > another program's variable > default.
This module is the one place that reads ``JAXSERVE_*`` variables (and the one foreign one, Ollama's
``OLLAMA_KV_CACHE_TYPE``), and it imports nothing heavy (``--help`` stays fast).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import types
import typing
from typing import Any, Callable, Mapping

ENV_PREFIX = "JAXSERVE_"
CACHE_ROOT_ENV = "JAXSERVE_CACHE_ROOT"
ATTENTION_BACKENDS = ("auto", "pallas", "jnp")  # pallas_kernels.backend.BACKENDS, without importing jax
RUNNERS = ("auto", "generate", "pooling")  # vLLM's --runner
POOLING_TYPES = ("auto", "last", "mean", "cls")  # "auto" and models.pooling.POOLING_TYPES, without importing jax
QUANTIZATION_METHODS = ("int8",)  # models.quantization.QUANTIZATION_METHODS, without importing jax
# jaxserve/kv_cache_dtype.py's modes, without importing jax: vLLM's names (fp8 is fp8_e4m3) and int8.
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8")
OLLAMA_KV_CACHE_TYPE = "OLLAMA_KV_CACHE_TYPE"


def ollama_kv_cache_type(value: str) -> str:
    """Ollama's OLLAMA_KV_CACHE_TYPE as a --kv-cache-dtype: f16 (Ollama's default, its unquantized
    cache) is the 16-bit cache, bfloat16 here (the 16-bit float jaxserve stores, packed on CPU);
    q8_0 is int8 with a scale per token and KV head (llama.cpp's q8_0 scales blocks of 32 values).
    q4_0 is refused rather than served as int8: it asks for a quarter of f16's memory, and int8
    would quietly give the server half as many KV pages as the user planned for."""
    word = value.strip().lower()
    if word in ("f16", "bf16"):
        return "bfloat16"
    if word == "q8_0":
        return "int8"
    if word == "q4_0":
        raise ValueError(f"environment {OLLAMA_KV_CACHE_TYPE}: q4_0 (a 4-bit KV cache) is not supported; "
                         f"use q8_0 (int8 pages, twice q4_0's memory) or f16, or override it with "
                         f"--kv-cache-dtype / JAXSERVE_KV_CACHE_DTYPE")
    raise ValueError(f"environment {OLLAMA_KV_CACHE_TYPE} must be one of f16, q8_0, q4_0, got {value!r}")


def default_cache_root(environ: Mapping[str, str] = os.environ) -> str:
    """Where compiled graphs and converted models are cached: $JAXSERVE_CACHE_ROOT or ~/.cache/jaxserve."""
    return environ.get(CACHE_ROOT_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jaxserve")


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    """One option as the CLI, the config file and the environment see it."""
    name: str                          # field name, snake_case; the flag is --name-with-dashes
    kind: type                         # int, float, str, bool or tuple (of str)
    default: Any
    help: str
    group: str                         # --help section
    env: str                           # environment variable
    choices: tuple[str, ...] | None = None
    minimum: float | None = None       # smallest allowed value of an int/float option
    exclusive_minimum: bool = False    # the minimum itself is not allowed (a value must exceed it)
    # Another program's variable for the same setting (read below the config file) and how its
    # words translate to this option's values (raising ValueError on one it cannot serve).
    foreign_env: str | None = None
    foreign_value: Callable[[str], Any] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def coerce(self, value: Any, source: str) -> Any:
        """`value` (from YAML, the environment or a keyword) as this option's type, or a ValueError
        naming the source and the option."""
        if value is None:
            return None
        kind = self.kind
        try:
            if kind is bool:
                if isinstance(value, str) and value.lower() in _BOOL_WORDS:
                    return _BOOL_WORDS[value.lower()]
                if not isinstance(value, bool):
                    raise ValueError(value)
                return value
            if kind is tuple:
                if isinstance(value, (list, tuple)) and len(value) == 1 and _is_json_list(value[0]):
                    value = value[0]
                if isinstance(value, str) and _is_json_list(value):  # vLLM's form: '["a", "b"]'
                    value = json.loads(value)
                    if not all(isinstance(v, str) for v in value):
                        raise ValueError(value)
                elif isinstance(value, str):  # the environment's form: comma-separated
                    return tuple(v.strip() for v in value.split(",") if v.strip())
                if not isinstance(value, (list, tuple)):
                    raise ValueError(value)
                return tuple(str(v) for v in value)
            if isinstance(value, bool) or (kind is int and isinstance(value, float)) or \
                    (kind is str and not isinstance(value, str)):
                raise ValueError(value)
            return kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {self.name.replace('_', '-')} must be {_KIND_NAMES[kind]}, "
                             f"got {value!r}") from None

    def check(self, value: Any, source: str) -> None:
        """Range and choice checks on an already coerced value."""
        if value is None:
            return
        label = self.name.replace("_", "-")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{source}: {label} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.minimum is not None and (value < self.minimum or self.exclusive_minimum and value == self.minimum):
            relation = ">" if self.exclusive_minimum else ">="
            raise ValueError(f"{source}: {label} must be {relation} {self.minimum:g}, got {value!r}")


def _is_json_list(value) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("[")


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
               "off": False}
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               tuple: "a list of strings"}


def option(default: Any, help: str, *, group: str, env: str | None = None,
           choices: tuple[str, ...] | None = None, minimum: float | None = None,
           exclusive_minimum: bool = False, foreign_env: tuple[str, Callable[[str], Any]] | None = None) -> Any:
    """A dataclass field that is also a CLI/config/environment option (its kind comes from the
    field's annotation). foreign_env: (another program's variable, its value -> this option's)."""
    return dataclasses.field(default=default, metadata={"option": dict(
        help=help, group=group, env=env, choices=choices, minimum=minimum, exclusive_minimum=exclusive_minimum,
        foreign_env=foreign_env)})


def options_of(cls: type) -> list[Option]:
    """The Option of every field of an option dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    table = []
    for f in dataclasses.fields(cls):
        meta = f.metadata["option"]
        foreign_env, foreign_value = meta.get("foreign_env") or (None, None)
        table.append(Option(name=f.name, kind=_base_kind(hints[f.name]), default=f.default, help=meta["help"],
                            group=meta["group"], env=meta["env"] or ENV_PREFIX + f.name.upper(),
                            choices=meta["choices"], minimum=meta["minimum"],
                            exclusive_minimum=meta["exclusive_minimum"], foreign_env=foreign_env,
                            foreign_value=foreign_value))
    return table


def _base_kind(hint) -> type:
    """int | None -> int; tuple[str, ...] -> tuple."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return typing.get_origin(hint) or hint


# ---- the engine options --------------------------------------------------------------------------

_ENGINE = "model and engine"
_COMPILE = "compilation"
_PARALLEL = "parallelism"
_PROFILE = "profiling"
_LORA = "LoRA adapters"
_SPEC = "speculative decoding"
NGRAM = "[ngram]"  # --speculative-model's value for prompt lookup (vLLM's spelling)


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """Every engine option (see the module docstring). Build it from keywords, or with
    ``EngineArgs.resolve`` from flags, environment and a config file; ``__post_init__`` checks
    types and ranges, and the component configs check the rest when they are built."""

    model: str | None = option(None, "HF folder, .gguf file or 'smollm2' (default: the bundled "
                                     "SmolLM2-135M-Instruct)", group=_ENGINE)
    runner: str = option("auto", "generate (a decoder that writes text) or pooling (a model that embeds: "
                                 "LLM.embed, /v1/embeddings, /api/embed); auto: pooling for embedding-only "
                                 "architectures (BERT), else generate", group=_ENGINE, choices=RUNNERS)
    pooling_type: str = option("auto", "how a pooling model turns token states into one vector: last, mean or "
                                       "cls; auto: what the model's sentence-transformers files say, else cls "
                                       "for encoders and last for decoders", group=_ENGINE, choices=POOLING_TYPES)
    dtype: str = option("auto", "auto | float32 | bfloat16 | float16; auto: bfloat16 on accelerators and on "
                                "CPUs that multiply bf16 natively, else float32", group=_ENGINE)
    quantization: str | None = option(None, "keep the projection weights quantized on the device: int8 (W8A8: int8 "
                                            "weights with a scale per output channel, activations quantized per "
                                            "token as they go); default: none, the weights in --dtype",
                                      group=_ENGINE, choices=QUANTIZATION_METHODS)
    max_model_len: int | None = option(None, "longest prompt + output (default: the model's context length)",
                                       group=_ENGINE, minimum=1)
    max_num_seqs: int = option(64, "sequences per engine step (the decode batch)", group=_ENGINE, minimum=1)
    max_num_batched_tokens: int = option(512, "tokens per engine step (the chunked-prefill budget)",
                                         group=_ENGINE, minimum=1)
    block_size: int = option(16, "tokens per KV cache page (a power of two)", group=_ENGINE, minimum=1)
    enable_prefix_caching: bool = option(True, "share KV pages of identical prompt prefixes", group=_ENGINE)
    kv_cache_memory: int | None = option(None, "bytes for the KV cache (default on CPU: what --max-num-seqs "
                                               "full-length requests need, at most 1 GiB)", group=_ENGINE,
                                         minimum=1)
    kv_cache_dtype: str = option("auto", "what the KV cache stores: auto (the model's dtype), bfloat16, int8 or "
                                         "fp8 (= fp8_e4m3; or fp8_e5m2; accelerators only), the 8-bit forms with "
                                         "a float32 scale per token and KV head, about 1/4 of float32's bytes: "
                                         "more pages in the same memory",
                                 group=_ENGINE, choices=KV_CACHE_DTYPES,
                                 foreign_env=(OLLAMA_KV_CACHE_TYPE, ollama_kv_cache_type))
    gpu_memory_utilization: float = option(0.9, "share of accelerator memory for weights + KV cache",
                                           group=_ENGINE)
    seed: int = option(0, "engine seed (requests without a seed draw from it)", group=_ENGINE)
    attention_backend: str = option("auto", "attention implementation: auto (the Pallas kernel on GPU, jnp "
                                            "elsewhere), pallas (the kernel; interpreted on CPU) or jnp "
                                            "(the CPU path)", group=_ENGINE, choices=ATTENTION_BACKENDS)
    structured_outputs_timeout: float = option(5.0, "seconds a structured-output constraint (JSON schema, "
                                                    "regex, grammar) may take to compile; a slower one is "
                                                    "refused (400)", group=_ENGINE, minimum=0,
                                               exclusive_minimum=True)
    enable_lora: bool = option(False, "serve PEFT LoRA adapters: each request may name one, rows with different "
                                      "adapters (and none) share a step", group=_LORA)
    max_loras: int = option(1, "adapters resident on the device at once (one step runs at most this many); "
                               "more may be registered, and wait for a free slot", group=_LORA, minimum=1)
    max_lora_rank: int = option(16, "largest adapter rank; every adapter is padded to it, a larger one is "
                                    "refused", group=_LORA, minimum=1)
    speculative_model: str | None = option(None, f"draft proposals: {NGRAM!r} (n-gram prompt lookup) or a draft "
                                                 "model of the target's vocabulary (a path or name as --model "
                                                 "takes; greedy drafts, in --dtype), verified in one step of the "
                                                 "target: greedy output unchanged, sampled output distributed "
                                                 "as without",
                                           group=_SPEC)
    num_speculative_tokens: int | None = option(None, "draft tokens proposed per step (required with "
                                                      "--speculative-model)", group=_SPEC, minimum=1)
    ngram_prompt_lookup_max: int | None = option(None, "longest n-gram looked up in the prompt and output "
                                                       "(required with [ngram])", group=_SPEC, minimum=1)
    ngram_prompt_lookup_min: int | None = option(None, "shortest n-gram looked up (default with [ngram]: 1)",
                                                 group=_SPEC, minimum=1)
    compilation_cache_dir: str | None = option(None, "persistent XLA compilation cache (default: "
                                                     "$JAXSERVE_CACHE_ROOT/xla, i.e. ~/.cache/jaxserve/xla)",
                                               group=_COMPILE)
    warmup: bool = option(True, "compile every step graph at start-up, so nothing compiles while serving",
                          group=_COMPILE)
    tensor_parallel_size: int = option(1, "devices one model is split over (Megatron-style)", group=_PARALLEL,
                                       minimum=1)
    data_parallel_size: int = option(1, "model replicas serving side by side", group=_PARALLEL, minimum=1)
    distributed: bool = option(False, "join a multi-process run (jax.distributed.initialize) first",
                               group=_PARALLEL)
    coordinator_address: str | None = option(None, "host:port of process 0 with --distributed", group=_PARALLEL)
    num_processes: int | None = option(None, "processes in a --distributed run", group=_PARALLEL, minimum=1)
    process_id: int | None = option(None, "this process's index in a --distributed run", group=_PARALLEL,
                                    minimum=0)
    profiler_dir: str | None = option(None, "where JAX profiler traces go (LLM.start_profile; enables the "
                                            "server's POST /start_profile and /stop_profile)", group=_PROFILE)
    log_compiles: bool = option(False, "log every XLA compilation", group=_PROFILE)

    def __post_init__(self):
        for opt in ENGINE_OPTIONS:
            value = getattr(self, opt.name)
            if value is not None and not _is_kind(value, opt.kind):
                raise ValueError(f"{opt.name} must be {_KIND_NAMES[opt.kind]}, got {value!r}")
            opt.check(value, "engine argument")
        # The component configs check their own fields (block size a power of two, the budget
        # covering max_num_seqs, ...): build them once now so bad values fail before any loading.
        self.cache_config(), self.compile_config(), self.parallel_config()
        self.scheduler_config(self.max_model_len or max(1, self.max_num_batched_tokens))
        self.speculative_config()

    # ---- the component configs, each with the fields it uses ----------------------------------

    def cache_config(self):
        from jaxserve.config import CacheConfig
        return CacheConfig(block_size=self.block_size, kv_cache_memory=self.kv_cache_memory,
                           kv_cache_dtype=self.kv_cache_dtype, gpu_memory_utilization=self.gpu_memory_utilization,
                           enable_prefix_caching=self.enable_prefix_caching)

    def scheduler_config(self, max_model_len: int):
        from jaxserve.config import SchedulerConfig
        return SchedulerConfig(max_model_len=max_model_len, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens)

    def compile_config(self):
        from jaxserve.config import CompileConfig
        return CompileConfig(compilation_cache_dir=self.compilation_cache_dir, warmup=self.warmup)

    def lora_config(self):
        """The adapter slots' shape, or None when LoRA is off."""
        from jaxserve.lora import LoRAConfig
        return LoRAConfig(max_loras=self.max_loras, max_lora_rank=self.max_lora_rank) if self.enable_lora else None

    def speculative_config(self):
        """What proposes draft tokens and how many, or None when speculation is off."""
        from jaxserve.config import SpeculativeConfig
        if self.speculative_model is None:
            given = [f"--{name.replace('_', '-')}" for name in ("num_speculative_tokens", "ngram_prompt_lookup_max",
                                                                  "ngram_prompt_lookup_min") if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} given without --speculative-model "
                                 f"(use --speculative-model {NGRAM!r} or a draft model's path)")
            return None
        if self.num_speculative_tokens is None:
            raise ValueError(f"--speculative-model {self.speculative_model!r} needs --num-speculative-tokens")
        ngram = self.speculative_model == NGRAM
        if not ngram and (self.ngram_prompt_lookup_max or self.ngram_prompt_lookup_min):
            raise ValueError(f"--ngram-prompt-lookup-max/min apply to --speculative-model {NGRAM!r} only, "
                             f"not to the draft model {self.speculative_model!r}")
        if ngram and self.ngram_prompt_lookup_max is None:
            raise ValueError(f"--speculative-model {NGRAM!r} needs --ngram-prompt-lookup-max (>= 1)")
        return SpeculativeConfig(
            draft_model=None if ngram else self.speculative_model,
            num_speculative_tokens=self.num_speculative_tokens,
            ngram_max=self.ngram_prompt_lookup_max if ngram else 0,
            ngram_min=(self.ngram_prompt_lookup_min or 1) if ngram else 0)

    def parallel_config(self):
        from jaxserve.parallel import ParallelConfig
        return ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                              data_parallel_size=self.data_parallel_size)

    # ---- building from outside sources ---------------------------------------------------------

    @classmethod
    def resolve(cls, explicit: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] = os.environ,
                config: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None) -> "EngineArgs":
        """Keyword/flag values > environment > config file > `defaults` (a command's own) > the table."""
        values = resolve_options(ENGINE_OPTIONS, explicit or {}, environ=environ, config=config or {},
                                 defaults=defaults or {})
        return cls(**values)


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


ENGINE_OPTIONS: list[Option] = options_of(EngineArgs)


def resolve_options(table: list[Option], explicit: Mapping[str, Any], *, environ: Mapping[str, str],
                    config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The value of every option in `table`, by field name, from the highest-precedence source that
    sets it: `explicit` (flags, keywords) > `environ` > `config` (already keyed by field name) >
    another program's variable in `environ` (an option's foreign_env) > `defaults` > the table.
    Keys of `explicit`/`config` not in the table are left to the caller."""
    values = {}
    for opt in table:
        if opt.name in explicit:
            value, source = explicit[opt.name], f"{opt.flag}"
        elif environ.get(opt.env):
            value, source = environ[opt.env], f"environment {opt.env}"
        elif opt.name in config:
            value, source = config[opt.name], "--config"
        elif opt.foreign_env and environ.get(opt.foreign_env):
            value, source = opt.foreign_value(environ[opt.foreign_env]), f"environment {opt.foreign_env}"
        elif opt.name in defaults:
            value, source = defaults[opt.name], "default"
        else:
            values[opt.name] = opt.default
            continue
        value = opt.coerce(value, source)
        opt.check(value, source)
        values[opt.name] = value
    return values


def read_config_file(path: str, known: set[str]) -> dict[str, Any]:
    """A YAML file of option names (dashes or underscores) to values, keyed by field name; unknown
    keys are refused by name."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read --config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown key {key!r}")
        out[name] = value
    return out


# ---- argparse ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, table: list[Option],
                  defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per option, grouped as the table says. Flags default to SUPPRESS, so the parsed
    namespace holds only what was typed and `resolve_options` can apply the other sources."""
    defaults = defaults or {}
    groups: dict[str, Any] = {}
    for opt in table:
        g = groups.get(opt.group)
        if g is None:
            g = groups[opt.group] = parser.add_argument_group(opt.group)
        default = defaults.get(opt.name, opt.default)
        if isinstance(default, tuple):
            default = " ".join(default)
        shown = opt.help + (f" (default: {default})" if default not in (None, False, "") else "")
        shown += f" [env {opt.env}" + (f", or {opt.foreign_env}" if opt.foreign_env else "") + "]"
        if opt.kind is bool:
            g.add_argument(opt.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           dest=opt.name, help=shown)
        elif opt.kind is tuple:
            g.add_argument(opt.flag, nargs="+", default=argparse.SUPPRESS, dest=opt.name, help=shown)
        else:
            g.add_argument(opt.flag, type=opt.kind, default=argparse.SUPPRESS, dest=opt.name,
                           choices=opt.choices, help=shown)


def signature(table: list[Option], first: str = "self") -> inspect.Signature:
    """A keyword signature over the table (for ``LLM.__init__``: help() and notebooks show every option)."""
    params = [inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params.append(inspect.Parameter(table[0].name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=table[0].default))
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in table[1:]]
    return inspect.Signature(params)
