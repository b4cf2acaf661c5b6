"""The engine loop: requests in, one scheduled and executed step at a time, outputs out.

``LLMEngine.add_request()`` runs the InputProcessor's checks (input_processor.py) and queues the
request; a bad one is refused there, before it touches any state, so it cannot disturb the
requests already running. ``LLMEngine.step()`` is schedule -> run -> process outputs: everything
host-side and per-token (stop conditions, detokenisation, logprobs, the outputs' shapes) is the
OutputProcessor's (output_processor.py); the device sees one step's graphs per step. A step with
structured-output rows hands the runner a filler for their token bitmask, which it calls while
the device runs the forward graph (runner.py). With speculative decoding the speculator
(speculative.py) proposes drafts before scheduling and takes back the rejected ones after.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field

import jax

from jaxserve.block_pool import BlockPool
from jaxserve.config import CacheConfig, CompileConfig, SchedulerConfig, SpeculativeConfig
from jaxserve.engine_args import EngineArgs
from jaxserve.input_processor import InputProcessor, RequestValidationError
from jaxserve.kv_cache_dtype import KVCacheDtype, kv_cache_dtype
from jaxserve.lora import LoRAAdapter, LoRAConfig, LoRARequest
from jaxserve.lora_manager import LoRAManager
from jaxserve.models.quantization import param_bytes, weights_dtype
from jaxserve.output_processor import OutputProcessor, RequestState
from jaxserve.outputs import RequestOutput
from jaxserve.profiling import PROCESS_OUTPUTS, SCHEDULE, Profiler, annotate
from jaxserve.request import Request, RequestStatus
from jaxserve.runner import BANNED_WIDTH, ModelRunner, StepResult, step_memory_bytes
from jaxserve.sampling.core import SamplingRow, row_values
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, SchedulerOutput
from jaxserve.speculative import DraftModelSpeculator, NgramSpeculator, Speculator
from jaxserve.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 1 << 30


@dataclass
class StepRecord:
    """What one step did (kept for tests, debugging and benchmarks/host_overhead.py)."""
    index: int
    scheduled: dict[str, int]          # request id -> tokens computed this step
    bucket: tuple[int, int]
    preempted: list[str]
    seconds: float                     # the runner's part: prepare + device
    # Where the step's wall time went: the host phases and the device wait between them.
    schedule_seconds: float = 0.0      # scheduling and the sampling rows
    prepare_seconds: float = 0.0       # the padded host arrays of the step
    device_seconds: float = 0.0        # transfer in, the graphs, transfer out
    bitmask_seconds: float = 0.0       # of device_seconds, the host filling the structured-output bitmask
    outputs_seconds: float = 0.0       # tokens into requests, detokenising, stops, outputs, stats

    @property
    def host_seconds(self) -> float:
        return self.schedule_seconds + self.prepare_seconds + self.outputs_seconds


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0       # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0          # of those, tokens served from it
    prompt_tokens: int = 0              # prompt tokens computed (recomputation after preemption included)
    generation_tokens: int = 0
    num_preemptions: int = 0
    num_compiled_graphs: int = 0
    compile_seconds: float = 0.0
    compile_times: list[float] = field(default_factory=list)  # each step graph's compile seconds
    steps: int = 0
    step_seconds_total: float = 0.0
    last_step_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # recent steps, for histograms
    # Speculative decoding (speculative.SpecDecodeStats): rows that carried drafts, drafts, accepted ones.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_accepted_per_position: list[int] = field(default_factory=list)


def enable_persistent_compilation_cache(path: str) -> None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def kv_page_bytes(model_config, block_size: int, kv_dtype: KVCacheDtype) -> int:
    """Bytes of one KV page: K and V of block_size tokens in every layer, 8-bit pages' scales included."""
    c = model_config
    return block_size * kv_dtype.bytes_per_token(c.num_layers, c.num_kv_heads, c.head_dim)


def check_draft_model(target_config, draft, name: str) -> None:
    """A draft model must be loaded and speak the target's vocabulary (its drafts are token ids)."""
    if draft is None:
        raise ValueError(f"--speculative-model {name!r}: the draft model was not loaded (pass draft= to LLMEngine)")
    if draft.config.vocab_size != target_config.vocab_size:
        raise ValueError(f"--speculative-model {name!r}: the draft model's vocabulary ({draft.config.vocab_size} "
                         f"tokens) differs from the target's ({target_config.vocab_size}); a draft model must "
                         f"share the target's tokenizer")


def accelerator_memory_limit() -> int | None:
    """Bytes the first device's allocator may hold, or None on a CPU (no such limit)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return stats.get("bytes_limit") if stats else None


def kv_pages_for(model_config, cache: CacheConfig, kv_dtype: KVCacheDtype, max_model_len: int, max_num_seqs: int,
                 param_bytes: int, memory_limit: int | None = None, step_bytes: int = 0,
                 draft_page_bytes: int = 0) -> int:
    """Pages from kv_cache_memory, else from accelerator memory (memory_limit x
    gpu_memory_utilization, less the weights and the largest step's own memory), else sized to
    fit on CPU. A smaller kv_dtype gets more pages from the same bytes. draft_page_bytes: a
    draft model's page beside each of the target's (speculative.py), paid from the same bytes."""
    page_bytes = kv_page_bytes(model_config, cache.block_size, kv_dtype) + draft_page_bytes
    budget = cache.kv_cache_memory
    if budget is None and memory_limit is not None:
        budget = int(memory_limit * cache.gpu_memory_utilization) - param_bytes - step_bytes
        if budget < page_bytes:
            raise ValueError(f"no device memory left for the KV cache: {memory_limit / 2**30:.2f} GiB x "
                             f"gpu_memory_utilization {cache.gpu_memory_utilization} leaves "
                             f"{budget / 2**30:.2f} GiB after {param_bytes / 2**30:.2f} GiB of weights and "
                             f"{step_bytes / 2**30:.2f} GiB for a step's own buffers; lower max_num_seqs or "
                             f"max_num_batched_tokens, or raise gpu_memory_utilization")
    elif budget is None:
        enough = max_num_seqs * -(-max_model_len // cache.block_size) * page_bytes
        budget = min(enough, CPU_DEFAULT_KV_BYTES)
    return max(2, budget // page_bytes + 1)  # + page 0, the padding page


class LLMEngine:
    def __init__(self, loaded, *, cache: CacheConfig, scheduler: SchedulerConfig, compile: CompileConfig,
                 attention_fn, seed: int = 0, profiler_dir: str | None = None, mesh=None,
                 structured_outputs_timeout: float = EngineArgs.structured_outputs_timeout,
                 lora: LoRAConfig | None = None, speculative: SpeculativeConfig | None = None, draft=None):
        """draft: the loaded draft model (models/loader.LoadedModel) when speculative names one."""
        if lora is not None and not getattr(loaded.model, "supports_lora", False):
            raise ValueError(f"LoRA adapters are not supported for {loaded.config.architecture} models")
        if speculative is not None and speculative.draft_model is not None:
            check_draft_model(loaded.config, draft, speculative.draft_model)
        self.model_config = loaded.config
        self.max_model_len = scheduler.max_model_len
        self.vocab_size = loaded.config.vocab_size
        kv_dtype = kv_cache_dtype(cache.kv_cache_dtype, weights_dtype(loaded.params))
        shape = dict(block_size=cache.block_size, max_model_len=scheduler.max_model_len,
                     max_num_seqs=scheduler.max_num_seqs, max_num_batched_tokens=scheduler.max_num_batched_tokens,
                     attention_fn=attention_fn, mesh=mesh, lora=lora, kv_cache_dtype=kv_dtype,
                     num_speculative_tokens=speculative.num_speculative_tokens if speculative else 0)
        memory_limit = accelerator_memory_limit() if cache.kv_cache_memory is None else None
        # On an accelerator the cache gets what the weights and the largest step leave, the
        # step's share measured by XLA on its compiled graphs, not guessed.
        # (The target's graphs only: a draft model's mirror and propose buffers are not counted yet.)
        step_bytes = step_memory_bytes(loaded.model, loaded.params, **shape) if memory_limit is not None else 0
        weight_bytes, draft_page_bytes = param_bytes(loaded.params), 0
        if draft is not None:  # the draft's cache has a page for each of the target's, sized by one budget
            draft_kv_dtype = kv_cache_dtype(cache.kv_cache_dtype, weights_dtype(draft.params))
            draft_page_bytes = kv_page_bytes(draft.config, cache.block_size, draft_kv_dtype)
            weight_bytes += param_bytes(draft.params)
        num_pages = kv_pages_for(loaded.config, cache, kv_dtype, scheduler.max_model_len,
                                 scheduler.max_num_seqs, weight_bytes, memory_limit, step_bytes, draft_page_bytes)
        self.pool = BlockPool(num_pages, cache.block_size, cache.enable_prefix_caching)
        self.loras = LoRAManager(lora, loaded.config) if lora is not None else None
        self.scheduler = Scheduler(scheduler, self.pool, self.loras)
        self.runner = ModelRunner(loaded.model, loaded.params, num_pages=num_pages, **shape,
                                  exported_graphs_dir=os.path.join(compile.resolved_cache_dir(), "jaxserve-exported"))
        self.speculator: Speculator | None = None
        if draft is not None:
            draft_runner = ModelRunner(draft.model, draft.params, num_pages=num_pages,
                                       **{**shape, "kv_cache_dtype": draft_kv_dtype, "lora": None,
                                          "num_speculative_tokens": 0})
            self.speculator = DraftModelSpeculator(speculative, scheduler.max_model_len, draft_runner)
        elif speculative is not None:
            self.speculator = NgramSpeculator(speculative, scheduler.max_model_len)
        if speculative is not None:
            logger.info("speculative decoding: %d drafts a step from %s", speculative.num_speculative_tokens,
                        f"the draft model {draft.name}" if draft is not None
                        else f"n-gram prompt lookup (n {speculative.ngram_max}..{speculative.ngram_min})")
        logger.info("KV cache: %d pages of %d tokens, %s (%.2f GiB)%s", num_pages, cache.block_size, kv_dtype.name,
                    num_pages * kv_page_bytes(loaded.config, cache.block_size, kv_dtype) / 2**30,
                    f", a step's own buffers {step_bytes / 2**30:.2f} GiB" if step_bytes else "")
        self.stats = EngineStats()
        self.step_log: deque[StepRecord] = deque(maxlen=10_000)
        self._rng = random.Random(seed)
        self._eos = tuple(loaded.config.eos_token_ids)
        self.profiler = Profiler(profiler_dir)
        if compile.warmup:
            self.runner.warmup()
            if self.speculator is not None:
                self.speculator.warmup()
        self.tokenizer = loaded.tokenizer  # last: a GGUF's loads in the background until here (models/loader.py)
        self.input_processor = InputProcessor(self.tokenizer, vocab_size=self.vocab_size,
                                              max_model_len=self.max_model_len, eos_token_ids=self._eos,
                                              banned_width=BANNED_WIDTH, num_pages=num_pages,
                                              block_size=cache.block_size)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len, self.scheduler.finish)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self._eos, timeout_s=structured_outputs_timeout)

    @property
    def groups(self) -> dict[str, RequestState]:
        """The requests not finished yet, by the user's request id."""
        return self.output_processor.states

    # ---- requests ------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    *, prompt_text: str | None = None, lora_request: LoRARequest | None = None) -> None:
        """Queue a request; raises RequestValidationError (a ValueError naming the field, touching
        nothing) when it cannot be served. lora_request: the adapter it runs with (registered on
        first use; a bad one raises LoRAAdapterError, a ValueError)."""
        params = params if params is not None else SamplingParams()
        if request_id in self.groups:
            raise RequestValidationError(f"request id {request_id!r} is already in use", param="request_id")
        token_ids, prompt_text, max_tokens = self.input_processor.process(prompt, params, prompt_text)
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        # Last: a new adapter is registered here (as vLLM's LLM does on its first use).
        adapter = self._lora_manager().resolve(lora_request) if lora_request is not None else None
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        children = []
        for i in range(params.n):
            child_seed = seed if i == 0 else hash((seed, i)) & 0x7FFFFFFF
            children.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=token_ids, params=params, seed=child_seed, max_tokens=max_tokens,
                eos_token_ids=self._eos, prompt=prompt_text, group_id=request_id, sample_index=i,
                leader=children[0] if i > 0 else None,
                logprobs=[] if params.logprobs is not None else None,
                sampler_name=params.selected_sampler,
                prompt_logprobs=[None] * len(token_ids) if params.prompt_logprobs is not None else None,
                matcher=self.grammars.matcher(grammar) if grammar is not None else None,
                lora=adapter, prefix_root=None if adapter is None else ("lora", adapter.uid)))
        self.output_processor.add(request_id, prompt_text, token_ids, children)
        for child in children:
            self.scheduler.add(child)

    def abort_request(self, request_id: str) -> None:
        for req in self.output_processor.abort(request_id):
            if not req.is_finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    # ---- LoRA adapters -------------------------------------------------------------------------

    def _lora_manager(self, param: str = "lora_request") -> LoRAManager:
        if self.loras is None:
            raise RequestValidationError("LoRA is not enabled: start the engine with enable_lora=True "
                                         "(--enable-lora)", param=param)
        return self.loras

    @property
    def lora_enabled(self) -> bool:
        return self.loras is not None

    def read_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """An adapter's files read and checked against this model, changing nothing (so any thread
        may read one ahead of add_lora). Raises LoRAAdapterError."""
        return self._lora_manager().read(lora_request)

    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> None:
        """Register an adapter for requests to name; raises LoRAAdapterError (a ValueError) naming
        what is wrong with it. It takes a device slot when a request first runs with it."""
        self._lora_manager().add(lora_request, adapter)

    def remove_lora(self, lora_name: str) -> bool:
        """Unregister an adapter (requests already queued with it finish with it); False if unknown."""
        return self._lora_manager().remove(lora_name)

    def list_loras(self) -> list[LoRARequest]:
        return self.loras.list() if self.loras is not None else []

    @property
    def max_num_seqs(self) -> int:
        """Sequences one step runs at most."""
        return self.scheduler.config.max_num_seqs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests that advanced (finished ones last time)."""
        started = time.perf_counter()
        with annotate(SCHEDULE):
            if self.speculator is not None:
                self.speculator.propose(self.scheduler.running)
            sched = self.scheduler.schedule()
            if not sched.seqs:
                return []
            if self.speculator is not None:
                self.speculator.draft(sched)
            rows, constrained = self._sampling_rows(sched)
            fill_bitmask = (functools.partial(self.grammars.fill_bitmask, rows=constrained)
                            if constrained else None)
        scheduled = time.perf_counter()
        result = self.runner.execute(sched, rows, fill_bitmask,
                                     self.speculator.mirror if self.speculator is not None else None)
        executed = time.perf_counter()
        with annotate(PROCESS_OUTPUTS):
            if result.num_accepted is not None:
                self.speculator.settle(sched, result)
            self.scheduler.update_after_step(sched)
            outputs = self.output_processor.process(sched, result)
            record = self._record(sched, result)
        record.schedule_seconds = scheduled - started
        record.prepare_seconds = result.prepare_seconds
        record.device_seconds = executed - scheduled - result.prepare_seconds
        record.bitmask_seconds = result.bitmask_seconds
        record.outputs_seconds = time.perf_counter() - executed
        return outputs

    def _sampling_rows(self, sched: SchedulerOutput) -> tuple[list[SamplingRow | None], list]:
        """The step's sampling rows (None where a sequence does not sample), and its constrained
        rows as (index, matcher): what fills the structured-output bitmask. The runner calls that
        filler while the device runs the forward graph: the matchers stand where the last step's
        tokens left them, and nothing advances them until this step's outputs come back. With
        no constrained row the step runs the plain sampler graph.

        One pass, with the common row (kept, past min_tokens) updated inline: it runs for every
        sequence of every step."""
        rows: list[SamplingRow | None] = []
        constrained = []
        for i, seq in enumerate(sched.seqs):
            if not seq.samples:
                rows.append(None)
                continue
            req = seq.request
            row, num_out = req.sampling_row, len(req.output_token_ids)
            if row is None or num_out < req.params.min_tokens:
                row = self._sampling_row(req)
            else:
                row.step, row.banned_ids, row.sampler_state = num_out, (), req.sampler_state
            rows.append(row)
            if req.matcher is not None:
                constrained.append((i, req.matcher))
        return rows, constrained

    def _sampling_row(self, req: Request) -> SamplingRow:
        """The request's row for this step: one object per request, its per-step fields updated
        (the output ids are the request's own list)."""
        p, num_out, row = req.params, len(req.output_token_ids), req.sampling_row
        banned = ()
        if num_out < p.min_tokens:
            banned = tuple(p.stop_token_ids or ()) + (() if p.ignore_eos else req.eos_token_ids)
        if row is None:
            row = req.sampling_row = SamplingRow(
                params=p, seed=req.seed, step=num_out, prompt_ids=req.prompt_token_ids,
                output_ids=req.output_token_ids, banned_ids=banned, sampler_state=req.sampler_state,
                values=row_values(p), sampler=req.sampler_name)
        else:
            row.step, row.banned_ids, row.sampler_state = num_out, banned, req.sampler_state
        return row

    def _record(self, sched: SchedulerOutput, result: StepResult) -> StepRecord:
        s = self.stats
        s.steps += 1
        s.step_seconds_total += result.seconds
        s.last_step_seconds = result.seconds
        s.step_seconds.append(result.seconds)
        del s.step_seconds[:-1000]
        accepted = result.num_accepted.tolist() if result.num_accepted is not None else None
        # Counted by the scheduler: after a CPU step each request's prompt list read here is a cache miss.
        s.prompt_tokens += sched.num_prompt_tokens
        sampled = sum([seq.samples for seq in sched.seqs])
        # Each sampling row makes one token, and a speculative one its accepted drafts besides.
        s.generation_tokens += sampled + (sum(a for a, seq in zip(accepted, sched.seqs) if seq.samples)
                                          if accepted else 0)
        self.refresh_stats()
        record = StepRecord(
            index=s.steps, scheduled={seq.request.request_id: seq.num_tokens for seq in sched.seqs},
            bucket=result.bucket, preempted=[r.request_id for r in sched.preempted], seconds=result.seconds)
        self.step_log.append(record)
        return record

    def refresh_stats(self) -> EngineStats:
        """Bring the gauges up to date between steps (an abort frees pages without a step)."""
        s = self.stats
        s.num_running = len(self.scheduler.running)
        s.num_waiting = len(self.scheduler.waiting)
        s.kv_cache_usage = self.pool.usage
        s.prefix_cache_queries = self.pool.prefix_queries
        s.prefix_cache_hits = self.pool.prefix_hits
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_compiled_graphs = self.runner.num_compiled + (self.speculator.num_compiled if self.speculator else 0)
        s.compile_seconds = self.runner.compile_seconds
        s.compile_times = list(self.runner.compile_times)
        if self.speculator is not None:
            spec = self.speculator.stats
            s.spec_decode_num_drafts, s.spec_decode_num_draft_tokens = spec.num_drafts, spec.num_draft_tokens
            s.spec_decode_num_accepted_tokens = spec.num_accepted_tokens
            s.spec_decode_accepted_per_position = list(spec.accepted_per_position)
        return s
