"""The ``jaxserve`` command line.

``jaxserve serve [MODEL]`` runs the OpenAI- and Ollama-compatible HTTP server (flags named as
vLLM's; flag > JAXSERVE_* environment > ``--config`` YAML > default). ``jaxserve run [MODEL]
[PROMPT]`` chats in the terminal as ``ollama run``; ``jaxserve generate "prompt"`` streams one
completion.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Serve options: name -> (group, type, default, help). One table drives argparse, the YAML
# config and the environment, so the three cannot drift apart.
_SERVE_OPTIONS = {
    "host": ("server", str, "127.0.0.1", "address to bind (env JAXSERVE_HOST)"),
    "port": ("server", int, 8000, "port to bind (env JAXSERVE_PORT)"),
    "api-key": ("server", str, None, "require 'Authorization: Bearer KEY' on every route but /health "
                                     "(env JAXSERVE_API_KEY)"),
    "served-model-name": ("server", list, None, "name(s) clients use as 'model' (default: MODEL, or "
                                                "'smollm2' for the bundled model)"),
    "chat-template": ("server", str, None, "Jinja chat template, as a file path or the template text"),
    "response-role": ("server", str, "assistant", "role of generated chat messages"),
    "allowed-origins": ("server", list, ["*"], "CORS origins allowed to call the API"),
    "ssl-keyfile": ("server", str, None, "TLS private key file (with --ssl-certfile: serve HTTPS)"),
    "ssl-certfile": ("server", str, None, "TLS certificate file"),
    "max-queue": ("server", int, 512, "sequences allowed to wait beyond --max-num-seqs; more get 503"),
    "max-log-len": ("logging", int, None, "characters of the prompt shown in request logs (default: all)"),
    "disable-log-requests": ("logging", bool, False, "no log line per request"),
    "log-level": ("logging", str, "info", "debug | info | warning | error | critical "
                                          "(env JAXSERVE_LOGGING_LEVEL)"),
    "dtype": ("model and engine", str, "auto", "auto | float32 | bfloat16 | float16"),
    "max-model-len": ("model and engine", int, None, "longest prompt + output (default: the model's)"),
    "max-num-seqs": ("model and engine", int, 64, "sequences per engine step"),
    "max-num-batched-tokens": ("model and engine", int, 512, "tokens per engine step (chunked prefill budget)"),
    "block-size": ("model and engine", int, 16, "tokens per KV cache page"),
    "enable-prefix-caching": ("model and engine", bool, True, "share KV pages of identical prompt prefixes"),
    "kv-cache-memory": ("model and engine", int, None, "bytes for the KV cache (default: fits --max-num-seqs "
                                                       "full-length requests on CPU, at most 1 GiB)"),
    "gpu-memory-utilization": ("model and engine", float, 0.9, "share of accelerator memory for weights + KV"),
    "seed": ("model and engine", int, 0, "engine seed (requests without a seed draw from it)"),
    "tensor-parallel-size": ("parallelism", int, 1, "devices one model is split over (Megatron-style)"),
    "data-parallel-size": ("parallelism", int, 1, "model replicas serving side by side"),
    "distributed": ("parallelism", bool, False, "join a multi-process run (jax.distributed.initialize) first"),
    "coordinator-address": ("parallelism", str, None, "host:port of process 0 with --distributed "
                                                      "(env JAXSERVE_COORDINATOR_ADDRESS)"),
    "num-processes": ("parallelism", int, None, "processes in the run (env JAXSERVE_NUM_PROCESSES)"),
    "process-id": ("parallelism", int, None, "this process's index (env JAXSERVE_PROCESS_ID)"),
    "profiler-dir": ("profiling", str, None, "enables POST /start_profile and /stop_profile, which write JAX "
                                             "traces here (env JAXSERVE_PROFILER_DIR)"),
    "log-compiles": ("profiling", bool, False, "log every XLA compilation"),
}
_ENV = {"JAXSERVE_HOST": "host", "JAXSERVE_PORT": "port", "JAXSERVE_API_KEY": "api-key",
        "JAXSERVE_LOGGING_LEVEL": "log-level", "JAXSERVE_PROFILER_DIR": "profiler-dir",
        "JAXSERVE_COORDINATOR_ADDRESS": "coordinator-address", "JAXSERVE_NUM_PROCESSES": "num-processes",
        "JAXSERVE_PROCESS_ID": "process-id"}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="HF folder, .gguf file or 'smollm2' (default: bundled SmolLM2)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="devices one model is split over")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run first (every process given the same prompt)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0 (env JAXSERVE_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, help="env JAXSERVE_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=None, help="env JAXSERVE_PROCESS_ID")


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                   help="HF folder, .gguf file or 'smollm2' (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file whose keys are flag names (e.g. max-num-seqs: 32)")
    groups = {}
    for name, (group, kind, default, help_text) in _SERVE_OPTIONS.items():
        g = groups.setdefault(group, p.add_argument_group(group))
        shown = f"{help_text} (default: {default})" if default not in (None, False) else help_text
        if kind is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            g.add_argument(f"--{name}", action=action, default=argparse.SUPPRESS, help=shown)
        elif kind is list:
            g.add_argument(f"--{name}", nargs="+", default=argparse.SUPPRESS, help=shown)
        else:
            g.add_argument(f"--{name}", type=kind, default=argparse.SUPPRESS, help=shown)


def _coerce(name: str, value, source: str):
    kind = _SERVE_OPTIONS[name][1]
    if value is None:
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if kind is list:
            return [str(v) for v in value] if isinstance(value, list) else [str(value)]
        if kind is int and (isinstance(value, bool) or isinstance(value, float)):
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None


def resolve_serve_options(args: argparse.Namespace, environ=os.environ) -> dict:
    """Flag > environment > config file > default, keyed by flag name (plus "model")."""
    resolved = {name: spec[2] for name, spec in _SERVE_OPTIONS.items()}
    resolved["model"] = None
    if args.config:
        import yaml
        try:
            with open(args.config) as f:
                data = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"cannot read --config {args.config}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {args.config} must hold a mapping of flag names to values")
        for key, value in data.items():
            name = str(key).replace("_", "-")
            if name == "model":
                resolved["model"] = None if value is None else str(value)
            elif name in _SERVE_OPTIONS:
                resolved[name] = _coerce(name, value, f"--config {args.config}")
            else:
                raise ValueError(f"--config {args.config}: unknown key {key!r}")
    for var, name in _ENV.items():
        if environ.get(var):
            resolved[name] = _coerce(name, environ[var], f"environment {var}")
    for dest, value in vars(args).items():
        name = dest.replace("_", "-")
        if name in _SERVE_OPTIONS or name == "model":
            resolved[name] = value
    return resolved


def _load_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" not in value:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise OSError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def _serve(args: argparse.Namespace) -> int:
    import logging

    from jaxserve.server.config import ServerConfig

    o = resolve_serve_options(args)
    names = tuple(o["served-model-name"] or [o["model"] or "smollm2"])
    config = ServerConfig(
        served_model_names=names, host=o["host"], port=o["port"], api_key=o["api-key"],
        chat_template=_load_chat_template(o["chat-template"]), response_role=o["response-role"],
        allowed_origins=tuple(o["allowed-origins"]), ssl_keyfile=o["ssl-keyfile"], ssl_certfile=o["ssl-certfile"],
        max_log_len=o["max-log-len"], log_requests=not o["disable-log-requests"], log_level=o["log-level"].lower(),
        max_queue=o["max-queue"])
    # Our own handler on "jaxserve" (not the root logger): Sanic already prints its own lines.
    log = logging.getLogger("jaxserve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(config.log_level.upper())
    log.propagate = False

    import jax

    from jaxserve.async_engine import AsyncEngine
    from jaxserve.llm import LLM
    from jaxserve.server.app import create_app
    from jaxserve.server.model_card import ModelCard

    if o["distributed"]:
        _join_distributed(o["coordinator-address"], o["num-processes"], o["process-id"])
        if jax.process_count() > 1 and not o["coordinator-address"]:
            raise ValueError("serving from several processes needs --coordinator-address (or "
                             "JAXSERVE_COORDINATOR_ADDRESS): process 0 mirrors the requests next to it")
    leader = jax.process_index() == 0
    if leader:
        _check_port_free(config.host, config.port)  # before minutes of loading and compiling, not after
    started = time.monotonic()
    llm = LLM(model=o["model"], dtype=o["dtype"], max_model_len=o["max-model-len"], max_num_seqs=o["max-num-seqs"],
              max_num_batched_tokens=o["max-num-batched-tokens"], block_size=o["block-size"],
              enable_prefix_caching=o["enable-prefix-caching"], kv_cache_memory=o["kv-cache-memory"],
              gpu_memory_utilization=o["gpu-memory-utilization"], seed=o["seed"],
              tensor_parallel_size=o["tensor-parallel-size"], data_parallel_size=o["data-parallel-size"],
              profiler_dir=o["profiler-dir"], log_compiles=o["log-compiles"])
    loaded, engine = llm.loaded, llm.engine
    from jaxserve.multihost import MirroredEngine, follow, mirror_address

    if jax.process_count() > 1:
        # HTTP reaches process 0 only; the others replay its engine calls (jaxserve/multihost.py).
        address = mirror_address(o["coordinator-address"])
        if not leader:
            log.info("process %d of %d: following process 0", jax.process_index(), jax.process_count())
            follow(engine, address)
            return 0
        engine = MirroredEngine(engine, address, jax.process_count() - 1)
    leaves = jax.tree_util.tree_leaves(loaded.params)
    tok = loaded.tokenizer
    card = ModelCard.build(names, source=loaded.source, model_config=loaded.config,
                           num_params=sum(int(x.size) for x in leaves), dtype_name=str(leaves[0].dtype),
                           max_model_len=engine.max_model_len, chat_template=config.chat_template or tok.chat_template,
                           stop=tuple(tok.decode([t]) for t in loaded.config.eos_token_ids))
    async_engine = AsyncEngine(engine, max_queue=config.max_queue)
    app = create_app(async_engine, card, config)
    log.info("model %s loaded and compiled in %.1f s; serving as %s on %s://%s:%d", loaded.source,
             time.monotonic() - started, ", ".join(names), "https" if config.ssl_certfile else "http",
             config.host, config.port)
    ssl = {"cert": config.ssl_certfile, "key": config.ssl_keyfile} if config.ssl_certfile else None
    try:
        app.run(host=config.host, port=config.port, single_process=True, access_log=False, motd=False, ssl=ssl,
                debug=False)
    finally:
        if isinstance(engine, MirroredEngine):
            # The followers' EOF lets them exit too: JAX's exit barrier waits for every process.
            engine.close()
    return 0


def _join_distributed(coordinator_address, num_processes, process_id) -> None:
    from jaxserve.parallel import initialize_distributed

    initialize_distributed(coordinator_address, num_processes, process_id)


# ---- jaxserve run --------------------------------------------------------------------------------

def _looks_like_model(arg: str) -> bool:
    return arg == "smollm2" or os.path.exists(os.path.expanduser(arg))


def _print_stats(stats: dict) -> None:
    def dur(seconds):
        return f"{seconds * 1e3:.2f}ms" if seconds < 1 else f"{seconds:.3f}s"

    def rate(count, seconds):
        return f"{count / seconds:.2f} tokens/s" if seconds > 0 else "n/a"

    lines = [("total duration", dur(stats["total"])), ("load duration", dur(stats["load"])),
             ("prompt eval count", f"{stats['prompt_count']} token(s)"),
             ("prompt eval duration", dur(stats["prompt_seconds"])),
             ("prompt eval rate", rate(stats["prompt_count"], stats["prompt_seconds"])),
             ("eval count", f"{stats['eval_count']} token(s)"), ("eval duration", dur(stats["eval_seconds"])),
             ("eval rate", rate(stats["eval_count"], stats["eval_seconds"]))]
    for label, value in lines:
        sys.stderr.write(f"{label + ':':<22}{value}\n")
    sys.stderr.flush()


def _answer(llm, messages: list[dict], params, load_seconds: float, verbose: bool) -> str:
    """Stream one assistant answer to stdout; Ctrl-C stops it early."""
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    engine = llm.engine
    start = time.monotonic()
    engine.add_request("run", ids, params, prompt_text=text)
    printed, answer, first, num_out = 0, "", None, 0
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                answer, num_out = out.outputs[0].text, len(out.outputs[0].token_ids)
                first = first or time.monotonic()
                sys.stdout.write(answer[printed:])
                sys.stdout.flush()
                printed = len(answer)
    except KeyboardInterrupt:
        engine.abort_request("run")
    end = time.monotonic()
    sys.stdout.write("\n")
    if verbose:
        first = first or end
        _print_stats(dict(total=end - start + load_seconds, load=load_seconds, prompt_count=len(ids),
                          prompt_seconds=first - start, eval_count=num_out, eval_seconds=end - first))
    return answer


def _run(args: argparse.Namespace) -> int:
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    words = list(args.words)
    model = words.pop(0) if words and _looks_like_model(words[0]) else None
    prompt = " ".join(words) if words else None
    started = time.monotonic()
    llm = LLM(model=model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=1,
              max_num_batched_tokens=128, seed=args.seed)
    load_seconds = time.monotonic() - started
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sample_seed)
    if prompt is not None:
        _answer(llm, [{"role": "user", "content": prompt}], params, load_seconds, args.verbose)
        return 0
    history: list[dict] = []
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return 0
        if line.strip() in ("/bye", "/exit"):
            return 0
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": _answer(llm, history, params, load_seconds, args.verbose)})
        load_seconds = 0.0


# ---- jaxserve generate ---------------------------------------------------------------------------

def _generate(args: argparse.Namespace) -> int:
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    if args.distributed:  # every process runs this same prompt: the steps stay in lockstep
        _join_distributed(args.coordinator_address, args.num_processes, args.process_id)
    # One sequence streams: a small engine compiles few graphs.
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=1,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              enable_prefix_caching=args.enable_prefix_caching, kv_cache_memory=args.kv_cache_memory,
              seed=args.seed, tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)
    engine = llm.engine
    if args.chat:
        tok = llm.get_tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        engine.add_request("cli", tok(text, add_special_tokens=False).input_ids, params, prompt_text=text)
    else:
        engine.add_request("cli", args.prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference and serving on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI- and Ollama-compatible HTTP API",
                           epilog="Environment: JAXSERVE_HOST, JAXSERVE_PORT, JAXSERVE_API_KEY, "
                                  "JAXSERVE_LOGGING_LEVEL, JAXSERVE_PROFILER_DIR, JAXSERVE_COORDINATOR_ADDRESS, "
                                  "JAXSERVE_NUM_PROCESSES, JAXSERVE_PROCESS_ID, JAXSERVE_CACHE_ROOT (compilation "
                                  "cache, default ~/.cache/jaxserve). Precedence: flag > environment > --config "
                                  "> default.")
    _add_serve_args(serve)

    run = sub.add_parser("run", help="chat with a model in the terminal, as `ollama run`",
                         description="With PROMPT: print the answer and exit. Without: an interactive "
                                     "multi-turn chat (/bye exits).")
    run.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                     help="an optional model (path or 'smollm2'), then the prompt")
    run.add_argument("--verbose", action="store_true", help="print token counts, durations and rates")
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--max-tokens", type=int, default=None, help="default: up to the context length")
    run.add_argument("--sample-seed", type=int, default=None)
    run.add_argument("--dtype", default="auto")
    run.add_argument("--max-model-len", type=int, default=None)
    run.add_argument("--seed", type=int, default=0)

    gen = sub.add_parser("generate", help="stream a completion of PROMPT to the terminal")
    gen.add_argument("prompt")
    _add_engine_args(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--sample-seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    # One stream needs no big prefill steps: fewer buckets to compile at start.
    gen.set_defaults(max_num_batched_tokens=128)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"serve": _serve, "run": _run, "generate": _generate}
    try:
        return commands[args.command](args)
    except (ValueError, OSError) as e:  # bad flags or files, a port in use: no traceback
        parser.exit(2, f"jaxserve: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
