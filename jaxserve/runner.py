"""The model runner: turns a scheduled step into device arrays, runs one jitted step, returns tokens.

It owns the parameters and the paged KV cache (donated into every step so XLA updates it in
place), laid out on its mesh as jaxserve/parallel.py says, and one compiled executable per bucket. The step's token count T is padded to a power of
two and its sequence slots to B = min(T, max_num_seqs): pure decode steps pad nothing twice, and
the number of graphs is the number of token buckets, all compiled at warm-up. A step in which
some row names a pluggable sampler runs a second graph per bucket, compiled on first use for
the sampler registry's current version (so registering a sampler costs one compile per bucket).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve import sampling
from jaxserve.block_pool import NULL_PAGE
from jaxserve.graph_cache import ExportedGraphStore, describe_arguments, describe_callable, platform_fingerprint
from jaxserve.models.metadata import AttentionMetadata, KVCache
from jaxserve.parallel import (ParallelConfig, build_mesh, kv_cache_sharding, param_shardings,
                               replicated)
from jaxserve.precision import storage_dtype
from jaxserve.profiling import DEVICE_STEP, PREPARE, annotate
from jaxserve.sampler import (DEFAULT_SAMPLER, SamplingRow, SamplingTensors, build_sampling_tensors,
                              compute_logprobs, sample)
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxserve.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)

BANNED_WIDTH = 16  # EOS + stop_token_ids suppressed while min_tokens is not reached


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    tokens: jax.Array            # [T] int32
    attn: AttentionMetadata
    logits_indices: jax.Array    # [B] int32, the last token of each sequence slot
    sampling: SamplingTensors


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    # No bucket of 1: XLA turns a one-row KV scatter into a dynamic-update-slice and then copies the
    # whole cache around it (measured: 30x slower single-stream decode); one padded row is free.
    buckets, t = [], 2
    while t < max_num_batched_tokens:
        buckets.append(t)
        t *= 2
    return buckets + [max_num_batched_tokens]


@dataclasses.dataclass
class StepResult:
    tokens: np.ndarray         # [n] sampled token per scheduled sequence (garbage where it does not sample)
    logprobs: np.ndarray       # [n]
    top_ids: np.ndarray        # [n, MAX_LOGPROBS]
    top_logprobs: np.ndarray   # [n, MAX_LOGPROBS]
    sampler_state: np.ndarray  # [n, SAMPLER_STATE_WIDTH], each row's pluggable-sampler state after its token
    bucket: tuple[int, int]
    seconds: float
    # Only when a scheduled request asked for prompt_logprobs: per flat token, the log-prob of the
    # next prompt token and the top ones ([T], [T, MAX_LOGPROBS], [T, MAX_LOGPROBS]).
    prompt_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


_GREEDY = SamplingParams(temperature=0.0)
# Threads compiling warm-up graphs while the main thread lowers the next (XLA:CPU compiles one
# graph on one core); more than the cores only adds memory.
_COMPILE_THREADS = max(1, min(4, os.cpu_count() or 1))


def _timed_compile(lowered: jax.stages.Lowered):
    start = time.perf_counter()
    return lowered.compile(), time.perf_counter() - start


class ModelRunner:
    def __init__(self, model, params, *, num_pages: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, attention_fn, mesh: Mesh | None = None,
                 exported_graphs_dir: str | None = None):
        cfg = model.config
        self.model = model
        # One code path for every mesh: a single device is a 1 x 1 mesh.
        self.mesh = mesh if mesh is not None else build_mesh(ParallelConfig())
        params = model.storage_form(params)  # bf16 layers are stored packed on CPU (precision.py)
        param_sharding = param_shardings(params, self.mesh, cfg)
        self.params = jax.device_put(params, param_sharding)
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.page_table_width = -(-max_model_len // block_size)
        self.attention_fn = attention_fn
        dtype = storage_dtype(jax.tree_util.tree_leaves(params)[0].dtype)
        shape = (cfg.num_layers, num_pages, block_size, cfg.num_kv_heads, cfg.head_dim)
        kv_sharding = kv_cache_sharding(self.mesh, cfg)
        kv_sharding = KVCache(k=kv_sharding, v=kv_sharding)
        # Built in place on its devices: a sharded cache is never whole on one device.
        self.kv_cache = jax.jit(lambda: KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)),
                                out_shardings=kv_sharding)()
        self.buckets = [(t, min(t, max_num_seqs)) for t in token_buckets(max_num_batched_tokens)]
        # Explicit shardings, the same for warm-up and serving: step inputs and the sampler's
        # outputs are replicated, so every shard samples the same tokens.
        self._replicated = replicated(self.mesh)
        # `samplers` (the pluggable ones a variant runs) is static and positional: jit refuses
        # keyword arguments once in_shardings is given.
        self._shardings = dict(in_shardings=(param_sharding, kv_sharding, self._replicated, self._replicated),
                               out_shardings=(kv_sharding, self._replicated, self._replicated))
        self._jitted = jax.jit(self._step, donate_argnums=(1,), static_argnums=(4,), **self._shardings)
        self._exported = self._exported_store(exported_graphs_dir)
        self.num_graphs_from_store = 0  # warm-up graphs read back from the store instead of traced
        # (bucket, prompt_logprobs, sampler registry version or None for the default-only graph)
        self._compiled: dict[tuple[tuple[int, int], bool, int | None], object] = {}
        self.compile_seconds = 0.0
        self.compile_times: list[float] = []  # seconds of each executable built, in order

    # ---- device side -------------------------------------------------------------------------

    def _step(self, params, kv_cache: KVCache, inputs: StepInputs, prompt_targets=None, samplers=()):
        with jax.named_scope("model"):
            hidden, kv_cache = self.model.forward(params, inputs.tokens, kv_cache, inputs.attn,
                                                  attention_fn=self.attention_fn)
        with jax.named_scope("logits"):
            logits = self.model.compute_logits(params, hidden[inputs.logits_indices])  # [B, V]
        with jax.named_scope("sampler"):
            out = sample(logits, inputs.sampling, samplers=samplers)
        if prompt_targets is None:
            return kv_cache, out, None
        # The prompt_logprobs variant (compiled only when a request asks): every position scores
        # the prompt token after it.
        with jax.named_scope("prompt_logprobs"):
            all_logits = self.model.compute_logits(params, hidden)  # [T, V]
            prompt = compute_logprobs(all_logits, jnp.maximum(prompt_targets, 0), num_top_logprobs=MAX_LOGPROBS)
        return kv_cache, out, prompt

    @property
    def num_compiled(self) -> int:
        """Executables held, prompt_logprobs variants included."""
        return len(self._compiled)

    @property
    def num_compiled_steps(self) -> int:
        """Plain default-sampler step executables (the ones warm-up builds, one per bucket)."""
        return sum(1 for _, with_prompt_logprobs, version in self._compiled
                   if not with_prompt_logprobs and version is None)

    def _executable(self, bucket: tuple[int, int], inputs: StepInputs, prompt_targets=None,
                    samplers: sampling.Snapshot | None = None):
        """The step for `bucket`; with `samplers`, the variant that also runs their pluggable ones."""
        version = samplers.version if samplers is not None else None
        key = (bucket, prompt_targets is not None, version)
        exe = self._compiled.get(key)
        if exe is None:
            if version is not None:  # graphs of older registry versions are never used again
                for stale in [k for k in self._compiled if k[2] not in (None, version)]:
                    del self._compiled[stale]
            start = time.perf_counter()
            exe = self._lower(bucket, inputs, prompt_targets, samplers).compile()
            self._keep(key, exe, time.perf_counter() - start)
        return exe

    def _keep(self, key: tuple[tuple[int, int], bool, int | None], exe, seconds: float) -> None:
        self.compile_seconds += seconds
        self.compile_times.append(seconds)
        self._compiled[key] = exe
        logger.debug("compiled step T=%d B=%d (sampler registry %s) in %.2fs", *key[0], key[2], seconds)

    def _lower(self, bucket: tuple[int, int], inputs: StepInputs, prompt_targets=None,
               samplers: sampling.Snapshot | None = None) -> jax.stages.Lowered:
        """A step graph lowered: the Python half of building it (XLA's compile() is the other)."""
        if self._exported is not None and prompt_targets is None and samplers is None:
            lowered = self._lower_through_store(bucket, inputs)
            if lowered is not None:
                return lowered
        return self._jitted.lower(self.params, self.kv_cache, inputs, prompt_targets,
                                  samplers.pluggable if samplers is not None else ())

    def _exported_store(self, folder: str | None) -> ExportedGraphStore | None:
        """The store of the default step graphs, or None where a graph could not be keyed safely
        (an attention function from outside jaxserve) or would be shared between processes."""
        attention = describe_callable(self.attention_fn)
        if folder is None or attention is None or jax.process_count() > 1:
            return None
        devices = list(self.mesh.devices.flat)
        identity = (f"{type(self.model).__module__}.{type(self.model).__qualname__}\0{self.model.config!r}\0"
                    f"{attention}\0{dict(self.mesh.shape)}\0{platform_fingerprint(devices)}")
        return ExportedGraphStore(folder, identity)

    def _lower_through_store(self, bucket: tuple[int, int], inputs: StepInputs) -> jax.stages.Lowered | None:
        """The default step of `bucket` lowered from its exported graph (read from the store, or
        exported now and kept): it compiles to the same executable as `_jitted`'s, without tracing
        the model on a warm start. None when the graph cannot be exported."""
        args = (self.params, self.kv_cache, inputs, None)
        key = self._exported.key(f"{bucket}\0{describe_arguments(*args)}")
        exported = self._exported.load(key)
        if exported is not None:
            self.num_graphs_from_store += 1
        else:
            try:
                exported = jax.export.export(self._jitted)(*args, ())
            except Exception as error:  # e.g. a kernel's custom call that export does not vouch for
                logger.info("step graphs are not exported (%s); each start traces them", error)
                self._exported = None
                return None
            self._exported.save(key, exported)
        return jax.jit(exported.call, donate_argnums=(1,), **self._shardings).lower(*args)

    def warmup(self) -> None:
        """Build every bucket's default step now, so serving never compiles. The main thread lowers
        one graph while worker threads compile the ones before it (or read them from the persistent
        cache): XLA releases the GIL, lowering holds it. Measured on 2 vCPUs, warm: SmolLM2's 7
        graphs of `jaxserve run` in about 1.0 s instead of 1.85 s one after another."""
        todo = [b for b in self.buckets if (b, False, None) not in self._compiled]
        with ThreadPoolExecutor(max_workers=_COMPILE_THREADS) as pool:
            pending = []
            for bucket in todo:
                start = time.perf_counter()
                lowered = self._lower(bucket, self._empty_inputs(bucket))
                pending.append((bucket, time.perf_counter() - start, pool.submit(_timed_compile, lowered)))
            for bucket, lower_seconds, future in pending:
                exe, compile_seconds = future.result()
                self._keep((bucket, False, None), exe, lower_seconds + compile_seconds)

    def bucket_for(self, num_tokens: int) -> tuple[int, int]:
        for bucket in self.buckets:
            if bucket[0] >= num_tokens:
                return bucket
        raise ValueError(f"a step of {num_tokens} tokens exceeds max_num_batched_tokens")

    # ---- host side ---------------------------------------------------------------------------

    def _empty_inputs(self, bucket: tuple[int, int], rows: list[SamplingRow] = (),
                      samplers: sampling.Snapshot | None = None) -> StepInputs:
        """All-padding inputs of a bucket, with the sampling rows of the real sequences."""
        T, B = bucket
        tensors = build_sampling_tensors(list(rows), B, self.max_model_len, BANNED_WIDTH,
                                         samplers.samplers if samplers is not None else None)
        attn = AttentionMetadata(
            positions=np.zeros(T, np.int32), slot_mapping=np.zeros(T, np.int32),
            cu_q_lens=np.zeros(B + 1, np.int32), kv_lens=np.zeros(B, np.int32),
            page_table=np.full((B, self.page_table_width), NULL_PAGE, np.int32),
            num_seqs=np.int32(0))
        return StepInputs(tokens=np.zeros(T, np.int32), attn=attn,
                          logits_indices=np.zeros(B, np.int32), sampling=tensors)

    def prepare(self, sched: SchedulerOutput, rows: list[SamplingRow | None],
                samplers: sampling.Snapshot | None = None) -> tuple[tuple[int, int], StepInputs]:
        """The flat ragged batch of a step, padded to its bucket (numpy only)."""
        bucket = self.bucket_for(sched.num_tokens)
        greedy_row = SamplingRow(params=_GREEDY, seed=0, step=0, prompt_ids=(), output_ids=(), banned_ids=())
        inputs = self._empty_inputs(bucket, [r or greedy_row for r in rows], samplers)
        a = inputs.attn
        S = self.block_size
        offset = 0
        for b, seq in enumerate(sched.seqs):
            req, n = seq.request, seq.num_tokens
            end = seq.start + n
            positions = np.arange(seq.start, end, dtype=np.int32)
            if n == 1:
                inputs.tokens[offset] = req.token_at(seq.start)
            else:
                inputs.tokens[offset:offset + n] = req.all_token_ids()[seq.start:end]
            pages = np.asarray(req.block_ids, np.int32)
            a.positions[offset:offset + n] = positions
            a.slot_mapping[offset:offset + n] = pages[positions // S] * S + positions % S
            a.page_table[b, :len(pages)] = pages
            a.kv_lens[b] = end
            offset += n
            a.cu_q_lens[b + 1] = offset
            inputs.logits_indices[b] = offset - 1
        a.cu_q_lens[len(sched.seqs) + 1:] = offset
        a.num_seqs = np.int32(len(sched.seqs))
        return bucket, inputs

    def _prompt_targets(self, sched: SchedulerOutput, num_tokens: int) -> np.ndarray | None:
        """[T] the prompt token after each flat position of requests wanting prompt_logprobs, else -1."""
        if not any(s.request.params.prompt_logprobs is not None for s in sched.seqs):
            return None
        targets = np.full(num_tokens, -1, np.int32)
        offset = 0
        for seq in sched.seqs:
            req = seq.request
            if req.params.prompt_logprobs is not None:
                end = min(seq.start + seq.num_tokens, req.num_prompt_tokens - 1)
                if end > seq.start:
                    targets[offset:offset + end - seq.start] = req.prompt_token_ids[seq.start + 1:end + 1]
            offset += seq.num_tokens
        return targets

    def execute(self, sched: SchedulerOutput, rows: list[SamplingRow | None]) -> StepResult:
        start = time.perf_counter()
        # Only a step in which some row names a pluggable sampler pays for (and compiles) them.
        pluggable = any(r is not None and r.params.selected_sampler != DEFAULT_SAMPLER for r in rows)
        samplers = sampling.snapshot() if pluggable else None
        with annotate(PREPARE):
            bucket, inputs = self.prepare(sched, rows, samplers)
            targets = self._prompt_targets(sched, bucket[0])
        exe = self._executable(bucket, inputs, targets, samplers)
        with annotate(DEVICE_STEP):
            inputs, targets = jax.device_put((inputs, targets), self._replicated)  # the one host->device transfer
            self.kv_cache, out, prompt = exe(self.params, self.kv_cache, inputs, targets)
            out, prompt = jax.device_get((out, prompt))  # the step's one device->host transfer
        n = len(sched.seqs)
        return StepResult(tokens=out.tokens[:n], logprobs=out.logprobs[:n], top_ids=out.top_ids[:n],
                          top_logprobs=out.top_logprobs[:n],
                          sampler_state=out.sampler_state[:n], bucket=bucket,
                          seconds=time.perf_counter() - start, prompt_logprobs=prompt)
