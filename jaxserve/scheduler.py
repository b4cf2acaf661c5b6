"""The scheduler: which requests compute how many tokens in the next step.

There is no prefill phase and no decode phase (vLLM V1's design): each request has
``num_computed_tokens`` catching up with ``num_tokens``, and one token budget per step is spent on
running requests first (a decode costs one token), then on waiting ones, whose prompts are cut
into chunks that fit. When the KV pages run out, the newest running request is preempted: its
pages go back to the pool and it is recomputed later, outputs kept. Nothing is dropped. A
request with a LoRA adapter is admitted once its adapter has a device slot (jaxserve/lora_manager.py);
until then the requests behind it go first. A decoding request carrying draft tokens
(``Request.draft_token_ids``, jaxserve/speculative.py) computes its last token and its drafts
in one chunk, as far as the budget and the pages allow; what verification rejects is taken back
after the step (``ScheduledSeq.reject``), its KV slots overwritten later.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from jaxserve.block_pool import BlockPool, BlockTable, chain_hashes
from jaxserve.config import SchedulerConfig
from jaxserve.lora_manager import LoRAManager
from jaxserve.request import Request, RequestStatus


class ScheduledSeq:
    """One request's part of a step. A plain class with slots: the scheduler makes one per running
    request every step, and a dataclass's generated __init__ with __post_init__ costs a third more."""
    __slots__ = ("request", "start", "num_tokens", "samples", "draft_token_ids")

    def __init__(self, request: Request, start: int, num_tokens: int, samples: bool | None = None,
                 draft_token_ids: tuple[int, ...] = ()):
        self.request = request
        self.start = start            # num_computed_tokens before this step
        self.num_tokens = num_tokens  # tokens computed this step
        # The step reaches the last known token, so its logits make a new one (None: work it out).
        self.samples = start + num_tokens == request.num_tokens if samples is None else samples
        self.draft_token_ids = draft_token_ids  # speculative drafts, the last of num_tokens

    def __repr__(self) -> str:
        return (f"ScheduledSeq({self.request.request_id!r}, start={self.start}, num_tokens={self.num_tokens}, "
                f"samples={self.samples}, drafts={self.draft_token_ids})")

    def reject(self, num_accepted: int) -> None:
        """After verification: only the last token and the accepted drafts stay computed."""
        self.num_tokens -= len(self.draft_token_ids) - num_accepted


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # The scheduler's BlockTable.pages, rows indexed by Request.block_row (None: a schedule made by
    # hand, whose requests' block_ids are read instead).
    block_table: np.ndarray | None = None
    # LoRA slots to fill before this step runs: (slot, adapter), in order.
    lora_writes: list = field(default_factory=list)
    # Prompt tokens the step computes (prompt chunks, and prompts recomputed after a preemption);
    # counted while scheduling, where each request's prompt is read anyway.
    num_prompt_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, loras: LoRAManager | None = None):
        self.config = config
        self.pool = pool
        self.loras = loras
        self.block_size = pool.block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # Requests holding pages are the running ones, and one waiting request being admitted
        # while fewer than max_num_seqs run: max_num_seqs rows suffice.
        self.block_table = BlockTable(config.max_num_seqs, -(-config.max_model_len // self.block_size))

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_table=self.block_table.pages)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if self.loras is not None and out.seqs:  # a step that runs nothing leaves them for the next
            out.lora_writes = self.loras.take_writes()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Runs for every running request every step: the common case (a decode whose page has
        # room) takes no call beyond the ScheduledSeq.
        S, running, seqs = self.block_size, self.running, out.seqs
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            computed, num_prompt = req.num_computed_tokens, len(req.prompt_token_ids)
            remaining = num_prompt + len(req.output_token_ids) - computed
            drafts = req.draft_token_ids
            if drafts:  # a decode (remaining 1) with speculative drafts
                n = self._fit_drafts(req, min(1 + len(drafts), budget))
                drafts = drafts[:n - 1]
            else:
                n = remaining if remaining <= budget else budget
            if computed + n > len(req.block_ids) * S:  # it needs another page
                while not self._reserve_pages(req, n):
                    victim = running.pop()  # the newest request gives way
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is req:
                        return budget
            seqs.append(ScheduledSeq(req, computed, n, n == remaining or bool(drafts), drafts))
            if computed < num_prompt:  # a decode computes no prompt token
                out.num_prompt_tokens += min(computed + n, num_prompt) - computed
            budget -= n
            i += 1
        return budget

    def _fit_drafts(self, req: Request, n: int) -> int:
        """Tokens of a speculative decode (its last token and drafts, at most n) whose pages can be
        had without preempting anyone: drafts are a guess, worth no other request's progress."""
        needed = -(-(req.num_computed_tokens + n) // self.block_size) - len(req.block_ids)
        free = self.pool.num_free_pages
        if needed > free:
            n = max(1, (len(req.block_ids) + free) * self.block_size - req.num_computed_tokens)
        return n

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self._waits_for_leader(req) or not self._holds_lora_slot(req):
                deferred.append(self.waiting.popleft())
                continue
            # prompt_logprobs needs every prompt position computed, so such requests skip the cache.
            if req.num_computed_tokens == 0 and req.params.prompt_logprobs is None:
                self._take_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve_pages(req, n):
                self._drop_pages(req)
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            if req.scheduled_time is None:  # a preempted request's second admission does not count
                req.scheduled_time = time.monotonic()
            self.running.append(req)
            start = req.num_computed_tokens
            out.seqs.append(ScheduledSeq(req, start, n))
            out.num_prompt_tokens += max(0, min(start + n, req.num_prompt_tokens) - start)
            budget -= n
        self.waiting.extendleft(reversed(deferred))

    @staticmethod
    def _waits_for_leader(req: Request) -> bool:
        # n > 1: siblings start once the leader's prompt pages are in the prefix cache, so they share them.
        leader = req.leader
        return (leader is not None and not leader.is_finished
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    def _holds_lora_slot(self, req: Request) -> bool:
        """Whether the request's adapter (if any) has a device slot for it, taking one if free."""
        if req.lora is None or req.lora_slot:
            return True
        slot = self.loras.acquire(req.lora)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def _take_cached_prefix(self, req: Request) -> None:
        pages, hashes = self.pool.lookup_prefix(req.all_token_ids(), req.prefix_root)
        self.pool.take(pages)
        req.block_ids = list(pages)
        if pages:
            self.block_table.write(req, 0, pages)
        req.block_hashes = list(hashes)
        req.num_computed_tokens = len(pages) * self.block_size
        req.num_cached_tokens = req.num_computed_tokens

    def _reserve_pages(self, req: Request, num_new_tokens: int) -> bool:
        needed = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(req.block_ids)
        if needed <= 0:
            return True
        pages = self.pool.allocate(needed)
        if pages is None:
            return False
        self.block_table.write(req, len(req.block_ids), pages)
        req.block_ids.extend(pages)
        return True

    def _drop_pages(self, req: Request) -> None:
        if req.lora_slot:  # its adapter's slot goes with its pages (held again when it is readmitted)
            self.loras.release(req.lora_slot)
            req.lora_slot = 0
        self.pool.release(req.block_ids)
        self.block_table.release(req)
        req.block_ids = []
        req.block_hashes = []
        req.num_computed_tokens = 0
        req.num_cached_tokens = 0

    def _preempt(self, req: Request) -> None:
        self._drop_pages(req)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress and publish pages that became full to the prefix cache."""
        S, caching = self.block_size, self.pool.enable_prefix_caching
        for seq in out.seqs:
            req = seq.request
            computed = req.num_computed_tokens = req.num_computed_tokens + seq.num_tokens
            if not caching or computed < (len(req.block_hashes) + 1) * S:
                continue  # no page filled since its last hash: most decode steps
            # Accepted drafts are computed before the output processor appends them: hash only
            # known tokens (their pages are published at the next step).
            num_full = min(computed, len(req.prompt_token_ids) + len(req.output_token_ids)) // S
            start = len(req.block_hashes)
            if num_full > start:
                parent = req.block_hashes[-1] if req.block_hashes else req.prefix_root
                tokens = req.token_ids_between(start * S, num_full * S)
                req.block_hashes.extend(chain_hashes(tokens, S, parent))
                self.pool.register_full_pages(req.block_ids, req.block_hashes, start)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request (any state): its pages go back to the pool, hashes kept for reuse."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._drop_pages(req)
        req.status = status
