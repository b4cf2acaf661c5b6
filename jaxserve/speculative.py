"""Speculative decoding on the host: which running requests speculate, their draft tokens (n-gram
prompt lookup), and after each step what verification kept, with the counts /metrics shows.

The engine calls ``propose`` before scheduling (drafts go on ``Request.draft_token_ids``, which
the scheduler computes after the request's last token) and ``settle`` after the step. The device
half, accepting drafts and drawing the target's token, is jaxserve/sampling/rejection.py.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from jaxserve.config import SpeculativeConfig
from jaxserve.request import Request
from jaxserve.runner import StepResult
from jaxserve.sampling.core import row_values
from jaxserve.sampling.registry import DEFAULT_SAMPLER
from jaxserve.scheduler import SchedulerOutput

_NO_PENALTY = (0.0, 0.0, 1.0)  # presence, frequency, repetition: row_values' last three when off


def ngram_drafts(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> np.ndarray:
    """Prompt lookup: the up-to-k tokens that followed the first earlier occurrence of the
    longest suffix n-gram of `tokens` (n from n_max down to n_min); empty if none occurs."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        # Windows of tokens[:-1]: each has a token after it, and the suffix itself is not one.
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:L - 1], n)  # [L - n, n]
        hits = np.flatnonzero((windows == tokens[L - n:]).all(axis=1))
        if hits.size:
            start = hits[0] + n
            return tokens[start:start + k]
    return tokens[:0]


def can_speculate(req: Request) -> bool:
    """Whether verification decides the request's tokens as its sampler would. Not for rows with
    penalties or min_tokens bans (each draft would change the next position's penalties), a
    grammar, a pluggable sampler, or logprobs to report: those decode one token a step."""
    p = req.params
    return (req.matcher is None and req.logprobs is None and p.prompt_logprobs is None
            and req.sampler_name == DEFAULT_SAMPLER and len(req.output_token_ids) >= p.min_tokens
            and row_values(p)[4:] == _NO_PENALTY)


@dataclasses.dataclass
class SpecDecodeStats:
    """Counters for /metrics (vLLM's spec_decode_* names)."""
    num_drafts: int = 0            # rows verified with drafts, over all steps
    num_draft_tokens: int = 0      # drafts proposed and verified
    num_accepted_tokens: int = 0   # of those, accepted
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)  # [K], accepted at position j


class NgramSpeculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats(accepted_per_position=[0] * config.num_speculative_tokens)

    def propose(self, running: list[Request]) -> None:
        """Set every running request's drafts for the next step (() where it does not speculate)."""
        c = self.config
        for req in running:
            num_tokens = req.num_tokens
            # At most what the request may still emit beyond the target's own token, and within the context.
            k = min(c.num_speculative_tokens, req.max_tokens - len(req.output_token_ids) - 1,
                    self.max_model_len - num_tokens - 1)
            if k <= 0 or req.num_computed_tokens != num_tokens - 1 or not can_speculate(req):
                req.draft_token_ids = ()
                continue
            tokens = np.fromiter(itertools.chain(req.prompt_token_ids, req.output_token_ids), np.int64, num_tokens)
            req.draft_token_ids = tuple(ngram_drafts(tokens, c.ngram_min, c.ngram_max, k).tolist())

    def settle(self, sched: SchedulerOutput, result: StepResult) -> None:
        """After a speculative step: rejected drafts leave the schedule (their KV slots are
        overwritten later, no page is given back mid-request), and the counts move on."""
        s = self.stats
        for seq, accepted in zip(sched.seqs, result.num_accepted.tolist()):
            if seq.draft_token_ids:
                seq.reject(accepted)
                s.num_drafts += 1
                s.num_draft_tokens += len(seq.draft_token_ids)
                s.num_accepted_tokens += accepted
                for j in range(accepted):
                    s.accepted_per_position[j] += 1
