"""Per-request state on the host: tokens, progress through the KV cache, pages, outputs.

As in vLLM V1 there is no prefill or decode phase: a request only has ``num_computed_tokens``
catching up with ``num_tokens`` (prompt + outputs); the scheduler decides how many to compute.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


# A tuple, not a set: `in` compares by identity in C, where hashing an Enum member calls Python
# (Request.is_finished runs for every sequence of every step).
_FINISHED = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


# Slots: every step reads a dozen of its fields for each running request; they sit in the object,
# not in a separate dict values array (fewer cache lines per request after a step's device work).
@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                        # every request samples from its own key: fold_in(key(seed), step)
    max_tokens: int                  # params.max_tokens, or what still fits in max_model_len
    eos_token_ids: tuple[int, ...]
    prompt: str | None = None
    group_id: str = ""               # the user's request id (differs from request_id when n > 1)
    leader: "Request | None" = None  # n > 1: siblings wait until the leader's prompt pages are cached
    sample_index: int = 0            # which of the n completions this is
    arrival_time: float = field(default_factory=time.monotonic)
    sampler_name: str | None = None  # params.selected_sampler, read once
    sampling_row: object = None      # the sampler's view of it (sampler.SamplingRow), kept by the engine
    matcher: object = None           # structured output: its grammar's llguidance matcher, at its output so far
    lora: object = None              # its LoRA adapter (jaxserve.lora.LoRAAdapter), None for the base model
    # The prefix cache's root for its pages: None for the base model, else unique to its adapter,
    # so a page computed under one adapter is never found by a request of another (or of none).
    prefix_root: object = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0     # tokens whose K/V are in the cache
    num_cached_tokens: int = 0       # of those, how many came from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_row: int | None = None     # its row of the scheduler's BlockTable while it holds pages
    block_hashes: list = field(default_factory=list)  # chained hashes of the full pages computed so far
    lora_slot: int = 0               # the device slot of its adapter while it holds one (0: none, the base)
    num_preemptions: int = 0
    logprobs: list[dict] | None = None
    prompt_logprobs: list[dict | None] | None = None  # one per prompt token; the first is always None
    cumulative_logprob: float = 0.0
    sampler_state: object = None     # a pluggable sampler's row state (mirostat's mu), [SAMPLER_STATE_WIDTH] f32
    # Speculative decoding: the draft tokens proposed for its next step (jaxserve/speculative.py),
    # which the scheduler computes after its last token; () when it does not speculate.
    draft_token_ids: tuple[int, ...] = ()
    stop_reason: int | str | None = None
    final_text: str | None = None    # the text cut at a stop string, once one is found
    scheduled_time: float | None = None  # when the scheduler first admitted it (its queue time ends)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> list[int]:
        """all_token_ids()[start:end], copying only those (not the whole context)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def finish_reason(self) -> str | None:
        return self.status._value_ if self.status in _FINISHED else None

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISHED
