"""The model runner: turns a scheduled step into device arrays, runs its compiled graphs, returns tokens.

It owns the parameters and the paged KV cache (donated into every step so XLA updates it in
place), laid out on its mesh as jaxserve/parallel.py says, and the compiled executables. A step
runs up to three graphs back to back on the device; the host waits only for the last one:

- the **forward** graph of its bucket (T, B): tokens -> KV cache update -> logits [B, V] of the
  sequence slots. T, the step's token count, is padded to a power of two (`token_buckets`); B,
  its sequence slots, to the batch bucket holding min(T, max_num_seqs) (`batch_buckets`: powers
  of two from 8), so pure decode steps pad their tokens at most once;
- the **penalties** graph of B (repetition, frequency, presence, banned ids), only on steps in
  which some row has one (the host knows from the sampling params);
- the **sampler** graph of B: logits -> tokens and logprobs; on steps in which some row has a
  structured-output constraint, the **masked sampler** graph of B instead, which also takes the
  step's token bitmask [B, V/32] (jaxserve/structured_output.py) and applies it first. The host
  fills that bitmask after queueing the forward graph, while the device runs it (dispatch is
  asynchronous): a row's mask depends only on the tokens its grammar has already accepted, so
  the grammar work leaves the step's critical path at no cost in exactness. The mask is then
  such a step's second host->device transfer, queued ahead of the masked sampler.

With speculative decoding on (num_speculative_tokens K > 0), a step in which some row carries
draft tokens runs the **spec_forward** graph of its bucket instead of the forward: the same model
pass, returning logits at each such row's last token and at each of its drafts ([B, K+1, V])
beside the usual [B, V] of the first of them, and after the sampler graph the **verify** graph of
B (jaxserve/sampling/rejection.py), which accepts drafts and adds the target's token. The other
rows of the step sample as always. Steps without drafts run exactly the graphs above; the
speculative ones are warm-up graphs too.

With LoRA on, the forward graph also reads the resident adapters (`lora_weights`, stacked in
max_loras fixed-shape slots, models/lora.py) and the step's slot of each token; loading an
adapter into a slot runs the **lora_write** graph, compiled at warm-up like the rest, before the
step that first uses it (the slot's arrays are that step's one extra host->device transfer).

The sampling stages are graphs of their own because they depend on B only and are about half of
a fused step's ops: built once per batch size instead of once per token bucket, the 17 warm-up
graphs of `jaxserve serve`'s defaults (21 with the masked samplers) compile in about half the
CPU time of the 9 fused ones they replace (benchmarks/README.md, start-up). Every warm-up graph compiles at start-up
(`warmup_keys`), so serving compiles nothing. A step in which some row names a pluggable sampler
runs another sampler graph of its B, compiled on first use for the sampler registry's current
version (so registering a sampler costs one sampler compile per batch size used).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxserve import sampling
from jaxserve.block_pool import NULL_PAGE
from jaxserve.code_maps import release_dropped_graphs
from jaxserve.graph_cache import ExportedGraphStore, describe_arguments, describe_callable, platform_fingerprint
from jaxserve.lora import LoRAAdapter, LoRAConfig
from jaxserve.models.lora import LoRAWeights, module_shapes, write_slot
from jaxserve.models.metadata import AttentionMetadata, KVCache, kv_page_shape
from jaxserve.models.quantization import weights_dtype
from jaxserve.pallas_kernels.ragged_paged_attention_gpu import TRITON_CALL_TARGETS
from jaxserve.kv_cache_dtype import KVCacheDtype, kv_cache_dtype as resolve_kv_cache_dtype
from jaxserve.parallel import (ParallelConfig, build_mesh, kv_cache_sharding, kv_scale_sharding, param_shardings,
                               replicated, shard_attention)
from jaxserve.precision import storage_dtype
from jaxserve.profiling import DEVICE_STEP, PREPARE, annotate
from jaxserve.sampling.core import (DEFAULT_SAMPLER, PackedValues, SamplingRow, SamplingTensors,
                              build_sampling_tensors, compute_logprobs, needs_penalties, penalise, sample_penalised)
from jaxserve.sampling.rejection import DraftInputs, verify
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams
from jaxserve.scheduler import SchedulerOutput
from jaxserve.structured_output import bitmask_words

logger = logging.getLogger(__name__)

BANNED_WIDTH = 16  # EOS + stop_token_ids suppressed while min_tokens is not reached


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInputs:
    """What the forward graph reads: the flat tokens of a step and where they go."""

    tokens: jax.Array            # [T] int32
    attn: AttentionMetadata
    # [B] int32, the last token of each sequence slot; in a speculative step [B, K+1]: each slot's
    # last token then its drafts (a slot with fewer repeats its last one)
    logits_indices: jax.Array
    lora_slots: jax.Array | None = None  # [T] int32, each token's LoRA slot (0: the base model); None: LoRA off


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    model: ModelInputs         # for the forward graph of the bucket
    sampling: SamplingTensors  # for the sampler graph of the batch size
    drafts: DraftInputs | None = None  # a speculative step's drafts, for the verify graph


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    # No bucket of 1: XLA turns a one-row KV scatter into a dynamic-update-slice and then copies the
    # whole cache around it (measured: 30x slower single-stream decode); one padded row is free.
    buckets, t = [], 2
    while t < max_num_batched_tokens:
        buckets.append(t)
        t *= 2
    return buckets + [max_num_batched_tokens]


# The smallest batch a sampler graph is built for (vLLM's TPU runner pads its sampling batch from 8
# too): smaller steps pad their logits to 8 rows, which costs the decode of one stream about
# nothing (the logits matmul reads the same weights) and saves compiling a sampler for 2 and 4.
MIN_SAMPLER_BATCH = 8


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Sequence-slot counts B of the step graphs: powers of two from MIN_SAMPLER_BATCH, capped."""
    buckets, b = [], min(MIN_SAMPLER_BATCH, max_num_seqs)
    while b < max_num_seqs:
        buckets.append(b)
        b *= 2
    return buckets + [max_num_seqs]


@dataclasses.dataclass
class StepResult:
    tokens: np.ndarray         # [n] sampled token per scheduled sequence (garbage where it does not sample)
    logprobs: np.ndarray       # [n]
    top_ids: np.ndarray        # [n, MAX_LOGPROBS]
    top_logprobs: np.ndarray   # [n, MAX_LOGPROBS]
    sampler_state: np.ndarray  # [n, SAMPLER_STATE_WIDTH], each row's pluggable-sampler state after its token
    bucket: tuple[int, int]
    seconds: float
    prepare_seconds: float  # of seconds, the host arrays' preparation (the rest is the device's)
    bitmask_seconds: float  # of the device's part, the host filling the structured-output bitmask meanwhile
    # Only when a scheduled request asked for prompt_logprobs: per flat token, the log-prob of the
    # next prompt token and the top ones ([T], [T, MAX_LOGPROBS], [T, MAX_LOGPROBS]).
    prompt_logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # Only in a speculative step: per scheduled sequence, the tokens a row with drafts emits
    # ([n, K+1]: its accepted drafts, then the target's token; `tokens` holds the first) and how
    # many drafts it accepted ([n], 0 for rows without drafts). A speculative row's `logprobs`
    # entry is not its token's (such rows never ask for logprobs).
    spec_tokens: np.ndarray | None = None
    num_accepted: np.ndarray | None = None


_GREEDY = SamplingParams(temperature=0.0)
# The sampling row of a sequence that samples nothing this step (a prefill chunk short of its end).
_GREEDY_ROW = SamplingRow(params=_GREEDY, seed=0, step=0, prompt_ids=(), output_ids=(), banned_ids=())
# Threads compiling warm-up graphs while the main thread lowers the next (XLA:CPU compiles one
# graph on one core); more than the cores only adds memory.
_COMPILE_THREADS = max(1, min(4, os.cpu_count() or 1))


# XLA:CPU's older loop emitters compile the sampling graphs with a third less CPU time, and run
# them as fast (SmolLM2's vocabulary, B = 8 and 64: 1.7 against 2.6 CPU-seconds; greedy and top-p
# steps within noise). The forward graphs keep the default emitters: without them the engine
# decoded 7-51% slower and prefilled 23% slower (benchmarks/README.md, start-up).
_CPU_COMPILER_OPTIONS = {"penalties": {"xla_cpu_use_fusion_emitters": False},
                         "verify": {"xla_cpu_use_fusion_emitters": False},
                         "sampler": {"xla_cpu_use_fusion_emitters": False},
                         "masked_sampler": {"xla_cpu_use_fusion_emitters": False}}
# The sampler graphs: the plain one, and the one of steps with a structured-output row, which also
# takes the step's token bitmask. Both have a variant per pluggable-sampler registry version.
SAMPLER_KINDS = ("sampler", "masked_sampler")


# jax.export keeps the GPU kernel's Triton custom calls only when told: they carry no
# compatibility guarantee across jax versions, and the exported-graph store keys every graph by
# the jax and jaxlib versions anyway (graph_cache.platform_fingerprint).
_UNCHECKED_CALLS = tuple(jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CALL_TARGETS)


def _with_sharding(shape: jax.ShapeDtypeStruct, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def _timed_compile(lowered: jax.stages.Lowered, options: dict | None):
    start = time.perf_counter()
    return lowered.compile(compiler_options=options), time.perf_counter() - start


# Pages of the probe cache step_memory_bytes compiles with: a step's own buffers do not depend
# on the page count (the cache is donated and updated in place; attention reads pages by index).
_PROBE_PAGES = 64


def step_memory_bytes(model, params, **runner_args) -> int:
    """Device bytes the most demanding step graph needs beyond its inputs (weights, cache):
    XLA's memory analysis of the compiled largest-bucket graphs (temporaries, and outputs not
    aliased to inputs), prompt_logprobs' forward ([T, V] logits) included. Compiles them
    against a small probe cache; the sampling graphs, which do not see the cache, land in the
    persistent compilation cache for warm-up to reuse."""
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    probe = ModelRunner(model, shapes, num_pages=_PROBE_PAGES, abstract=True, **runner_args)
    largest, batch = probe.buckets[-1], probe.batch_sizes[-1]
    keys = [forward_key(largest), forward_key(largest, with_prompt_logprobs=True), penalties_key(batch),
            sampler_key(batch), masked_sampler_key(batch)]
    if probe.num_speculative_tokens:
        keys += [spec_forward_key(largest), verify_key(batch)]
    return max(probe.memory_of(key) for key in keys)


class GraphKey(NamedTuple):
    """One compiled executable: ("forward" / "spec_forward", (T, B), with prompt_logprobs),
    ("penalties" / "verify", B, None), ("sampler" / "masked_sampler", B, sampler registry version
    or None for the default-only sampler) or ("lora_write", None, None)."""

    kind: str
    shape: Any
    variant: Any


def forward_key(bucket: tuple[int, int], with_prompt_logprobs: bool = False) -> GraphKey:
    return GraphKey("forward", bucket, with_prompt_logprobs)


def spec_forward_key(bucket: tuple[int, int], with_prompt_logprobs: bool = False) -> GraphKey:
    return GraphKey("spec_forward", bucket, with_prompt_logprobs)


def verify_key(batch_size: int) -> GraphKey:
    return GraphKey("verify", batch_size, None)


def penalties_key(batch_size: int) -> GraphKey:
    return GraphKey("penalties", batch_size, None)


def sampler_key(batch_size: int, version: int | None = None) -> GraphKey:
    return GraphKey("sampler", batch_size, version)


def masked_sampler_key(batch_size: int, version: int | None = None) -> GraphKey:
    return GraphKey("masked_sampler", batch_size, version)


LORA_WRITE = GraphKey("lora_write", None, None)


class ModelRunner:
    def __init__(self, model, params, *, num_pages: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, attention_fn, mesh: Mesh | None = None,
                 exported_graphs_dir: str | None = None, abstract: bool = False, lora: LoRAConfig | None = None,
                 num_speculative_tokens: int = 0, kv_cache_dtype: KVCacheDtype | None = None):
        """abstract: hold no arrays, only their shapes (params may be jax.ShapeDtypeStructs), to
        export the step graphs for another platform (`export`) without memory for weights or cache.
        lora: the adapter slots' shape (None: no LoRA in any graph). num_speculative_tokens: the
        most drafts a row carries in a step (0: no speculative graphs). kv_cache_dtype: what the KV
        pages store (None: the weights' dtype)."""
        cfg = model.config
        self.model = model
        self.kv_cache_dtype = kv_cache_dtype or resolve_kv_cache_dtype("auto", weights_dtype(params))
        # One code path for every mesh: a single device is a 1 x 1 mesh.
        self.mesh = mesh if mesh is not None else build_mesh(ParallelConfig())
        # bf16 layers are stored packed on CPU (precision.py)
        params = jax.eval_shape(model.storage_form, params) if abstract else model.storage_form(params)
        param_sharding = param_shardings(params, self.mesh, cfg)
        self.params = (jax.tree_util.tree_map(_with_sharding, params, param_sharding) if abstract
                       else jax.device_put(params, param_sharding))
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.num_speculative_tokens = num_speculative_tokens
        self.page_table_width = -(-max_model_len // block_size)
        self._packed_values = PackedValues()  # the sampling rows' fixed values, kept while the rows stay
        self.attention_fn = attention_fn
        self._attention = shard_attention(attention_fn, self.mesh, cfg)  # per model shard
        dtype = storage_dtype(weights_dtype(params))
        shape = kv_page_shape(cfg.num_layers, num_pages, block_size, cfg.num_kv_heads, cfg.head_dim)
        pages, scales = kv_cache_sharding(self.mesh, cfg), kv_scale_sharding(self.mesh, cfg)
        kv_sharding = (KVCache(k=pages, v=pages, k_scale=scales, v_scale=scales) if self.kv_cache_dtype.scaled
                       else KVCache(k=pages, v=pages))
        # Built in place on its devices: a sharded cache is never whole on one device.
        zeros = jax.jit(functools.partial(self.kv_cache_dtype.zeros, shape), out_shardings=kv_sharding)
        self.kv_cache = jax.tree_util.tree_map(_with_sharding, jax.eval_shape(zeros), kv_sharding) if abstract else zeros()
        self.lora_config = lora
        self.lora_weights: LoRAWeights | None = None
        if lora is not None:  # small (rank x features per slot): replicated on every shard, stored as the weights
            lora_zeros = jax.jit(lambda: LoRAWeights.zeros(cfg, lora.max_loras, lora.max_lora_rank, dtype),
                                 out_shardings=replicated(self.mesh))
            self.lora_weights = (jax.tree_util.tree_map(lambda x: _with_sharding(x, replicated(self.mesh)),
                                                        jax.eval_shape(lora_zeros)) if abstract else lora_zeros())
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.buckets = [(t, next(b for b in self.batch_sizes if b >= min(t, max_num_seqs)))
                        for t in token_buckets(max_num_batched_tokens)]
        # What warm-up builds: every bucket's forward graph, every batch size's penalties and default
        # sampler, with LoRA the slot write, and with speculation every bucket's spec_forward and
        # every batch size's verify graph.
        self.warmup_keys = ([forward_key(b) for b in self.buckets]
                            + [key(b) for b in self.batch_sizes
                               for key in (penalties_key, sampler_key, masked_sampler_key)]
                            + ([LORA_WRITE] if lora is not None else [])
                            + ([spec_forward_key(b) for b in self.buckets] + [verify_key(b) for b in self.batch_sizes]
                               if num_speculative_tokens else []))
        # Explicit shardings, the same for warm-up and serving: step inputs, logits and the
        # sampler's outputs are replicated, so every shard samples the same tokens.
        self._replicated = replicated(self.mesh)
        self._logits_type = lambda batch: jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32,
                                                               sharding=self._replicated)
        self._spec_logits_type = lambda batch: jax.ShapeDtypeStruct(
            (batch, num_speculative_tokens + 1, cfg.vocab_size), jnp.float32, sharding=self._replicated)
        self._bitmask_type = lambda batch: jax.ShapeDtypeStruct((batch, bitmask_words(cfg.vocab_size)), jnp.int32,
                                                                sharding=self._replicated)
        self._shardings = {
            "forward": dict(in_shardings=(param_sharding, kv_sharding) + (self._replicated,) * 3,
                            out_shardings=(kv_sharding, self._replicated, self._replicated)),
            "spec_forward": dict(in_shardings=(param_sharding, kv_sharding) + (self._replicated,) * 3,
                                 out_shardings=(kv_sharding,) + (self._replicated,) * 3),
            "penalties": dict(in_shardings=(self._replicated, self._replicated), out_shardings=self._replicated),
            "verify": dict(in_shardings=(self._replicated,) * 3, out_shardings=self._replicated),
            "sampler": dict(in_shardings=(self._replicated,) * 3, out_shardings=self._replicated),
            "masked_sampler": dict(in_shardings=(self._replicated,) * 4, out_shardings=self._replicated),
            "lora_write": dict(in_shardings=(self._replicated,) * 4, out_shardings=self._replicated),
        }
        # `samplers` (the pluggable ones a variant runs) is static and positional: jit refuses
        # keyword arguments once in_shardings is given.
        self._jitted = {
            "forward": jax.jit(self._forward, donate_argnums=(1,), **self._shardings["forward"]),
            "spec_forward": jax.jit(self._spec_forward, donate_argnums=(1,), **self._shardings["spec_forward"]),
            "verify": jax.jit(self._verify, **self._shardings["verify"]),
            "penalties": jax.jit(self._penalise, **self._shardings["penalties"]),
            "sampler": jax.jit(self._sample, static_argnums=(3,), **self._shardings["sampler"]),
            "masked_sampler": jax.jit(self._sample_masked, static_argnums=(4,), **self._shardings["masked_sampler"]),
            "lora_write": jax.jit(write_slot, donate_argnums=(0,), **self._shardings["lora_write"]),
        }
        self._exported = None if abstract else self._exported_store(exported_graphs_dir)
        self.num_graphs_from_store = 0  # warm-up graphs read back from the store instead of traced
        self._compiled: dict[GraphKey, object] = {}
        self.compile_seconds = 0.0
        self.compile_times: list[float] = []  # seconds of each executable built, in order

    # ---- device side -------------------------------------------------------------------------

    def _forward(self, params, kv_cache: KVCache, inputs: ModelInputs, prompt_targets=None,
                 lora_weights: LoRAWeights | None = None):
        # Families without LoRA support never see the keywords (the engine refuses LoRA for them).
        lora = {} if lora_weights is None else dict(lora=lora_weights, lora_slots=inputs.lora_slots)
        with jax.named_scope("model"):
            hidden, kv_cache = self.model.forward(params, inputs.tokens, kv_cache, inputs.attn,
                                                  attention_fn=self._attention, **lora)
        with jax.named_scope("logits"):
            # [B, V]; in a speculative step [B * (K+1), V]
            logits = self.model.compute_logits(params, hidden[inputs.logits_indices.reshape(-1)])
        if prompt_targets is None:
            return kv_cache, logits, None
        # The prompt_logprobs variant (compiled only when a request asks): every position scores
        # the prompt token after it.
        with jax.named_scope("prompt_logprobs"):
            all_logits = self.model.compute_logits(params, hidden)  # [T, V]
            prompt = compute_logprobs(all_logits, jnp.maximum(prompt_targets, 0), num_top_logprobs=MAX_LOGPROBS)
        return kv_cache, logits, prompt

    def _spec_forward(self, params, kv_cache: KVCache, inputs: ModelInputs, prompt_targets=None,
                      lora_weights: LoRAWeights | None = None):
        """The forward of a speculative step: also the logits at every draft, [B, K+1, V]; the
        first of each slot, [B, V], go to the sampler graphs as a plain step's do."""
        B, K1 = inputs.logits_indices.shape
        kv_cache, logits, prompt = self._forward(params, kv_cache, inputs, prompt_targets, lora_weights)
        logits = logits.reshape(B, K1, -1)  # [B, K+1, V]
        return kv_cache, logits[:, 0], prompt, logits

    def _verify(self, logits: jax.Array, sampling_tensors: SamplingTensors, drafts: DraftInputs):
        with jax.named_scope("verify"):
            return verify(logits, sampling_tensors, drafts)

    def _penalise(self, logits: jax.Array, sampling_tensors: SamplingTensors) -> jax.Array:
        with jax.named_scope("penalties"):
            return penalise(logits, sampling_tensors)

    def _sample(self, raw: jax.Array, penalised: jax.Array, sampling_tensors: SamplingTensors, samplers=()):
        with jax.named_scope("sampler"):
            return sample_penalised(raw, penalised, sampling_tensors, samplers=samplers)

    def _sample_masked(self, raw: jax.Array, penalised: jax.Array, sampling_tensors: SamplingTensors,
                       allowed: jax.Array, samplers=()):
        with jax.named_scope("sampler"):
            return sample_penalised(raw, penalised, sampling_tensors, samplers=samplers, allowed=allowed)

    @property
    def num_compiled(self) -> int:
        """Executables held: warm-up's, prompt_logprobs and pluggable-sampler variants included."""
        return len(self._compiled)

    @property
    def num_compiled_warmup(self) -> int:
        """How many of warm-up's graphs (`warmup_keys`) are compiled."""
        return sum(1 for key in self.warmup_keys if key in self._compiled)

    def _executable(self, key: GraphKey, args: tuple, samplers: sampling.Snapshot | None = None):
        """The executable of `key`, compiled from `args` (example arguments) on first use."""
        exe = self._compiled.get(key)
        if exe is None:
            if key.kind in SAMPLER_KINDS and key.variant is not None:
                # Samplers of older registry versions are never used again.
                stale = [k for k in self._compiled if k.kind in SAMPLER_KINDS and k.variant not in (None, key.variant)]
                for old in stale:
                    del self._compiled[old]
            start = time.perf_counter()
            exe = self._lower(key, args, samplers).compile(compiler_options=self._compiler_options(key))
            self._keep(key, exe, time.perf_counter() - start)
        return exe

    def _compiler_options(self, key: GraphKey) -> dict | None:
        on_cpu = self.mesh.devices.flat[0].platform == "cpu"
        return _CPU_COMPILER_OPTIONS.get(key.kind) if on_cpu else None

    def _keep(self, key: GraphKey, exe, seconds: float) -> None:
        self.compile_seconds += seconds
        self.compile_times.append(seconds)
        self._compiled[key] = exe
        logger.debug("compiled %s %s (%s) in %.2fs", key.kind, key.shape, key.variant, seconds)

    def _example_args(self, key: GraphKey) -> tuple:
        """Arguments of the right shapes for lowering `key`'s graph ahead of its first step."""
        if key.kind in ("forward", "spec_forward"):
            targets = np.zeros(key.shape[0], np.int32) if key.variant else None
            inputs = self._empty_inputs(key.shape, speculative=key.kind == "spec_forward").model
            return self.params, self.kv_cache, inputs, targets, self.lora_weights
        if key.kind == "lora_write":
            a, b = self._empty_slot()
            return self.lora_weights, np.int32(1), a, b
        logits, tensors = self._logits_type(key.shape), self._empty_inputs((key.shape, key.shape)).sampling
        if key.kind == "verify":
            return self._spec_logits_type(key.shape), tensors, self._empty_drafts(key.shape)
        if key.kind == "penalties":  # the one graph reading the token history, [B, max_model_len]
            history = np.full((key.shape, self.max_model_len), -1, np.int32)
            return logits, dataclasses.replace(tensors, token_history=history)
        if key.kind == "masked_sampler":
            return logits, logits, tensors, np.full(self._bitmask_type(key.shape).shape, -1, np.int32)
        return logits, logits, tensors

    def _lower(self, key: GraphKey, args: tuple, samplers: sampling.Snapshot | None = None) -> jax.stages.Lowered:
        """A graph lowered: the Python half of building it (XLA's compile() is the other)."""
        # The slot write is not exported: it is small, and the store's replay donates only the forward's cache.
        if self._exported is not None and key in self.warmup_keys and key != LORA_WRITE:
            lowered = self._lower_through_store(key, args)
            if lowered is not None:
                return lowered
        if key.kind not in SAMPLER_KINDS:
            return self._jitted[key.kind].lower(*args)
        return self._jitted[key.kind].lower(*args, samplers.pluggable if samplers is not None else ())

    def export(self, key: GraphKey, platforms: tuple[str, ...] | None = None,
               args: tuple | None = None) -> jax.export.Exported:
        """`key`'s graph lowered (not compiled) for `platforms` (default: the mesh's), e.g. for
        CUDA on a CPU: jax.export runs the whole lowering, Pallas kernels included, with no device.
        args: the example arguments (default: `_example_args(key)`)."""
        static = ((),) if key.kind in SAMPLER_KINDS else ()  # the sampler's `samplers`: none
        args = self._example_args(key) if args is None else args
        return jax.export.export(self._jitted[key.kind], platforms=platforms, disabled_checks=_UNCHECKED_CALLS)(
            *args, *static)

    def memory_of(self, key: GraphKey) -> int:
        """Bytes `key`'s compiled graph allocates beyond its arguments (XLA's memory analysis)."""
        stats = self._lower(key, self._example_args(key)).compile(
            compiler_options=self._compiler_options(key)).memory_analysis()
        return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes

    def _exported_store(self, folder: str | None) -> ExportedGraphStore | None:
        """The store of the warm-up graphs, or None where a graph could not be keyed safely
        (an attention function from outside jaxserve) or would be shared between processes."""
        attention = describe_callable(self.attention_fn)
        if folder is None or attention is None or jax.process_count() > 1:
            return None
        devices = list(self.mesh.devices.flat)
        identity = (f"{type(self.model).__module__}.{type(self.model).__qualname__}\0{self.model.config!r}\0"
                    f"{attention}\0{dict(self.mesh.shape)}\0{platform_fingerprint(devices)}")
        return ExportedGraphStore(folder, identity)

    def _lower_through_store(self, key: GraphKey, args: tuple) -> jax.stages.Lowered | None:
        """A warm-up graph lowered from its exported form (read from the store, or exported now
        and kept): it compiles to the same executable as the jitted function's, without tracing
        the model on a warm start. None when the graph cannot be exported."""
        stored = self._exported.key(f"{key.kind}\0{key.shape}\0{describe_arguments(*args)}")
        exported = self._exported.load(stored)
        if exported is not None:
            self.num_graphs_from_store += 1
        else:
            try:
                exported = self.export(key, args=args)
            except Exception as error:  # e.g. a kernel's custom call that export does not vouch for
                logger.info("step graphs are not exported (%s); each start traces them", error)
                self._exported = None
                return None
            self._exported.save(stored, exported)
        donate = dict(donate_argnums=(1,)) if key.kind in ("forward", "spec_forward") else {}
        # Named as the method it was exported from, so a profile's ops name their graph
        # (hlo_module "jit__forward", "jit__penalise", "jit__sample") on either path.
        def call(*a):
            return exported.call(*a)
        call.__name__ = call.__qualname__ = self._jitted[key.kind].__name__
        return jax.jit(call, **donate, **self._shardings[key.kind]).lower(*args)

    def warmup(self) -> None:
        """Build every warm-up graph now, so serving never compiles. The main thread lowers one
        graph while worker threads compile the ones before it (or read them from the persistent
        cache): XLA releases the GIL, lowering holds it. Measured on 2 vCPUs, warm: SmolLM2's 7
        graphs of `jaxserve run` in about 1.0 s instead of 1.85 s one after another."""
        todo = [key for key in self.warmup_keys if key not in self._compiled]
        release_dropped_graphs()
        with ThreadPoolExecutor(max_workers=_COMPILE_THREADS) as pool:
            pending = []
            for key in todo:
                start = time.perf_counter()
                lowered = self._lower(key, self._example_args(key))
                compiling = pool.submit(_timed_compile, lowered, self._compiler_options(key))
                pending.append((key, time.perf_counter() - start, compiling))
            for key, lower_seconds, future in pending:
                exe, compile_seconds = future.result()
                self._keep(key, exe, lower_seconds + compile_seconds)

    def bucket_for(self, num_tokens: int) -> tuple[int, int]:
        for bucket in self.buckets:
            if bucket[0] >= num_tokens:
                return bucket
        raise ValueError(f"a step of {num_tokens} tokens exceeds max_num_batched_tokens")

    # ---- host side ---------------------------------------------------------------------------

    def _empty_inputs(self, bucket: tuple[int, int], speculative: bool = False) -> StepInputs:
        """All-padding inputs of a bucket (example arguments for lowering its graphs)."""
        T, B = bucket
        logits_shape = (B, self.num_speculative_tokens + 1) if speculative else (B,)
        tensors = build_sampling_tensors([], B, self.max_model_len, BANNED_WIDTH)
        attn = AttentionMetadata(
            positions=np.zeros(T, np.int32), slot_mapping=np.zeros(T, np.int32),
            cu_q_lens=np.zeros(B + 1, np.int32), kv_lens=np.zeros(B, np.int32),
            page_table=np.full((B, self.page_table_width), NULL_PAGE, np.int32),
            num_seqs=np.int32(0))
        return StepInputs(model=ModelInputs(tokens=np.zeros(T, np.int32), attn=attn,
                                            logits_indices=np.zeros(logits_shape, np.int32),
                                            lora_slots=np.zeros(T, np.int32) if self.lora_config else None),
                          sampling=tensors)

    def _empty_drafts(self, batch_size: int) -> DraftInputs:
        return DraftInputs(tokens=np.zeros((batch_size, self.num_speculative_tokens), np.int32),
                           counts=np.zeros(batch_size, np.int32))

    def _empty_slot(self) -> tuple[dict, dict]:
        """An all-zero slot's contents (the lora_write graph's example arguments)."""
        cfg = self.model.config
        return {m: np.zeros((cfg.num_layers, i, self.lora_config.max_lora_rank), np.float32)
                for m, (i, o) in module_shapes(cfg).items()}, \
               {m: np.zeros((cfg.num_layers, self.lora_config.max_lora_rank, o), np.float32)
                for m, (i, o) in module_shapes(cfg).items()}

    def write_lora(self, slot: int, adapter: LoRAAdapter) -> None:
        """Put `adapter` in device slot `slot` (1..max_loras): one run of the lora_write graph,
        compiled at warm-up; the slot's arrays keep their shape, so no step graph changes."""
        cfg, rank = self.model.config, self.lora_config.max_lora_rank
        # float32 on the way in: the graph stores them as the weights are (packed bf16 on CPU)
        a, b = adapter.slot_arrays(module_shapes(cfg), cfg.num_layers, rank, np.float32)
        write = self._executable(LORA_WRITE, (self.lora_weights, np.int32(slot), a, b))
        self.lora_weights = write(self.lora_weights, np.int32(slot), a, b)

    def prepare(self, sched: SchedulerOutput, rows: list[SamplingRow | None],
                samplers: sampling.Snapshot | None = None) -> tuple[tuple[int, int], StepInputs]:
        """The flat ragged batch of a step, padded to its bucket (numpy only).

        Whole arrays at a time: one Python pass collects each sequence's few numbers (and its
        token, or its chunk's tokens), numpy builds positions, page table and slots from them,
        so 256 decoding sequences cost a fraction of a millisecond."""
        seqs = sched.seqs
        n = len(seqs)
        reqs = [seq.request for seq in seqs]
        # numpy converts a list about half again as fast as it iterates a generator.
        starts = np.array([seq.start for seq in seqs], np.int32)
        counts = np.array([seq.num_tokens for seq in seqs], np.int32)
        num_tokens = int(counts.sum())
        bucket = self.bucket_for(num_tokens)
        T, B = bucket
        S, W = self.block_size, self.page_table_width
        tokens = np.zeros(T, np.int32)
        if num_tokens == n:  # every sequence computes one token: a decode step, mostly of last tokens
            tokens[:n] = [(req.output_token_ids or req.prompt_token_ids)[-1] if seq.samples else req.token_at(seq.start)
                          for req, seq in zip(reqs, seqs)]
        elif n:
            tokens[:num_tokens] = list(itertools.chain.from_iterable(
                (req.token_at(seq.start),) if seq.num_tokens == 1
                else (req.token_at(seq.start), *seq.draft_token_ids) if seq.draft_token_ids
                else req.token_ids_between(seq.start, seq.start + seq.num_tokens) for req, seq in zip(reqs, seqs)))
        cu_q_lens = np.zeros(B + 1, np.int32)
        np.cumsum(counts, out=cu_q_lens[1:n + 1])
        cu_q_lens[n + 1:] = num_tokens
        seq_of_token = np.repeat(np.arange(n, dtype=np.int32), counts)  # [num_tokens]
        positions = np.zeros(T, np.int32)
        positions[:num_tokens] = starts[seq_of_token] + np.arange(num_tokens, dtype=np.int32) - cu_q_lens[seq_of_token]
        kv_lens = np.zeros(B, np.int32)
        kv_lens[:n] = starts + counts
        page_table = np.full((B, W), NULL_PAGE, np.int32)
        if n and sched.block_table is not None:  # the scheduler's rows, gathered
            # Only the columns this step reads (positions < kv_len): at 256 short sequences that
            # is a few of the context's hundreds, and the gather was most of prepare's time.
            used = -(-int(kv_lens[:n].max()) // S)
            page_table[:n, :used] = sched.block_table[np.array([req.block_row for req in reqs], np.intp), :used]
        elif n:  # a schedule made by hand: each sequence's pages flattened, then scattered to (row, column)
            num_pages = np.fromiter((len(req.block_ids) for req in reqs), np.int32, n)
            pages = np.fromiter(itertools.chain.from_iterable(req.block_ids for req in reqs), np.int32,
                                int(num_pages.sum()))
            row_of_page = np.repeat(np.arange(n, dtype=np.int32), num_pages)
            first_page = np.cumsum(num_pages) - num_pages
            page_table[row_of_page, np.arange(len(pages), dtype=np.int32) - first_page[row_of_page]] = pages
        slot_mapping = np.zeros(T, np.int32)  # padding tokens write to the null page's slot 0
        pos = positions[:num_tokens]
        slot_mapping[:num_tokens] = page_table[seq_of_token, pos // S] * S + pos % S
        drafts = None
        if self.num_speculative_tokens and any(seq.draft_token_ids for seq in seqs):
            logits_indices, drafts = self._draft_inputs(seqs, cu_q_lens, B)
        else:
            logits_indices = np.zeros(B, np.int32)
            logits_indices[:n] = cu_q_lens[1:n + 1] - 1
        tensors = build_sampling_tensors([r or _GREEDY_ROW for r in rows], B, self.max_model_len, BANNED_WIDTH,
                                         samplers.samplers if samplers is not None else None, self._packed_values)
        attn = AttentionMetadata(positions=positions, slot_mapping=slot_mapping, cu_q_lens=cu_q_lens,
                                 kv_lens=kv_lens, page_table=page_table, num_seqs=np.int32(n))
        lora_slots = None
        if self.lora_config is not None:  # padding tokens run the base model's all-zero slot
            lora_slots = np.zeros(T, np.int32)
            lora_slots[:num_tokens] = np.fromiter((req.lora_slot for req in reqs), np.int32, n)[seq_of_token]
        return bucket, StepInputs(model=ModelInputs(tokens=tokens, attn=attn, logits_indices=logits_indices,
                                                    lora_slots=lora_slots),
                                  sampling=tensors, drafts=drafts)

    def _draft_inputs(self, seqs, cu_q_lens: np.ndarray, B: int) -> tuple[np.ndarray, DraftInputs]:
        """A speculative step's logits indices [B, K+1] (each slot's last token, then its drafts)
        and its drafts. A slot's drafts are the last tokens of its chunk."""
        K, n = self.num_speculative_tokens, len(seqs)
        counts = np.zeros(B, np.int32)
        counts[:n] = [len(seq.draft_token_ids) for seq in seqs]
        tokens = np.zeros((B, K), np.int32)
        for i, seq in enumerate(seqs):
            if seq.draft_token_ids:
                tokens[i, :counts[i]] = seq.draft_token_ids
        last = np.zeros(B, np.int32)
        last[:n] = cu_q_lens[1:n + 1] - 1 - counts[:n]
        indices = last[:, None] + np.minimum(np.arange(K + 1, dtype=np.int32)[None, :], counts[:, None])
        return indices.astype(np.int32), DraftInputs(tokens=tokens, counts=counts)

    def _prompt_targets(self, sched: SchedulerOutput, num_tokens: int) -> np.ndarray | None:
        """[T] the prompt token after each flat position of requests wanting prompt_logprobs, else -1."""
        # A list comprehension, not a generator: any() over one costs twice as much per row.
        if not any([s.request.params.prompt_logprobs is not None for s in sched.seqs]):
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

    def execute(self, sched: SchedulerOutput, rows: list[SamplingRow | None],
                fill_bitmask: Callable[[np.ndarray], None] | None = None,
                observe: Callable[[tuple[int, int], ModelInputs], None] | None = None) -> StepResult:
        """One step. fill_bitmask: writes the structured-output bitmask of the step's constrained
        rows into the [B, words] int32 array it is given (all ones: the other rows stay
        unconstrained), called while the forward graph runs; None when no row has a constraint.
        observe: called with the step's bucket and (host) model inputs before its graphs are
        queued (a draft model's mirror, jaxserve/speculative.py)."""
        start = time.perf_counter()
        for slot, adapter in sched.lora_writes:  # adapters this step's rows are the first to use
            self.write_lora(slot, adapter)
        # Only a step in which some row names a pluggable sampler pays for (and compiles) them.
        pluggable = any([r is not None and (r.sampler or r.params.selected_sampler) != DEFAULT_SAMPLER for r in rows])
        samplers = sampling.snapshot() if pluggable else None
        with annotate(PREPARE):
            bucket, inputs = self.prepare(sched, rows, samplers)
            targets = self._prompt_targets(sched, bucket[0])
        prepared = time.perf_counter()
        if observe is not None:
            observe(bucket, inputs.model)
        out, prompt, bitmask_seconds, verified = self.run_graphs(bucket, inputs, targets, samplers, fill_bitmask)
        n = len(sched.seqs)
        tokens, spec_tokens, num_accepted = out.tokens[:n], None, None
        if verified is not None:  # rows with drafts emit what verification chose
            spec_tokens, num_accepted = verified[0][:n], verified[1][:n]
            tokens = np.where(inputs.drafts.counts[:n] > 0, spec_tokens[:, 0], tokens)
        return StepResult(tokens=tokens, logprobs=out.logprobs[:n], top_ids=out.top_ids[:n],
                          top_logprobs=out.top_logprobs[:n],
                          sampler_state=out.sampler_state[:n], bucket=bucket,
                          seconds=time.perf_counter() - start, prepare_seconds=prepared - start,
                          bitmask_seconds=bitmask_seconds, prompt_logprobs=prompt,
                          spec_tokens=spec_tokens, num_accepted=num_accepted)

    def run_graphs(self, bucket: tuple[int, int], inputs: StepInputs, targets: np.ndarray | None = None,
                   samplers: sampling.Snapshot | None = None,
                   fill_bitmask: Callable[[np.ndarray], None] | None = None):
        """One step's graphs on prepared (host) inputs -> (sampler output, prompt logprobs or None,
        seconds the host spent in fill_bitmask, verification's (tokens [B, K+1], accepted [B]) or
        None) on the host."""
        speculative = inputs.drafts is not None
        forward = self._executable((spec_forward_key if speculative else forward_key)(bucket, targets is not None),
                                   (self.params, self.kv_cache, inputs.model, targets, self.lora_weights))
        batch, logits_type = bucket[1], self._logits_type(bucket[1])
        penalties = (self._executable(penalties_key(batch), (logits_type, inputs.sampling))
                     if needs_penalties(inputs.sampling) else None)
        # The sampler never reads the token history: it always gets the [B, 1] of a step without penalties.
        sampling = dataclasses.replace(inputs.sampling, token_history=inputs.sampling.token_history[:, :1])
        version = samplers.version if samplers is not None else None
        if fill_bitmask is None:
            sampler = self._executable(sampler_key(batch, version), (logits_type, logits_type, sampling), samplers)
        else:
            sampler = self._executable(masked_sampler_key(batch, version),
                                       (logits_type, logits_type, sampling, self._bitmask_type(batch)), samplers)
        verify_drafts = (self._executable(verify_key(batch), (self._spec_logits_type(batch), sampling, inputs.drafts))
                         if speculative else None)
        bitmask_seconds = 0.0
        with annotate(DEVICE_STEP):
            history = inputs.sampling.token_history if penalties is not None else None
            # The one host->device transfer of the step's inputs.
            model, sampling, history, targets, drafts = jax.device_put(
                (inputs.model, sampling, history, targets, inputs.drafts), self._replicated)
            # Each graph is queued behind the one before it: the host waits only for the last.
            if speculative:
                self.kv_cache, logits, prompt, spec_logits = forward(self.params, self.kv_cache, model, targets,
                                                                     self.lora_weights)
            else:
                self.kv_cache, logits, prompt = forward(self.params, self.kv_cache, model, targets, self.lora_weights)
            if penalties is not None:
                penalised = penalties(logits, dataclasses.replace(sampling, token_history=history))
            else:
                penalised = logits
            if fill_bitmask is None:
                out = sampler(logits, penalised, sampling)
            else:
                # Filled while the device runs the graphs queued above. Padding rows allow
                # everything: they are greedy and ignored.
                filling = time.perf_counter()
                allowed = np.full(self._bitmask_type(batch).shape, -1, np.int32)
                fill_bitmask(allowed)
                bitmask_seconds = time.perf_counter() - filling
                out = sampler(logits, penalised, sampling, jax.device_put(allowed, self._replicated))
            verified = verify_drafts(spec_logits, sampling, drafts) if speculative else None
            out, prompt, verified = jax.device_get((out, prompt, verified))  # the step's one device->host transfer
            return out, prompt, bitmask_seconds, verified
