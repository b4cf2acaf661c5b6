"""The pooling engine: what `LLM.embed` and the server's embedding routes run on a model served
with runner "pooling". It owns the input checks (tokenising, truncation, the input limit, token
ids, `dimensions`), the pooling runner, and each request's finishing touches (Matryoshka
truncation, normalising).

It stands where LLMEngine stands for generating models, with the attributes AsyncEngine reads
(tokenizer, max_model_len, vocab_size, stats, profiler); it generates nothing: add_request refuses.
"""
from __future__ import annotations

import collections
import itertools
import time

import numpy as np

from jaxserve.engine import EngineStats
from jaxserve.input_processor import PromptType, RequestValidationError, check_token_ids, integer_ids, prompt_from_dict
from jaxserve.models.pooling import PoolerConfig
from jaxserve.models.registry import EMBED
from jaxserve.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from jaxserve.pooling_params import PoolingParams
from jaxserve.pooling_runner import PoolingRunner
from jaxserve.profiling import Profiler

_NORM_EPS = 1e-12  # torch.nn.functional.normalize's: a zero vector stays zero


class PoolingEngine:
    capabilities = (EMBED,)

    def __init__(self, loaded, *, pooler: PoolerConfig, max_input_tokens: int, max_num_seqs: int,
                 max_num_batched_tokens: int, block_size: int, attention_fn, warmup: bool = True,
                 profiler_dir: str | None = None):
        """max_input_tokens: the longest input (the model's limit, or --max-model-len below it). A
        step holds at least one such input, whatever max_num_batched_tokens says."""
        self.model_config = loaded.config
        self.pooler = pooler
        self.max_model_len = max_input_tokens
        self.vocab_size = loaded.config.vocab_size
        self.hidden_size = loaded.config.hidden_size
        self.max_num_seqs = max_num_seqs
        self.runner = PoolingRunner(loaded.model, loaded.params, pooling_type=pooler.pooling_type,
                                    max_num_batched_tokens=max(max_num_batched_tokens, max_input_tokens),
                                    max_num_seqs=max_num_seqs, max_input_tokens=max_input_tokens,
                                    block_size=block_size, attention_fn=attention_fn)
        self.stats = EngineStats()
        self.bucket_counts: collections.Counter = collections.Counter()  # steps run per (T, B) bucket
        self.profiler = Profiler(profiler_dir)
        self._ids = itertools.count()
        if warmup:
            self.runner.warmup()
        self.tokenizer = loaded.tokenizer  # last: a GGUF's loads in the background until here

    # ---- input processing (any thread: the server runs it on its tokenizer thread) -------------

    def process(self, prompts: list[PromptType], params: PoolingParams, tokenizer=None) -> list[list[int]]:
        """The token ids of every prompt, truncated as `params` asks, or a RequestValidationError
        naming the field ("prompt", "prompt[i]" when there are several, "dimensions",
        "truncate_prompt_tokens"). `tokenizer`: the calling thread's copy (default the engine's)."""
        if not isinstance(params, PoolingParams):
            raise RequestValidationError(f"pooling_params must be a PoolingParams, got {type(params).__name__}")
        if not prompts:
            raise RequestValidationError("prompt must hold at least one input", param="prompt")
        if params.dimensions is not None:
            try:
                self.pooler.check_dimensions(params.dimensions, self.hidden_size)
            except ValueError as e:
                raise RequestValidationError(str(e), param="dimensions") from None
        limit = self._truncation_limit(params, tokenizer or self.tokenizer)
        token_lists = []
        for i, prompt in enumerate(prompts):
            label = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            ids = self._tokenize(prompt, params.truncation_side, limit, tokenizer or self.tokenizer, label)
            self._check(ids, label)
            token_lists.append(ids)
        return token_lists

    def _truncation_limit(self, params: PoolingParams, tokenizer) -> int | None:
        k = params.truncate_prompt_tokens
        if k is None:
            return None
        if k > self.max_model_len:
            raise RequestValidationError(f"truncate_prompt_tokens ({k}) is more than this model's input limit "
                                         f"({self.max_model_len} tokens)", param="truncate_prompt_tokens")
        special = tokenizer.num_special_tokens_to_add()
        if k != -1 and k <= special:
            raise RequestValidationError(f"truncate_prompt_tokens must be more than the {special} special tokens "
                                         f"this model adds to every text, got {k}", param="truncate_prompt_tokens")
        return self.max_model_len if k == -1 else k

    @staticmethod
    def _tokenize(prompt: PromptType, side: str, limit: int | None, tokenizer, label: str) -> list[int]:
        if isinstance(prompt, dict):
            prompt = prompt_from_dict(prompt, label)
        if not isinstance(prompt, str):
            ids = integer_ids(prompt, label)
            if limit is None or len(ids) <= limit:
                return ids
            return ids[-limit:] if side == "left" else ids[:limit]
        if limit is None:
            return tokenizer(prompt).input_ids
        # The tokenizer truncates the text and then adds its special tokens, so [CLS] ... [SEP]
        # (or BOS) survive. Each thread has its own tokenizer copy: setting the side is safe.
        previous, tokenizer.truncation_side = tokenizer.truncation_side, side
        try:
            return tokenizer(prompt, truncation=True, max_length=limit).input_ids
        finally:
            tokenizer.truncation_side = previous

    def _check(self, ids: list[int], label: str) -> None:
        if not ids:
            raise RequestValidationError(f"{label} is empty: it needs at least one token", param=label)
        check_token_ids(ids, self.vocab_size, label)
        if len(ids) > self.max_model_len:
            raise RequestValidationError(
                f"{label} has {len(ids)} tokens, more than this model's input limit of {self.max_model_len}; "
                f"shorten it or ask for truncation", param=label, code="context_length_exceeded")

    # ---- the device work (one thread at a time) -------------------------------------------------

    def run(self, token_lists: list[list[int]]) -> np.ndarray:
        """Pooled vectors [n, D] float32 of checked token lists, not yet normalised."""
        start = time.perf_counter()
        vectors, buckets = self.runner.run(token_lists)
        seconds = time.perf_counter() - start
        self.bucket_counts.update(buckets)
        s = self.stats
        s.steps += len(buckets)
        s.prompt_tokens += sum(len(ids) for ids in token_lists)
        s.step_seconds_total += seconds
        s.last_step_seconds = seconds
        s.step_seconds.append(seconds)
        del s.step_seconds[:-1000]
        self.refresh_stats()
        return vectors

    def finish(self, vectors: np.ndarray, params: PoolingParams) -> list[list[float]]:
        """Each vector as a request gets it: cut to `dimensions`, then normalised if the model does."""
        if params.dimensions is not None:
            vectors = vectors[:, :params.dimensions]
        if self.pooler.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, _NORM_EPS)
        return vectors.tolist()

    def embed(self, prompts: list[PromptType], params: PoolingParams) -> list[EmbeddingRequestOutput]:
        """Embed every prompt on this thread (LLM.embed)."""
        token_lists = self.process(prompts, params)
        vectors = self.finish(self.run(token_lists), params)
        return [EmbeddingRequestOutput(str(next(self._ids)), EmbeddingOutput(v), ids)
                for v, ids in zip(vectors, token_lists)]

    def refresh_stats(self) -> EngineStats:
        s = self.stats
        s.num_compiled_graphs = self.runner.num_compiled
        s.compile_seconds = self.runner.compile_seconds
        s.compile_times = list(self.runner.compile_times)
        return s

    # ---- the generation interface, refused --------------------------------------------------------

    def add_request(self, request_id: str, prompt, params=None, **kwargs) -> None:
        raise RequestValidationError("this model runs as a pooling model (runner 'pooling'): it embeds and "
                                     "cannot generate", param="model")

    def abort_request(self, request_id: str) -> None:
        pass

    def has_unfinished_requests(self) -> bool:
        return False

    def step(self) -> list[RequestOutput]:
        return []

    # An embedding model serves no LoRA adapters (LLM refuses enable_lora with runner "pooling").
    lora_enabled = False

    def list_loras(self) -> list:
        return []
