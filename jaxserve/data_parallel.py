"""Data parallelism: several engine replicas, one per row of the ("data", "model") mesh, behind
the single-engine interface. Each request lives on one replica (the least busy when it arrives);
a step steps every replica that has work, so their batches run side by side.
"""
from __future__ import annotations

import dataclasses

from jaxserve.engine import EngineStats, LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

_SUMMED = ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits", "prompt_tokens",
           "generation_tokens", "num_preemptions", "num_compiled_graphs", "compile_seconds", "steps",
           "step_seconds_total", "spec_decode_num_drafts", "spec_decode_num_draft_tokens",
           "spec_decode_num_accepted_tokens")


class DataParallelEngine:
    def __init__(self, replicas: list[LLMEngine]):
        if not replicas:
            raise ValueError("data parallelism needs at least one replica")
        self.replicas = replicas
        first = replicas[0]
        self.tokenizer = first.tokenizer
        self.max_model_len = first.max_model_len
        self.vocab_size = first.vocab_size
        self.profiler = first.profiler  # JAX's profiler is process-wide: one serves all replicas
        # One grammar cache for all (they share the tokenizer): a constraint AsyncEngine compiled
        # ahead is there for whichever replica takes the request.
        self.grammars = first.grammars
        for replica in replicas[1:]:
            replica.grammars = first.grammars
        self._owner: dict[str, LLMEngine] = {}

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, **kwargs) -> None:
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        replica = min(self.replicas, key=lambda r: len(r.groups))
        replica.add_request(request_id, prompt, params, **kwargs)
        self._owner[request_id] = replica

    # Every replica has its own device slots; an adapter is read once and registered with all.

    @property
    def lora_enabled(self) -> bool:
        return self.replicas[0].lora_enabled

    def read_lora(self, lora_request):
        return self.replicas[0].read_lora(lora_request)

    def add_lora(self, lora_request, adapter=None) -> None:
        adapter = adapter if adapter is not None else self.read_lora(lora_request)
        for replica in self.replicas:
            replica.add_lora(lora_request, adapter)

    def remove_lora(self, lora_name: str) -> bool:
        return all([replica.remove_lora(lora_name) for replica in self.replicas])

    def list_loras(self):
        return self.replicas[0].list_loras()

    def abort_request(self, request_id: str) -> None:
        replica = self._owner.pop(request_id, None)
        if replica is not None:
            replica.abort_request(request_id)

    @property
    def max_num_seqs(self) -> int:
        """Sequences running at once over all replicas."""
        return sum(r.max_num_seqs for r in self.replicas)

    def has_unfinished_requests(self) -> bool:
        return any(r.has_unfinished_requests() for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for replica in self.replicas:
            if replica.has_unfinished_requests():
                outputs.extend(replica.step())
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    @property
    def stats(self) -> EngineStats:
        """The replicas' statistics added up (KV usage averaged)."""
        parts = [r.stats for r in self.replicas]
        total = EngineStats(**{name: sum(getattr(p, name) for p in parts) for name in _SUMMED})
        return dataclasses.replace(total, kv_cache_usage=sum(p.kv_cache_usage for p in parts) / len(parts),
                                   last_step_seconds=max(p.last_step_seconds for p in parts),
                                   step_seconds=[s for p in parts for s in p.step_seconds],
                                   compile_times=[t for p in parts for t in p.compile_times],
                                   spec_decode_accepted_per_position=[
                                       sum(counts) for counts in zip(*(p.spec_decode_accepted_per_position
                                                                       for p in parts))])

    def refresh_stats(self) -> EngineStats:
        for replica in self.replicas:
            replica.refresh_stats()
        return self.stats
