"""Speculative decoding: which running requests speculate, their draft tokens (n-gram prompt
lookup, or a draft model), and after each step what verification kept, with the counts /metrics
shows.

The engine calls ``propose`` before scheduling (drafts go on ``Request.draft_token_ids``, which
the scheduler computes after the request's last token), ``draft`` once the step is scheduled,
and ``settle`` after the step. The device half, accepting drafts and drawing the target's token,
is jaxserve/sampling/rejection.py.

A draft model (``DraftModelSpeculator``) keeps its own paged KV cache under the target's page
ids: every step the target computes is also run through the draft model (the **mirror** graph,
K/V written, no logits), so the draft cache holds whatever the target's holds, prefix-cache
hits and recomputation after preemption included, with no bookkeeping of its own. Its drafts
come from the **propose** graph, k greedy steps of the draft model in one `lax.fori_loop`, run
after scheduling (the scheduler has by then given the drafts their pages and trimmed them to
the budget). Greedy drafts are certain (q one-hot), so verification is the n-gram one and the
emitted tokens are distributed as the target alone would sample them.

The mirror computes a drafting row's last token and first k - 1 drafts again, after propose has
already written the same K/V: that is k of the draft's tokens per row per step spent on having no
per-request state. Skipping them would leave only the k-th draft to write.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.block_pool import NULL_PAGE
from jaxserve.code_maps import release_dropped_graphs
from jaxserve.config import SpeculativeConfig
from jaxserve.models.metadata import AttentionMetadata, KVCache
from jaxserve.request import Request
from jaxserve.runner import _UNCHECKED_CALLS, GraphKey, ModelInputs, ModelRunner, StepResult
from jaxserve.sampling.core import argmax
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


class Speculator:
    """What every proposer shares: how many drafts a request may take, and settling a step."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.stats = SpecDecodeStats(accepted_per_position=[0] * config.num_speculative_tokens)

    def draft_budget(self, req: Request) -> int:
        """Drafts the request may carry in its next step (0: it decodes one token)."""
        num_tokens = req.num_tokens
        # At most what the request may still emit beyond the target's own token, and within the context.
        k = min(self.config.num_speculative_tokens, req.max_tokens - len(req.output_token_ids) - 1,
                self.max_model_len - num_tokens - 1)
        if k <= 0 or req.num_computed_tokens != num_tokens - 1 or not can_speculate(req):
            return 0
        return k

    def propose(self, running: list[Request]) -> None:
        raise NotImplementedError

    def draft(self, sched: SchedulerOutput) -> None:
        """Once the step is scheduled: fill in drafts that needed the schedule (none by default)."""

    def mirror(self, bucket: tuple[int, int], inputs: ModelInputs) -> None:
        """The step's model inputs, as the target runs them (a draft model computes them too)."""

    def warmup(self) -> None:
        """Build the proposer's graphs ahead of serving (none by default)."""

    @property
    def num_compiled(self) -> int:
        """The proposer's own executables (none by default)."""
        return 0

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


class NgramSpeculator(Speculator):
    """Prompt lookup: drafts copied from where the request's last n-gram occurred before."""

    def propose(self, running: list[Request]) -> None:
        """Set every running request's drafts for the next step (() where it does not speculate)."""
        c = self.config
        for req in running:
            k = self.draft_budget(req)
            if not k:
                req.draft_token_ids = ()
                continue
            tokens = np.fromiter(itertools.chain(req.prompt_token_ids, req.output_token_ids), np.int64, req.num_tokens)
            req.draft_token_ids = tuple(ngram_drafts(tokens, c.ngram_min, c.ngram_max, k).tolist())


# Placeholder drafts: the scheduler fits them into the budget and the pages before the draft model runs.
_PLACEHOLDER = 0


class DraftModelSpeculator(Speculator):
    """Drafts from a smaller model of the same vocabulary, k greedy tokens a step (module docstring).

    draft_runner: a ModelRunner of the draft model over the target's page count, page size and
    step shapes; only its params, cache, mesh and buckets are used (its own step graphs never
    run: the mirror and propose graphs below are the draft model's)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft_runner: ModelRunner):
        super().__init__(config, max_model_len)
        self.runner = draft_runner
        r = draft_runner
        param_sharding = jax.tree_util.tree_map(lambda x: x.sharding, r.params)
        kv_sharding = jax.tree_util.tree_map(lambda x: x.sharding, r.kv_cache)
        rep = r._replicated
        self._mirror_fn = jax.jit(self._mirror, donate_argnums=(1,),
                                  in_shardings=(param_sharding, kv_sharding, rep, rep), out_shardings=kv_sharding)
        self._propose_fn = jax.jit(self._propose, donate_argnums=(1,),
                                   in_shardings=(param_sharding, kv_sharding) + (rep,) * 5,
                                   out_shardings=(kv_sharding, rep))
        # A step of one sequence still proposes for two rows: a one-row KV scatter is slow on XLA:CPU
        # (runner.token_buckets).
        self.batch_sizes = sorted({max(2, b) for b in r.batch_sizes})
        self._compiled: dict[GraphKey, object] = {}
        self.compile_seconds = 0.0

    # ---- device side -------------------------------------------------------------------------

    def _mirror(self, params, kv_cache: KVCache, tokens: jax.Array, attn: AttentionMetadata) -> KVCache:
        """The target's step through the draft model: its K/V written where the target's go."""
        with jax.named_scope("draft_mirror"):
            _, kv_cache = self.runner.model.forward(params, tokens, kv_cache, attn, attention_fn=self.runner._attention)
        return kv_cache

    def _propose(self, params, kv_cache: KVCache, last_tokens, starts, counts, page_table, num_seqs):
        """k greedy steps of the draft model: row b feeds its last token (position starts[b]) and
        then each draft it makes; steps past counts[b] write nowhere. -> (cache, drafts [B, K])."""
        B, W = page_table.shape
        K, S = self.config.num_speculative_tokens, self.runner.block_size
        rows = jnp.arange(B, dtype=jnp.int32)
        real = rows < num_seqs
        cu_q_lens = jnp.minimum(jnp.arange(B + 1, dtype=jnp.int32), num_seqs)

        def step(j, carry):
            kv, tokens, drafts = carry
            positions = starts + j
            pages = jnp.take_along_axis(page_table, jnp.minimum(positions // S, W - 1)[:, None], axis=1)[:, 0]
            writes = real & (j < counts)
            attn = AttentionMetadata(positions=positions, slot_mapping=jnp.where(writes, pages * S + positions % S, 0),
                                     cu_q_lens=cu_q_lens, kv_lens=jnp.where(real, positions + 1, 0),
                                     page_table=page_table, num_seqs=num_seqs)
            # Tied to the loop counter, the weights look loop-variant to XLA, which otherwise hoists
            # bf16 -> f32 converts (the [V, D] embedding's) out of the loop and reads float32 copies
            # every step (benchmarks/README.md, multi-step decode).
            params_j, _ = jax.lax.optimization_barrier((params, j))
            hidden, kv = self.runner.model.forward(params_j, tokens, kv, attn, attention_fn=self.runner._attention)
            tokens = argmax(self.runner.model.compute_logits(params_j, hidden))
            return kv, tokens, drafts.at[:, j].set(tokens)

        with jax.named_scope("draft_propose"):
            # Up to the most drafts a row keeps (fewer near max_tokens or a full budget).
            kv_cache, _, drafts = jax.lax.fori_loop(0, jnp.max(counts), step,
                                                    (kv_cache, last_tokens, jnp.zeros((B, K), jnp.int32)))
        return kv_cache, drafts

    def _executable(self, key: GraphKey, args: tuple):
        exe = self._compiled.get(key)
        if exe is None:
            start = time.perf_counter()
            exe = self._lower(key, args).compile()
            self._keep(key, exe, time.perf_counter() - start)
        return exe

    def _jitted(self, key: GraphKey):
        return self._mirror_fn if key.kind == "draft_mirror" else self._propose_fn

    def _lower(self, key: GraphKey, args: tuple):
        return self._jitted(key).lower(*args)

    def export(self, key: GraphKey, platforms: tuple[str, ...] | None = None) -> jax.export.Exported:
        """`key`'s graph lowered for `platforms` (as ModelRunner.export: `jaxserve lower`)."""
        return jax.export.export(self._jitted(key), platforms=platforms, disabled_checks=_UNCHECKED_CALLS)(
            *self._example_args(key))

    def _keep(self, key: GraphKey, exe, seconds: float) -> None:
        self._compiled[key] = exe
        self.compile_seconds += seconds

    def _example_args(self, key: GraphKey) -> tuple:
        r = self.runner
        if key.kind == "draft_mirror":
            T, B = key.shape
            attn = AttentionMetadata(
                positions=np.zeros(T, np.int32), slot_mapping=np.zeros(T, np.int32),
                cu_q_lens=np.zeros(B + 1, np.int32), kv_lens=np.zeros(B, np.int32),
                page_table=np.full((B, r.page_table_width), NULL_PAGE, np.int32), num_seqs=np.int32(0))
            return r.params, r.kv_cache, np.zeros(T, np.int32), attn
        B = key.shape
        zeros = np.zeros(B, np.int32)
        return (r.params, r.kv_cache, zeros, zeros, zeros,
                np.full((B, r.page_table_width), NULL_PAGE, np.int32), np.int32(0))

    @property
    def warmup_keys(self) -> list[GraphKey]:
        return ([GraphKey("draft_mirror", b, None) for b in self.runner.buckets]
                + [GraphKey("draft_propose", b, None) for b in self.batch_sizes])

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def warmup(self) -> None:
        """Compile every mirror and propose graph (lowered here, compiled by worker threads)."""
        todo = [key for key in self.warmup_keys if key not in self._compiled]
        release_dropped_graphs()
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = []
            for key in todo:
                start = time.perf_counter()
                lowered = self._lower(key, self._example_args(key))
                pending.append((key, start, pool.submit(lowered.compile)))
            for key, start, future in pending:
                self._keep(key, future.result(), time.perf_counter() - start)

    # ---- host side ---------------------------------------------------------------------------

    def propose(self, running: list[Request]) -> None:
        """Placeholder drafts, as many as each request may take: the draft model fills in those
        the scheduler keeps (`draft`)."""
        for req in running:
            req.draft_token_ids = (_PLACEHOLDER,) * self.draft_budget(req)

    def draft(self, sched: SchedulerOutput) -> None:
        """Run the propose graph for the scheduled rows carrying drafts; their drafts become its tokens."""
        drafting = [seq for seq in sched.seqs if seq.draft_token_ids]
        if not drafting:
            return
        n = len(drafting)
        B = next(b for b in self.batch_sizes if b >= n)
        reqs = [seq.request for seq in drafting]
        last_tokens = np.zeros(B, np.int32)
        last_tokens[:n] = [req.token_at(seq.start) for req, seq in zip(reqs, drafting)]
        starts = np.zeros(B, np.int32)
        starts[:n] = [seq.start for seq in drafting]
        counts = np.zeros(B, np.int32)
        counts[:n] = [len(seq.draft_token_ids) for seq in drafting]
        page_table = np.full((B, self.runner.page_table_width), NULL_PAGE, np.int32)
        page_table[:n] = sched.block_table[np.fromiter((req.block_row for req in reqs), np.intp, n)]
        r = self.runner
        args = (r.params, r.kv_cache, last_tokens, starts, counts, page_table, np.int32(n))
        propose = self._executable(GraphKey("draft_propose", B, None), args)
        inputs = jax.device_put(args[2:], r._replicated)
        r.kv_cache, drafts = propose(r.params, r.kv_cache, *inputs)
        drafts = np.asarray(jax.device_get(drafts))
        for i, seq in enumerate(drafting):
            seq.draft_token_ids = seq.request.draft_token_ids = tuple(drafts[i, :counts[i]].tolist())

    def mirror(self, bucket: tuple[int, int], inputs: ModelInputs) -> None:
        """Queue the target's step through the draft model (asynchronous: nothing waits for it)."""
        r = self.runner
        args = (r.params, r.kv_cache, inputs.tokens, inputs.attn)
        mirror = self._executable(GraphKey("draft_mirror", bucket, None), args)
        tokens, attn = jax.device_put((inputs.tokens, inputs.attn), r._replicated)
        r.kv_cache = mirror(r.params, r.kv_cache, tokens, attn)
