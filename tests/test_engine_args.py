"""One engine-argument table (jaxserve/engine_args.py) drives `serve`, `generate` and `run`, the YAML
keys, the JAXSERVE_* variables and LLM's signature; dtype="auto" follows the CPU's bf16 support."""
from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys

import pytest

from jaxserve.cli import SERVE_OPTIONS, build_parser, engine_args_from, resolve_options_for
from jaxserve.engine_args import ATTENTION_BACKENDS, ENGINE_OPTIONS, EngineArgs
from jaxserve.llm import LLM
from jaxserve.precision import auto_dtype

JAXSERVE = os.path.join(os.path.dirname(sys.executable), "jaxserve")
COMMANDS = {"serve": [], "generate": ["a prompt"], "run": []}
ENGINE_NAMES = {o.name for o in ENGINE_OPTIONS}


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _engine_flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    return {a.dest: tuple(a.option_strings) for a in parser._actions if a.dest in ENGINE_NAMES and a.option_strings}


def _resolve(command: str, argv=(), env=None):
    return resolve_options_for(build_parser().parse_args([command, *COMMANDS[command], *argv]), environ=env or {})


def test_the_three_commands_have_the_same_engine_flags_from_the_table():
    flags = {command: _engine_flags(_subparser(command)) for command in COMMANDS}
    assert flags["serve"] == flags["generate"] == flags["run"]
    assert set(flags["serve"]) == ENGINE_NAMES
    for opt in ENGINE_OPTIONS:
        want = (opt.flag, "--no-" + opt.flag[2:]) if opt.kind is bool else (opt.flag,)
        assert flags["serve"][opt.name] == want
    # generate and run stream one sequence: the only defaults they change, shown in their --help
    for command, overrides in (("serve", {}), ("generate", {"max_num_seqs": 1, "max_num_batched_tokens": 128}),
                               ("run", {"max_num_seqs": 1, "max_num_batched_tokens": 128})):
        values = _resolve(command)
        assert {n: values[n] for n in ENGINE_NAMES} == {o.name: overrides.get(o.name, o.default)
                                                        for o in ENGINE_OPTIONS}


def test_help_of_each_command_lists_every_engine_option():
    for command in COMMANDS:
        done = subprocess.run([JAXSERVE, command, "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        for opt in ENGINE_OPTIONS:
            assert opt.flag in done.stdout and opt.env in done.stdout, (command, opt.flag)


def test_llm_signature_is_the_table():
    params = list(inspect.signature(LLM).parameters.values())
    assert [p.name for p in params] == [o.name for o in ENGINE_OPTIONS]
    assert all(p.default == o.default for p, o in zip(params, ENGINE_OPTIONS))
    with pytest.raises(TypeError, match="max_num_seq\\b"):
        LLM(max_num_seq=4)


def _distinct_value(opt):
    """A valid value for each option that differs from its default."""
    special = {"dtype": "bfloat16", "block_size": 8, "attention_backend": "pallas", "gpu_memory_utilization": 0.5,
               "max_num_batched_tokens": 256, "process_id": 1, "runner": "pooling", "pooling_type": "mean",
               "speculative_model": "[ngram]", "kv_cache_dtype": "int8"}
    if opt.name in special:
        return special[opt.name]
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    return {bool: not opt.default, int: 7, float: 0.5, str: f"/tmp/{opt.name}"}[opt.kind]


def test_every_engine_option_reads_from_yaml_and_environment_with_flag_precedence(tmp_path):
    distinct = {o.name: _distinct_value(o) for o in ENGINE_OPTIONS}
    config = tmp_path / "engine.yaml"
    # YAML keys may be written with dashes or underscores.
    # Strings quoted: YAML reads a bare [ngram] as a list.
    config.write_text("".join(f"{n.replace('_', '-') if i % 2 else n}: "
                              f"{str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else v}\n"
                              for i, (n, v) in enumerate(distinct.items())))
    env = {o.env: (str(distinct[o.name]).lower() if o.kind is bool else str(distinct[o.name]))
           for o in ENGINE_OPTIONS}
    for command in COMMANDS:
        from_file = _resolve(command, ["--config", str(config)])
        assert {n: from_file[n] for n in ENGINE_NAMES} == distinct, command
        from_env = _resolve(command, [], env)
        assert {n: from_env[n] for n in ENGINE_NAMES} == distinct, command
        # flag > environment > file
        both = _resolve(command, ["--config", str(config), "--max-num-seqs", "3", "--no-warmup"],
                        {**env, "JAXSERVE_MAX_NUM_SEQS": "5"})
        assert both["max_num_seqs"] == 3 and both["warmup"] is False and both["block_size"] == 8
        only_file = _resolve(command, ["--config", str(config)], {"JAXSERVE_SEED": "11"})
        assert only_file["seed"] == 11 and only_file["dtype"] == "bfloat16"
    # The resolved values are exactly EngineArgs, which LLM(**...) also accepts.
    args = engine_args_from({**_resolve("serve", ["--config", str(config)]), "distributed": False})
    assert isinstance(args, EngineArgs) and args.attention_backend == "pallas"


def test_llm_keywords_beat_the_environment(monkeypatch):
    monkeypatch.setenv("JAXSERVE_MAX_NUM_SEQS", "3")
    monkeypatch.setenv("JAXSERVE_BLOCK_SIZE", "8")
    args = EngineArgs.resolve({"max_num_seqs": 2}, environ=os.environ)
    assert (args.max_num_seqs, args.block_size, args.max_num_batched_tokens) == (2, 8, 512)


@pytest.mark.parametrize("source, message", [
    (dict(argv=["--block-size", "12"]), "block_size must be a power of two"),
    (dict(env={"JAXSERVE_MAX_NUM_SEQS": "many"}), "JAXSERVE_MAX_NUM_SEQS: max-num-seqs must be an integer"),
    (dict(env={"JAXSERVE_ENABLE_PREFIX_CACHING": "maybe"}), "enable-prefix-caching must be true or false"),
    (dict(argv=["--max-num-seqs", "0"]), "max-num-seqs must be >= 1"),
    (dict(env={"JAXSERVE_ATTENTION_BACKEND": "cuda"}), "attention-backend must be one of auto, pallas, jnp"),
    (dict(env={"JAXSERVE_RUNNER": "embed"}), "runner must be one of auto, generate, pooling"),
    (dict(env={"JAXSERVE_POOLING_TYPE": "max"}), "pooling-type must be one of auto, last, mean, cls"),
    (dict(argv=["--max-num-seqs", "64", "--max-num-batched-tokens", "32"]), "max_num_batched_tokens must be"),
    (dict(argv=["--structured-outputs-timeout", "0"]), "--structured-outputs-timeout: structured-outputs-timeout "
                                                       "must be > 0, got 0.0"),
    (dict(env={"JAXSERVE_STRUCTURED_OUTPUTS_TIMEOUT": "-1"}), "structured-outputs-timeout must be > 0"),
    (dict(env={"JAXSERVE_STRUCTURED_OUTPUTS_TIMEOUT": "soon"}), "structured-outputs-timeout must be a number"),
    (dict(env={"JAXSERVE_KV_CACHE_DTYPE": "int4"}), "environment JAXSERVE_KV_CACHE_DTYPE: kv-cache-dtype must be one "
                                                    "of auto, bfloat16, fp8, fp8_e4m3, fp8_e5m2, int8, got 'int4'"),
    (dict(env={"OLLAMA_KV_CACHE_TYPE": "q4_0"}), "OLLAMA_KV_CACHE_TYPE: q4_0 .* is not supported; use q8_0"),
    (dict(env={"OLLAMA_KV_CACHE_TYPE": "q5_1"}), "OLLAMA_KV_CACHE_TYPE must be one of f16, q8_0, q4_0, got 'q5_1'"),
])
def test_bad_engine_values_name_the_option_and_where_it_came_from(source, message):
    with pytest.raises(ValueError, match=message):
        engine_args_from(_resolve("serve", source.get("argv", []), source.get("env")))


def test_kv_cache_dtype_flag_jaxserve_env_config_then_ollama_env(tmp_path):
    """--kv-cache-dtype > JAXSERVE_KV_CACHE_DTYPE > --config > OLLAMA_KV_CACHE_TYPE > auto, in every command;
    Ollama's names: f16 (its unquantized default) is the 16-bit cache, q8_0 is int8."""
    config = tmp_path / "c.yaml"
    config.write_text("kv-cache-dtype: fp8\n")
    for command in COMMANDS:
        assert _resolve(command)["kv_cache_dtype"] == "auto"
        assert _resolve(command, [], {"OLLAMA_KV_CACHE_TYPE": "q8_0"})["kv_cache_dtype"] == "int8"
        assert _resolve(command, [], {"OLLAMA_KV_CACHE_TYPE": "f16"})["kv_cache_dtype"] == "bfloat16"
        assert _resolve(command, ["--config", str(config)], {"OLLAMA_KV_CACHE_TYPE": "q8_0"})["kv_cache_dtype"] == "fp8"
        env = {"OLLAMA_KV_CACHE_TYPE": "q4_0", "JAXSERVE_KV_CACHE_DTYPE": "bfloat16"}  # q4_0 unread: no refusal
        assert _resolve(command, ["--config", str(config)], env)["kv_cache_dtype"] == "bfloat16"
        assert _resolve(command, ["--kv-cache-dtype", "int8"], env)["kv_cache_dtype"] == "int8"
    with pytest.raises(SystemExit):  # argparse names the choices
        _resolve("serve", ["--kv-cache-dtype", "q8_0"])
    assert EngineArgs.resolve({}, environ={"OLLAMA_KV_CACHE_TYPE": "Q8_0"}).kv_cache_dtype == "int8"
    assert EngineArgs.resolve({"kv_cache_dtype": "auto"}, environ={"OLLAMA_KV_CACHE_TYPE": "q8_0"}).kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="engine argument: kv-cache-dtype must be one of .*, got 'q8_0'"):
        EngineArgs(kv_cache_dtype="q8_0")


def test_kv_cache_dtypes_match_the_storage_module():
    from jaxserve.engine_args import KV_CACHE_DTYPES
    from jaxserve.kv_cache_dtype import kv_cache_dtype

    for name in KV_CACHE_DTYPES:  # each one names a storage form (fp8 on an accelerator: targeting)
        from jaxserve.precision import targeting
        with targeting("cuda"):
            assert kv_cache_dtype(name, "float32").name != ""
    with pytest.raises(ValueError, match="kv_cache_dtype fp8_e4m3 runs on accelerators only.*use int8 on CPU"):
        kv_cache_dtype("fp8", "float32")


def test_structured_outputs_timeout_is_an_engine_argument():
    assert _resolve("serve")["structured_outputs_timeout"] == 5.0
    for command in COMMANDS:
        assert _resolve(command, ["--structured-outputs-timeout", "0.25"])["structured_outputs_timeout"] == 0.25
    assert EngineArgs(structured_outputs_timeout=2).structured_outputs_timeout == 2
    with pytest.raises(ValueError, match="structured-outputs-timeout must be > 0, got 0"):
        LLM(structured_outputs_timeout=0)  # refused before anything loads


def test_unknown_yaml_key_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max-num-seq: 4\n")
    with pytest.raises(ValueError, match="unknown key 'max-num-seq'"):
        _resolve("generate", ["--config", str(config)])


def test_server_options_are_only_on_serve():
    for command in ("generate", "run"):
        actions = {a.dest for a in _subparser(command)._actions}
        assert not actions & {o.name for o in SERVE_OPTIONS}


def test_attention_backends_match_the_kernels_package():
    from jaxserve.pallas_kernels.backend import BACKENDS
    assert ATTENTION_BACKENDS == BACKENDS


def test_quantization_methods_match_the_models_package():
    from jaxserve.engine_args import QUANTIZATION_METHODS
    from jaxserve.models import quantization
    assert QUANTIZATION_METHODS == quantization.QUANTIZATION_METHODS
    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="int4")


@pytest.mark.parametrize("backend, flags, want", [
    ("cpu", {"avx512f", "avx512_bf16"}, "bfloat16"),
    ("cpu", {"avx512f", "amx_bf16", "amx_tile"}, "bfloat16"),
    ("cpu", {"avx2", "avx512f", "avx512_vnni"}, "float32"),
    ("cpu", set(), "float32"),
    ("gpu", set(), "bfloat16"),
    ("tpu", {"avx2"}, "bfloat16"),
])
def test_auto_dtype_follows_native_bf16_support(backend, flags, want):
    dtype, why = auto_dtype(backend, cpu_flags=lambda: frozenset(flags))
    assert dtype == want and why.startswith("auto:")
    if backend == "cpu" and want == "bfloat16":
        assert any(f in why for f in flags if "bf16" in f)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from jaxserve.precision import read_cpu_flags
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx512f avx512_bf16\n")
    assert read_cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert read_cpu_flags(str(tmp_path / "missing")) == frozenset()
    assert auto_dtype("cpu", cpu_flags=lambda: read_cpu_flags(str(cpuinfo)))[0] == "bfloat16"


def test_generate_logs_the_dtype_it_picked_and_why():
    done = subprocess.run([JAXSERVE, "generate", "Hi", "--max-tokens", "1", "--max-model-len", "512",
                           "--max-num-batched-tokens", "64", "--no-warmup"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAXSERVE_DTYPE": "auto"})
    assert done.returncode == 0, done.stderr[-2000:]
    want, why = auto_dtype()
    assert f"dtype {want} ({why})" in done.stderr
