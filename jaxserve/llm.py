"""The offline API, as vLLM's: ``LLM(model).generate(prompts, SamplingParams(...))`` and ``chat`` on
generating models, ``LLM(model).embed(texts)`` on pooling models (vLLM's ``--runner``)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from typing import Sequence

import jax
from tqdm.auto import tqdm

from jaxserve import host_heap
from jaxserve.data_parallel import DataParallelEngine
from jaxserve.engine import LLMEngine, enable_persistent_compilation_cache
from jaxserve.engine_args import ENGINE_OPTIONS, EngineArgs, signature
from jaxserve.input_processor import PromptType
from jaxserve.lora import LoRARequest
from jaxserve.outputs import EmbeddingRequestOutput, RequestOutput
from jaxserve.parallel import build_mesh, check_divisible, initialize_distributed, replica_meshes
from jaxserve.pooling_params import PoolingParams
from jaxserve.profiling import enable_compile_logging
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


def resolve_runner(runner: str, architecture: str) -> str:
    """vLLM's --runner: "generate" or "pooling"; "auto" pools with architectures that cannot
    generate (encoders) and generates with the rest. A decoder may pool; an encoder cannot generate."""
    from jaxserve.models import registry

    can_generate = registry.can(architecture, registry.GENERATE)
    if runner == "auto":
        return "generate" if can_generate else "pooling"
    if runner == "generate" and not can_generate:
        raise ValueError(f"{architecture} cannot generate text, it only embeds: run it with runner 'pooling' "
                         f"(or 'auto')")
    return runner


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching, or embed
    texts with a pooling model (``runner``: "auto" pools with embedding-only architectures).

    The keyword arguments are jaxserve/engine_args.py's EngineArgs, the same options as the CLI
    flags (``max_num_seqs`` is ``--max-num-seqs``); one not given falls back to its ``JAXSERVE_*``
    variable, then to the table's default. ``model``: an HF folder, a ``.gguf`` file, ``"smollm2"``
    or None (the bundled SmolLM2-135M-Instruct). ``LLM.from_engine_args(args)`` skips the
    environment.
    """

    def __init__(self, model: str | None = None, **engine_args):
        explicit = dict(engine_args)
        if model is not None:
            explicit["model"] = model
        unknown = sorted(set(explicit) - {o.name for o in ENGINE_OPTIONS})
        if unknown:
            raise TypeError(f"LLM() got unknown engine argument(s): {', '.join(unknown)}")
        self._build(EngineArgs.resolve(explicit, environ=os.environ))

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLM":
        llm = cls.__new__(cls)
        llm._build(args)
        return llm

    def _build(self, args: EngineArgs) -> None:
        self.args = args
        if args.distributed:  # every process must run the same steps: see jaxserve/multihost.py
            initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
        host_heap.keep_freed_blocks()  # before JAX starts its backends (jaxserve/host_heap.py)
        try:
            self._build_engine(args)
        finally:
            host_heap.give_back_free_memory()  # the load's host copies of the weights

    def _build_engine(self, args: EngineArgs) -> None:
        from jaxserve.models import load_model
        from jaxserve.pallas_kernels import attention_backend as get_attention

        if args.log_compiles:
            enable_compile_logging()
        compile_cfg = args.compile_config()
        enable_persistent_compilation_cache(compile_cfg.resolved_cache_dir())
        self.loaded = load_model(args.model, args.dtype)
        self.runner_type = resolve_runner(args.runner, self.loaded.config.architecture)
        self._ids = itertools.count()
        if self.runner_type == "pooling":
            self.engine = self._pooling_engine(args, get_attention(args.attention_backend))
            return
        limit = self.loaded.config.max_position_embeddings
        if args.max_model_len is not None and args.max_model_len > limit:
            raise ValueError(f"max_model_len ({args.max_model_len}) exceeds the model's context length ({limit})")
        self.loaded = self.loaded.for_max_model_len(args.max_model_len or limit).quantized(args.quantization)
        parallel = args.parallel_config()
        check_divisible(self.loaded.config, parallel.tensor_parallel_size)
        speculative = args.speculative_config()
        draft = None
        if speculative is not None and speculative.draft_model is not None:
            # In --dtype and unquantized (vLLM quantizes the draft only when told); one copy for every replica.
            draft = load_model(speculative.draft_model, args.dtype).for_max_model_len(args.max_model_len or limit)
            check_divisible(draft.config, parallel.tensor_parallel_size)
        replicas = [LLMEngine(self.loaded, cache=args.cache_config(),
                              scheduler=args.scheduler_config(args.max_model_len or limit), compile=compile_cfg,
                              attention_fn=get_attention(args.attention_backend), seed=args.seed + i,
                              profiler_dir=args.profiler_dir, mesh=mesh,
                              structured_outputs_timeout=args.structured_outputs_timeout, lora=args.lora_config(),
                              speculative=speculative, draft=draft)
                    for i, mesh in enumerate(replica_meshes(build_mesh(parallel)))]
        self.engine = replicas[0] if len(replicas) == 1 else DataParallelEngine(replicas)
        line = host_heap.hint(args.max_num_seqs, self.loaded.config.vocab_size)
        if line and jax.default_backend() == "cpu":
            logger.info(line)

    def _pooling_engine(self, args: EngineArgs, attention_fn):
        """The engine of runner "pooling". Its input limit is the model's sentence-transformers
        max_seq_length where it names one, else its position limit; max_model_len may lower it."""
        from jaxserve.models import registry
        from jaxserve.models.pooling import pooler_config
        from jaxserve.pooling_engine import PoolingEngine

        if args.tensor_parallel_size > 1 or args.data_parallel_size > 1 or args.distributed:
            raise ValueError("runner 'pooling' runs on one device: tensor_parallel_size and data_parallel_size "
                             "must be 1, and distributed is not supported")
        if args.enable_lora:
            raise ValueError("runner 'pooling' serves no LoRA adapters: enable_lora needs a generating model")
        if args.quantization is not None:
            raise ValueError(f"runner 'pooling' runs its weights in --dtype: quantization {args.quantization!r} "
                             f"needs a generating model")
        loaded = self.loaded
        folder = loaded.source if os.path.isdir(loaded.source) else None
        pooler = pooler_config(folder, encoder=not registry.can(loaded.config.architecture, registry.GENERATE),
                               pooling_type=args.pooling_type)
        limit = min(loaded.config.max_position_embeddings, pooler.max_seq_length or math.inf)
        if args.max_model_len is not None and args.max_model_len > limit:
            raise ValueError(f"max_model_len ({args.max_model_len}) exceeds this model's input limit ({limit} "
                             f"tokens: its sentence-transformers max_seq_length, else its position limit)")
        return PoolingEngine(loaded, pooler=pooler, max_input_tokens=args.max_model_len or limit,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             block_size=args.block_size, attention_fn=attention_fn,
                             warmup=args.compile_config().warmup, profiler_dir=args.profiler_dir)

    def get_tokenizer(self):
        return self.loaded.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids": ...}
        dicts); outputs come back in input order.
        lora_request: one adapter for every prompt, or a list with one (or None) per prompt
        (needs enable_lora=True; an adapter is read and checked on its first use)."""
        self._require("generate", "LLM.generate()")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm, prompt_texts=None, lora_request=lora_request)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of messages) or a list of them."""
        self._require("generate", "LLM.chat()")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.loaded.tokenizer
        texts = [tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template) for conv in conversations]
        token_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return self._run(token_ids, sampling_params, use_tqdm, prompt_texts=texts, lora_request=lora_request)

    def embed(self, prompts: PromptType | Sequence[PromptType], *, truncate_prompt_tokens: int | None = None,
              use_tqdm: bool = True, pooling_params: PoolingParams | None = None) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (text, token ids or vLLM's prompt dicts), in input order, as vLLM's
        ``LLM.embed``: ``out.outputs.embedding`` is a list of floats. ``truncate_prompt_tokens``:
        a longer prompt keeps only its last N tokens (-1: the model's input limit); without it a
        prompt past the limit is refused. ``use_tqdm`` is accepted and ignored (one call, no steps
        to show)."""
        self._require("pooling", "LLM.embed()")
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = pooling_params or PoolingParams()
        if truncate_prompt_tokens is not None:
            params = dataclasses.replace(params, truncate_prompt_tokens=truncate_prompt_tokens)
        return self.engine.embed(list(prompts), params)

    def _require(self, runner: str, what: str) -> None:
        if self.runner_type == runner:
            return
        if runner == "pooling":
            raise ValueError(f"{what} is only supported for pooling models; this model runs with runner "
                             f"'generate'. Pass runner='pooling' (--runner pooling) to embed with it")
        raise ValueError(f"{what} is only supported for generating models; this model runs with runner "
                         f"'pooling' (it embeds): use LLM.embed()")

    def _run(self, prompts: list, sampling_params, use_tqdm: bool, prompt_texts,
             lora_request=None) -> list[RequestOutput]:
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        if isinstance(lora_request, Sequence):
            if len(lora_request) != len(prompts):
                raise ValueError(f"got {len(lora_request)} lora_requests for {len(prompts)} prompts")
            loras = list(lora_request)
        else:
            loras = [lora_request] * len(prompts)
        # Only the final outputs are returned: the engine need not build one per step (as vLLM's LLM).
        final_only = {}
        params_list = [final_only.setdefault(id(p), dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY))
                       if isinstance(p, SamplingParams) else p for p in params_list]  # others: the engine refuses
        engine = self.engine
        ids = []
        try:
            for i, (prompt, params, lora) in enumerate(zip(prompts, params_list, loras)):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, params,
                                   prompt_text=prompt_texts[i] if prompt_texts else None, lora_request=lora)
                ids.append(request_id)
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2) as bar:
            while len(finals) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
        return [finals[i] for i in ids]

    def stats(self):
        """The engine's statistics, gauges brought up to date (warm-up compiles before any step)."""
        return self.engine.refresh_stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (as vLLM's LLM.reset_prefix_cache): later prompts prefill in full."""
        if self.runner_type != "generate":  # a pooling model caches no prefixes
            return
        for engine in getattr(self.engine, "replicas", [self.engine]):
            engine.pool.reset_prefix_cache()

    def start_profile(self, trace_dir: str | None = None) -> str:
        """Start a JAX profiler trace of every following step; returns the trace folder."""
        return self.engine.profiler.start(trace_dir)

    def stop_profile(self) -> str:
        """Stop the trace; returns the run folder (open its parent in TensorBoard/XProf, or its
        perfetto_trace.json.gz in Perfetto)."""
        return self.engine.profiler.stop()


# help(LLM) and notebooks' completion show every engine option, from the one table.
LLM.__init__.__signature__ = signature(ENGINE_OPTIONS)
