"""The ``jaxserve`` command line.

``jaxserve serve [MODEL]`` runs the OpenAI- and Ollama-compatible HTTP server (flags named as
vLLM's; flag > JAXSERVE_* environment > ``--config`` YAML > default). ``jaxserve run [MODEL]
[PROMPT]`` chats in the terminal as ``ollama run`` (MODEL: a stored model too); ``jaxserve generate
"prompt"`` streams one completion. ``jaxserve lower --platform cuda [MODEL]`` lowers every step graph
an engine with these flags would compile, for a platform this machine need not have
(jaxserve/lowering.py). ``create``, ``list``, ``show``, ``cp`` and ``rm`` manage the model store
(jaxserve/store_cli.py); ``ps``, ``stop`` and ``pull`` ask a running server (jaxserve/client_cli.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from jaxserve import client_cli, store_cli
from jaxserve.engine_args import (CACHE_ROOT_ENV, ENGINE_OPTIONS, EngineArgs, add_arguments, option, options_of,
                                  read_config_file, resolve_options)

from jaxserve.server.config import LOG_LEVELS, ServerConfig
from jaxserve.server.reasoning import PARSER_NAMES as REASONING_PARSERS
from jaxserve.server.tool_calls import PARSER_NAMES as TOOL_CALL_PARSERS


def _server_default(name: str):
    """ServerConfig's own default, so the two tables cannot disagree."""
    return ServerConfig.__dataclass_fields__[name].default


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The HTTP server's own options (server/config.py's ServerConfig is built from them); the
    engine's are EngineArgs. Declared like EngineArgs, so flags, YAML and environment agree."""
    host: str = option(_server_default("host"), "address to bind", group="server")
    port: int = option(_server_default("port"), "port to bind", group="server", minimum=0)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every route but /health",
                                 group="server")
    served_model_name: tuple[str, ...] | None = option(None, "name(s) clients use as 'model' (default: MODEL, "
                                                             "or 'smollm2' for the bundled model)", group="server")
    chat_template: str | None = option(None, "Jinja chat template, as a file path or the template text",
                                       group="server")
    response_role: str = option(_server_default("response_role"), "role of generated chat messages",
                                group="server")
    tool_call_parser: str | None = option(None, "the model's tool-call format (vLLM's names; default: the one "
                                                "its chat template writes, else hermes)", group="server",
                                          choices=TOOL_CALL_PARSERS)
    enable_auto_tool_choice: bool = option(False, "accepted for vLLM command lines: jaxserve always parses tool "
                                                  "calls of requests that carry tools", group="server")
    reasoning_parser: str | None = option(None, "split the model's <think> text into message.reasoning (/v1) "
                                                "and message.thinking (Ollama)", group="server",
                                          choices=REASONING_PARSERS)
    allowed_origins: tuple[str, ...] = option(_server_default("allowed_origins"),
                                              "CORS: origins whose pages may call the API", group="server")
    allowed_methods: tuple[str, ...] = option(_server_default("allowed_methods"),
                                              "CORS: methods a browser's preflight may ask for", group="server")
    allowed_headers: tuple[str, ...] = option(_server_default("allowed_headers"),
                                              "CORS: request headers a browser's preflight may ask for",
                                              group="server")
    allow_credentials: bool = option(False, "CORS: browsers may send cookies and Authorization cross-origin",
                                     group="server")
    ssl_keyfile: str | None = option(None, "TLS private key file (with --ssl-certfile: serve HTTPS)",
                                     group="server")
    ssl_certfile: str | None = option(None, "TLS certificate file", group="server")
    max_queue: int = option(_server_default("max_queue"), "sequences allowed to wait beyond --max-num-seqs; "
                                                          "more get 503 at once", group="server", minimum=0)
    request_timeout: float = option(_server_default("request_timeout"),
                                    "seconds without data while a request's head or body arrives before the "
                                    "connection gets 408 and is closed; never limits generation", group="server")
    keep_alive_timeout: float = option(_server_default("keep_alive_timeout"),
                                       "seconds an idle keep-alive connection stays open", group="server")
    backlog: int = option(_server_default("backlog"), "connections the kernel queues before the server "
                                                      "accepts them", group="server", minimum=1)
    lora_modules: tuple[str, ...] | None = option(None, "LoRA adapters served by name (with --enable-lora): "
                                                        "name=path, or JSON {\"name\": ..., \"path\": ..., "
                                                        "\"base_model_name\": ...}", group="server")
    allow_runtime_lora_updating: bool = option(False, "enable POST /v1/load_lora_adapter and "
                                                      "/v1/unload_lora_adapter (vLLM's "
                                                      "VLLM_ALLOW_RUNTIME_LORA_UPDATING): clients may then make "
                                                      "the server read adapters from its disk", group="server")
    keep_alive: str = option("5m", "how long a model loaded on demand (a stored model over other weights) stays "
                                   "after its last request, as Ollama's keep_alive: a duration (10m, 1h), "
                                   "seconds, or negative for ever; a request's keep_alive overrides it",
                             group="models", foreign_env=("OLLAMA_KEEP_ALIVE", str))
    max_loaded_models: int = option(3, "models loaded at once, the served one (always loaded) included; the least "
                                       "recently used idle one unloads to make room", group="models", minimum=1,
                                    foreign_env=("OLLAMA_MAX_LOADED_MODELS", int))
    models_memory: int | None = option(None, "bytes of weights and KV cache the loaded models may hold together "
                                             "(default: no limit but --max-loaded-models)", group="models",
                                       minimum=1)
    max_log_len: int | None = option(None, "characters of the prompt shown in request logs (default: all)",
                                     group="logging", minimum=0)
    disable_log_requests: bool = option(False, "no log line per request", group="logging")
    otlp_traces_endpoint: str | None = option(None, "OpenTelemetry: send a span per request to this OTLP/HTTP "
                                                    "collector (http://host:4318/v1/traces)", group="logging")
    log_level: str = option(_server_default("log_level"), "log level", group="logging",
                            env="JAXSERVE_LOGGING_LEVEL", choices=LOG_LEVELS)


SERVE_OPTIONS = options_of(ServeOptions)
# `generate` and `run` stream one sequence: a small engine compiles few graphs and starts fast.
_ONE_STREAM = {"max_num_seqs": 1, "max_num_batched_tokens": 128}
_COMMAND_TABLES = {"serve": (SERVE_OPTIONS + ENGINE_OPTIONS, {}),
                   "generate": (ENGINE_OPTIONS, _ONE_STREAM),
                   "run": (ENGINE_OPTIONS, _ONE_STREAM),
                   "lower": (ENGINE_OPTIONS, {})}


def resolve_options_for(args: argparse.Namespace, environ=os.environ) -> dict:
    """Every option of args.command by field name: flag > environment > --config file > the
    command's default > the table's."""
    table, defaults = _COMMAND_TABLES[args.command]
    names = {o.name for o in table}
    config = read_config_file(args.config, names) if args.config else {}
    explicit = {k: v for k, v in vars(args).items() if k in names}
    return resolve_options(table, explicit, environ=environ, config=config, defaults=defaults)


def engine_args_from(values: dict) -> EngineArgs:
    return EngineArgs(**{o.name: values[o.name] for o in ENGINE_OPTIONS})


def _log_to_stderr(level: str) -> logging.Logger:
    """Our own handler on "jaxserve" (not the root logger: Sanic prints its own lines); a line
    written while an HTTP request is served names it ([xid=<X-Request-ID>])."""
    from jaxserve.server.request_ids import LOG_FORMAT, XidFilter

    log = logging.getLogger("jaxserve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(XidFilter())
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return log


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
    o = resolve_options_for(args)
    engine_args = engine_args_from(o)
    names = tuple(o["served_model_name"] or [engine_args.model or "smollm2"])
    config = ServerConfig(
        served_model_names=names, host=o["host"], port=o["port"], api_key=o["api_key"],
        chat_template=_load_chat_template(o["chat_template"]), response_role=o["response_role"],
        tool_call_parser=o["tool_call_parser"], reasoning_parser=o["reasoning_parser"],
        allowed_origins=tuple(o["allowed_origins"]), allowed_methods=tuple(o["allowed_methods"]),
        allowed_headers=tuple(o["allowed_headers"]), allow_credentials=o["allow_credentials"],
        ssl_keyfile=o["ssl_keyfile"], ssl_certfile=o["ssl_certfile"], otlp_traces_endpoint=o["otlp_traces_endpoint"],
        max_log_len=o["max_log_len"], log_requests=not o["disable_log_requests"], log_level=o["log_level"],
        max_queue=o["max_queue"], request_timeout=o["request_timeout"],
        keep_alive_timeout=o["keep_alive_timeout"], backlog=o["backlog"],
        allow_runtime_lora_updating=o["allow_runtime_lora_updating"])
    from jaxserve.lora import parse_lora_modules

    adapters = parse_lora_modules(o["lora_modules"])  # refused before minutes of loading, not after
    if adapters and not engine_args.enable_lora:
        raise ValueError("--lora-modules needs --enable-lora")
    taken = [a.lora_name for a in adapters if a.lora_name in names]
    if taken:
        raise ValueError(f"--lora-modules: {', '.join(taken)} is already the name of the served model")
    from jaxserve.server.model_pool import parse_keep_alive

    keep_alive = parse_keep_alive(o["keep_alive"])  # refused now, not when the first model unloads
    log = _log_to_stderr(config.log_level)

    import jax

    from jaxserve import host_heap
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.llm import LLM
    from jaxserve.parallel import initialize_distributed
    from jaxserve.server.app import create_app, run_server

    host_heap.keep_freed_blocks()  # before jax.process_index() below starts JAX's backends
    if engine_args.distributed:  # joined first: only process 0 binds the port
        initialize_distributed(engine_args.coordinator_address, engine_args.num_processes, engine_args.process_id)
        if jax.process_count() > 1 and not engine_args.coordinator_address:
            raise ValueError("serving from several processes needs --coordinator-address (or "
                             "JAXSERVE_COORDINATOR_ADDRESS): process 0 mirrors the requests next to it")
    leader = jax.process_index() == 0
    if leader:
        _check_port_free(config.host, config.port)  # before minutes of loading and compiling, not after
    started = time.monotonic()
    llm = LLM.from_engine_args(engine_args)
    loaded, engine = llm.loaded, llm.engine
    for adapter in adapters:  # in every process, before followers start replaying process 0's calls
        engine.add_lora(adapter)
    from jaxserve.multihost import MirroredEngine, follow, mirror_address

    if jax.process_count() > 1:
        # HTTP reaches process 0 only; the others replay its engine calls (jaxserve/multihost.py).
        address = mirror_address(engine_args.coordinator_address)
        if not leader:
            log.info("process %d of %d: following process 0", jax.process_index(), jax.process_count())
            follow(engine, address)
            return 0
        engine = MirroredEngine(engine, address, jax.process_count() - 1)
    card = _model_card(names, llm, engine_args, config.chat_template)
    async_engine = AsyncEngine(engine, max_queue=config.max_queue)
    loader = None if jax.process_count() > 1 else _model_loader(engine_args, config)
    app = create_app(async_engine, card, config, loader=loader, max_loaded_models=o["max_loaded_models"],
                     models_memory=o["models_memory"], keep_alive=keep_alive, engine_bytes=_loaded_bytes(llm))
    if adapters:
        log.info("LoRA adapters: %s", ", ".join(f"{a.lora_name} ({a.lora_path})" for a in adapters))
    frozen = _freeze_startup_heap()
    log.info("model %s loaded and compiled in %.1f s; serving as %s on %s://%s:%d (%d start-up objects frozen "
             "out of garbage collection)", loaded.source, time.monotonic() - started, ", ".join(names),
             "https" if config.ssl_certfile else "http", config.host, config.port, frozen)
    log.info("host heap: %s", host_heap.describe())
    try:
        run_server(app, config)
    finally:
        if isinstance(engine, MirroredEngine):
            # The followers' EOF lets them exit too: JAX's exit barrier waits for every process.
            engine.close()
    return 0


def _freeze_startup_heap() -> int:
    """Put what the server holds at start-up out of the garbage collector's sight -> how many objects.

    The served model's engine, its tokenizer's tables and the compiled graphs' Python side (about
    200k objects with SmolLM2) live as long as the server: the served model is pinned, never
    unloaded. A full collection walked them all, about 110 ms in the middle of an engine step (a
    stall in every stream; seen in benchmarks/host_overhead.py's runs). Objects made later
    (requests, their outputs, models loaded on demand) are collected as before."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _model_card(names, llm, engine_args, chat_template: str | None):
    """What the model-listing routes say about a loaded LLM (server/model_card.py)."""
    import jax

    from jaxserve.models.quantization import QuantizedWeight, weights_dtype
    from jaxserve.server.model_card import ModelCard

    loaded, tok = llm.loaded, llm.loaded.tokenizer
    # An int8 weight counts its values, not its scales (QuantizedWeight.size).
    leaves = jax.tree_util.tree_leaves(loaded.params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    return ModelCard.build(names, source=loaded.source, model_config=loaded.config,
                           num_params=sum(int(x.size) for x in leaves),
                           dtype_name=engine_args.quantization or str(weights_dtype(loaded.params)),
                           max_model_len=llm.engine.max_model_len, chat_template=chat_template or tok.chat_template,
                           stop=tuple(tok.decode([t]) for t in loaded.config.eos_token_ids),
                           capabilities=("embed",) if llm.runner_type == "pooling" else ("generate",))


def _loaded_bytes(llm) -> int:
    """Bytes a loaded LLM holds on its device: weights and KV cache."""
    import jax

    runner = getattr(llm.engine, "runner", None)
    arrays = jax.tree_util.tree_leaves((llm.loaded.params, getattr(runner, "kv_cache", None)))
    return sum(int(getattr(x, "nbytes", 0)) for x in arrays)


def _model_loader(engine_args: EngineArgs, config: ServerConfig):
    """The server's loader of other weights (server/model_pool.py): the served model's engine
    options but the model; its chat template and the names it answers to are its own."""
    def load(source: str):
        import jax

        from jaxserve.async_engine import AsyncEngine
        from jaxserve.llm import LLM
        from jaxserve.server.chat import ChatOutputFormats
        from jaxserve.server.model_pool import LoadedModel, ModelPool

        on_device = jax.devices()[0].platform != "cpu"
        if on_device and engine_args.kv_cache_memory is None:
            # Each engine sizes its KV cache from the device's whole memory: the served one has it.
            raise ValueError("on an accelerator a second model needs --kv-cache-memory (the KV cache bytes of "
                             "every engine), as the served model's engine holds --gpu-memory-utilization of "
                             "the device")
        llm = LLM.from_engine_args(dataclasses.replace(engine_args, model=source))
        card = _model_card((source,), llm, engine_args, None)
        engine = AsyncEngine(llm.engine, max_queue=config.max_queue)
        size = _loaded_bytes(llm)
        formats = ChatOutputFormats.of(dataclasses.replace(config, chat_template=None), card, engine.tokenizer)
        return LoadedModel(ModelPool.key_of(source), engine, card, formats, size=size,
                           device_bytes=size if on_device else 0)
    return load


# ---- jaxserve run --------------------------------------------------------------------------------

def _looks_like_model(arg: str) -> bool:
    return arg == "smollm2" or os.path.exists(os.path.expanduser(arg))


def _stored_model(arg: str):
    """The stored model ``arg`` names (jaxserve/model_store.py), or None."""
    from jaxserve.model_store import InvalidModelName, ModelStore

    store = ModelStore()
    try:
        return store.get(arg) if store.exists(arg) else None
    except InvalidModelName:  # not a model name: the prompt's first word
        return None


@dataclasses.dataclass
class _Chat:
    """What every `run` turn sends besides the conversation."""
    sampling: Callable[[int], object]  # the prompt's token count -> its SamplingParams
    prefix: list[dict] = dataclasses.field(default_factory=list)  # a stored model's system prompt and messages
    template: object = None  # a stored model's GoTemplate; None: the tokenizer's chat template
    lora: object = None  # a stored model's adapter (a LoRARequest)


def _plain_chat(args: argparse.Namespace) -> _Chat:
    from jaxserve.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.8 if args.temperature is None else args.temperature,
                            max_tokens=args.max_tokens, seed=args.sample_seed,
                            structured_outputs=_format_constraint(args.format))
    return _Chat(sampling=lambda num_prompt_tokens: params)


def _stored_chat(args: argparse.Namespace, model, max_model_len: int) -> _Chat:
    """A stored model's defaults, as `ollama run` applies them: its options (Ollama's defaults for the
    rest, as the server's) under the flags given, its system prompt and messages before the chat,
    its template and its adapter."""
    from jaxserve import stored_defaults
    from jaxserve.lora import LoRARequest
    from jaxserve.server.ollama_protocol import parse_options
    from jaxserve.server.validation import RequestError

    _format_constraint(args.format)  # checked now, not at the first answer
    body = {"format": None if not args.format else "json" if args.format == "json" else json.loads(args.format)}
    flags = {"temperature": args.temperature, "num_predict": args.max_tokens, "seed": args.sample_seed}
    body["options"] = stored_defaults.options(model, {k: v for k, v in flags.items() if v is not None})

    def sampling(num_prompt_tokens: int):
        try:
            return parse_options(body, num_prompt_tokens=num_prompt_tokens, max_model_len=max_model_len)
        except RequestError as e:
            raise ValueError(f"{model.name}: {e.message}") from None

    # The conversation never starts with a system message of its own: the model's always leads.
    return _Chat(sampling, stored_defaults.chat_messages(model, []), stored_defaults.template(model),
                 LoRARequest(model.name, 1, model.adapters[0]) if model.adapters else None)


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


def _answer(llm, chat: _Chat, history: list[dict], load_seconds: float, verbose: bool) -> str:
    """Stream one assistant answer to stdout; Ctrl-C stops it early."""
    tok = llm.get_tokenizer()
    messages = chat.prefix + history
    if chat.template is not None:  # Ollama's prompt, tokenized with the special tokens (BOS) as llama.cpp does
        text = chat.template.render(messages)
        ids = tok(text).input_ids
    else:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
    params = chat.sampling(len(ids))
    engine = llm.engine
    start = time.monotonic()
    engine.add_request("run", ids, params, prompt_text=text, lora_request=chat.lora)
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


def _format_constraint(fmt: str | None):
    """`run --format`: "json" (any JSON object) or a JSON schema, as `ollama run --format`."""
    from jaxserve.sampling_params import StructuredOutputsParams

    if not fmt:
        return None
    if fmt == "json":
        return StructuredOutputsParams(json_object=True)
    try:
        schema = json.loads(fmt)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--format must be json or a JSON schema: {e}") from None
    return StructuredOutputsParams(json=schema)


def _generating_llm(engine_args):
    """The LLM of `run` and `generate`, refused when the model only embeds."""
    from jaxserve.llm import LLM

    llm = LLM.from_engine_args(engine_args)
    if llm.runner_type != "generate":
        raise ValueError(f"{llm.loaded.name} runs as a pooling model (it embeds): it cannot generate text; "
                         f"embed with `jaxserve serve` (/v1/embeddings, /api/embed) or LLM.embed()")
    return llm


def _run(args: argparse.Namespace) -> int:
    words = list(args.words)
    stored = None
    if words and _looks_like_model(words[0]):  # a path or the bundled model: as before the store
        args.model = words.pop(0)
    elif words and (stored := _stored_model(words[0])) is not None:
        words.pop(0)
        args.model = stored.source
        if stored.adapters and not hasattr(args, "enable_lora"):  # flags hold only what was typed
            args.enable_lora = True
    prompt = " ".join(words) if words else None
    engine_args = engine_args_from(resolve_options_for(args))
    _log_to_stderr("warning")  # a chat in the terminal: only what went wrong
    started = time.monotonic()
    llm = _generating_llm(engine_args)
    load_seconds = time.monotonic() - started
    chat = _plain_chat(args) if stored is None else _stored_chat(args, stored, llm.engine.max_model_len)
    if prompt is not None:
        _answer(llm, chat, [{"role": "user", "content": prompt}], load_seconds, args.verbose)
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
        history.append({"role": "assistant", "content": _answer(llm, chat, history, load_seconds, args.verbose)})
        load_seconds = 0.0


# ---- jaxserve generate ---------------------------------------------------------------------------

def _generate(args: argparse.Namespace) -> int:
    from jaxserve.sampling_params import SamplingParams

    # With --distributed every process runs this same prompt: the steps stay in lockstep.
    engine_args = engine_args_from(resolve_options_for(args))
    _log_to_stderr("info")  # stdout carries only the completion
    llm = _generating_llm(engine_args)
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


# ---- jaxserve lower ------------------------------------------------------------------------------

def _lower(args: argparse.Namespace) -> int:
    engine_args = engine_args_from(resolve_options_for(args))
    devices = engine_args.tensor_parallel_size * engine_args.data_parallel_size
    if devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # A mesh of host devices stands in for the target's (read when JAX first starts a backend).
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    from jaxserve.lowering import lower_step_graphs

    _log_to_stderr("warning")
    started = time.monotonic()
    plan, graphs = lower_step_graphs(engine_args, args.platform, num_pages=args.num_pages)
    print(f"lowering {plan.num_graphs} step graphs of {plan.model} for {plan.platform}: dtype {plan.dtype}, "
          f"attention {plan.attention}, {plan.num_pages} KV pages of {plan.block_size} tokens ({plan.kv_cache_dtype}), "
          f"mesh {plan.mesh}", flush=True)
    failed = 0
    for graph in graphs:
        print(graph.describe(), flush=True)
        failed += graph.error is not None
    verdict = f"{failed} of {plan.num_graphs} graphs failed" if failed else f"all {plan.num_graphs} graphs lowered"
    print(f"{verdict} for {plan.platform} in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="YAML file whose keys are option names (e.g. max-num-seqs: 32)")


_EPILOG = (f"Every option also reads JAXSERVE_<OPTION> from the environment (e.g. JAXSERVE_MAX_NUM_SEQS), "
           f"as each flag's help says; {CACHE_ROOT_ENV} (default ~/.cache/jaxserve) holds the compilation "
           f"cache and converted models. Precedence: flag > environment > --config > default; "
           f"--kv-cache-dtype also reads Ollama's OLLAMA_KV_CACHE_TYPE (f16, q8_0), below --config.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference and serving on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI- and Ollama-compatible HTTP API", epilog=_EPILOG)
    serve.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                       help="HF folder, .gguf file or 'smollm2' (default: the bundled SmolLM2-135M-Instruct)")
    _add_config_arg(serve)
    add_arguments(serve, SERVE_OPTIONS)
    add_arguments(serve, ENGINE_OPTIONS)

    run = sub.add_parser("run", help="chat with a model in the terminal, as `ollama run`", epilog=_EPILOG,
                         description="With PROMPT: print the answer and exit. Without: an interactive "
                                     "multi-turn chat (/bye exits).")
    run.add_argument("words", nargs="*", metavar="[MODEL] [PROMPT]",
                     help="an optional model (a stored model's name, a path or 'smollm2'), then the prompt")
    _add_config_arg(run)
    s = run.add_argument_group("chat")
    s.add_argument("--verbose", action="store_true", help="print token counts, durations and rates")
    s.add_argument("--temperature", type=float, default=None,
                   help="default: a stored model's temperature, else 0.8")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="default: a stored model's num_predict, else up to the context length")
    s.add_argument("--sample-seed", type=int, default=None, help="default: a stored model's seed")
    s.add_argument("--format", default=None, help='the answer\'s format: "json", or a JSON schema')
    add_arguments(run, ENGINE_OPTIONS, defaults=_ONE_STREAM)

    gen = sub.add_parser("generate", help="stream a completion of PROMPT to the terminal", epilog=_EPILOG)
    gen.add_argument("prompt")
    _add_config_arg(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--sample-seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_arguments(gen, ENGINE_OPTIONS, defaults=_ONE_STREAM)

    from jaxserve.lowering import DEFAULT_NUM_PAGES, PLATFORMS
    low = sub.add_parser("lower", help="lower every step graph for a platform (e.g. CUDA) without its device",
                         epilog=_EPILOG,
                         description="Lower (jax.export) each graph `serve` would compile with these engine "
                                     "flags, for --platform, reading only the model's config. Prints each "
                                     "graph; exits 1 if any fails to lower. Checks a deployment (shapes, "
                                     "buckets, kernels, mesh) before renting the hardware; compiling and "
                                     "running still need the device.")
    low.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                     help="HF folder, .gguf file or 'smollm2' (default: the bundled SmolLM2-135M-Instruct)")
    _add_config_arg(low)
    s = low.add_argument_group("lowering")
    s.add_argument("--platform", default="cuda", choices=PLATFORMS, help="the platform to lower for")
    s.add_argument("--num-pages", type=int, default=None,
                   help=f"KV cache pages (default: from --kv-cache-memory, else {DEFAULT_NUM_PAGES})")
    add_arguments(low, ENGINE_OPTIONS)
    store_cli.add_parsers(sub)
    client_cli.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # jaxserve uses transformers for tokenizers only; without torch (a plain install) it would print
    # "PyTorch was not found. Models won't be available..." on every command.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"serve": _serve, "run": _run, "generate": _generate, "lower": _lower, **store_cli.COMMANDS,
                **client_cli.COMMANDS}
    try:
        return commands[args.command](args)
    except client_cli.ServerError as e:  # as Ollama's client: the server's word, exit status 1
        parser.exit(1, f"jaxserve: error: {e}\n")
    except (ValueError, OSError) as e:  # bad flags or files, a port in use: no traceback
        parser.exit(2, f"jaxserve: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
