"""The offline API, as vLLM's: ``LLM(model).generate(prompts, SamplingParams(...))`` and ``chat``."""
from __future__ import annotations

import itertools
from typing import Sequence

from tqdm.auto import tqdm

from jaxserve.config import CacheConfig, CompileConfig, SchedulerConfig
from jaxserve.data_parallel import DataParallelEngine
from jaxserve.engine import LLMEngine, enable_persistent_compilation_cache
from jaxserve.outputs import RequestOutput
from jaxserve.parallel import ParallelConfig, build_mesh, check_divisible, replica_meshes
from jaxserve.profiling import enable_compile_logging
from jaxserve.sampling_params import SamplingParams

PromptType = str | Sequence[int]


class LLM:
    """Load a model once, then generate for batches of prompts with continuous batching.

    ``model``: an HF folder, a ``.gguf`` file, ``"smollm2"`` or None (the bundled SmolLM2-135M-Instruct).
    ``kv_cache_memory``: bytes for the KV cache (CPU default: what max_num_seqs full-length requests
    need, at most 1 GiB). ``attention_backend``: "reference" (the jnp path, the CPU default) or "pallas".
    ``profiler_dir``: where ``start_profile()`` writes traces (default: $JAXSERVE_PROFILER_DIR).
    ``tensor_parallel_size`` devices share one model (Megatron-style, see jaxserve/parallel.py);
    ``data_parallel_size`` replicas of it serve requests side by side.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", max_model_len: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 512, block_size: int = 16,
                 enable_prefix_caching: bool = True, kv_cache_memory: int | None = None,
                 gpu_memory_utilization: float = 0.9, seed: int = 0, attention_backend: str = "reference",
                 compilation_cache_dir: str | None = None, warmup: bool = True,
                 profiler_dir: str | None = None, log_compiles: bool = False,
                 tensor_parallel_size: int = 1, data_parallel_size: int = 1):
        from jaxserve.models import load_model
        from jaxserve.pallas_kernels import attention_backend as get_attention

        if log_compiles:
            enable_compile_logging()
        compile_cfg = CompileConfig(compilation_cache_dir=compilation_cache_dir, warmup=warmup)
        enable_persistent_compilation_cache(compile_cfg.resolved_cache_dir())
        cache_cfg = CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_prefix_caching=enable_prefix_caching)
        self.loaded = load_model(model, dtype)
        limit = self.loaded.config.max_position_embeddings
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the model's context length ({limit})")
        sched_cfg = SchedulerConfig(max_model_len=max_model_len or limit, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=max_num_batched_tokens)
        parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size)
        check_divisible(self.loaded.config, parallel.tensor_parallel_size)
        replicas = [LLMEngine(self.loaded, cache=cache_cfg, scheduler=sched_cfg, compile=compile_cfg,
                              attention_fn=get_attention(attention_backend), seed=seed + i,
                              profiler_dir=profiler_dir, mesh=mesh)
                    for i, mesh in enumerate(replica_meshes(build_mesh(parallel)))]
        self.engine = replicas[0] if len(replicas) == 1 else DataParallelEngine(replicas)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.loaded.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); outputs come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm, prompt_texts=None)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the chat template to one conversation (a list of messages) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.loaded.tokenizer
        texts = [tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               chat_template=chat_template) for conv in conversations]
        token_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return self._run(token_ids, sampling_params, use_tqdm, prompt_texts=texts)

    def _run(self, prompts: list, sampling_params, use_tqdm: bool, prompt_texts) -> list[RequestOutput]:
        if isinstance(sampling_params, Sequence):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        engine = self.engine
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = str(next(self._ids))
                engine.add_request(request_id, prompt, params,
                                   prompt_text=prompt_texts[i] if prompt_texts else None)
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
        for engine in getattr(self.engine, "replicas", [self.engine]):
            engine.pool.reset_prefix_cache()

    def start_profile(self, trace_dir: str | None = None) -> str:
        """Start a JAX profiler trace of every following step; returns the trace folder."""
        return self.engine.profiler.start(trace_dir)

    def stop_profile(self) -> str:
        """Stop the trace; returns the run folder (open its parent in TensorBoard/XProf, or its
        perfetto_trace.json.gz in Perfetto)."""
        return self.engine.profiler.stop()
