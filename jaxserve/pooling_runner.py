"""The pooling runner: embeds ragged batches of whole texts, one compiled graph per token bucket.

Texts are packed in order into steps of at most `max_num_batched_tokens` tokens and
`max_num_seqs` texts; a text never spans two steps (every token of it must see every other). A
step's texts are flattened into one array of T tokens with per-text offsets, T padded to a token
bucket (powers of two from 16, capped by the budget) and the text count to the bucket's B, so
XLA compiles one graph per bucket, all at warm-up: serving compiles nothing. The graph runs the
model and pools each text's token states into one vector (models/pooling.py), [B, D] float32.

- Encoders (`encode`, e.g. BertEncoder) attend within each text: a block-diagonal mask over the
  flat batch (models/layers.py `segment_attention`).
- Decoders (`DecoderLM.forward`) run their ordinary prefill over a scratch paged KV cache with
  pages enough for one step, written and read within the step (causal: a text's last token has
  seen all of it). Page 0 takes the padding tokens' writes, as in generation.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.block_pool import NULL_PAGE
from jaxserve.code_maps import release_dropped_graphs
from jaxserve.models.metadata import AttentionMetadata, KVCache, kv_page_shape
from jaxserve.models.pooling import pool
from jaxserve.models.quantization import weights_dtype
from jaxserve.precision import storage_dtype

logger = logging.getLogger(__name__)

MIN_TOKEN_BUCKET = 16
_COMPILE_THREADS = 2  # XLA:CPU compiles a graph on one core, releasing the GIL meanwhile


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PoolingBatch:
    """One step's texts, flattened (T tokens over B text slots), on the host or the device."""

    tokens: jax.Array           # [T] int32
    positions: jax.Array        # [T] int32, each token's position in its text
    segment_ids: jax.Array      # [T] int32, each token's text; padding tokens hold B (dropped by pooling)
    starts: jax.Array           # [B] int32, each text's first token in the flat batch
    lengths: jax.Array          # [B] int32, tokens of each text (0: a padding slot)
    attn: AttentionMetadata | None  # decoders only: where the prefill writes and reads its K/V


def pooling_buckets(max_num_batched_tokens: int, max_num_seqs: int) -> list[tuple[int, int]]:
    """(T, B) of each graph: T powers of two from MIN_TOKEN_BUCKET up to the budget; B the text
    slots T tokens can hold, a power of two capped at max_num_seqs."""
    sizes, t = [], MIN_TOKEN_BUCKET
    while t < max_num_batched_tokens:
        sizes.append(t)
        t *= 2
    sizes.append(max_num_batched_tokens)
    return [(t, min(max_num_seqs, 1 << (min(t, max_num_seqs) - 1).bit_length())) for t in sizes]


def plan_steps(lengths: list[int], max_tokens: int, max_texts: int) -> list[tuple[int, int]]:
    """[start, end) ranges of texts that share a step, in order: each step within both budgets."""
    steps, start, tokens = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and (tokens + n > max_tokens or i - start == max_texts):
            steps.append((start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(lengths):
        steps.append((start, len(lengths)))
    return steps


class PoolingRunner:
    def __init__(self, model, params, *, pooling_type: str, max_num_batched_tokens: int, max_num_seqs: int,
                 max_input_tokens: int, block_size: int, attention_fn):
        """max_input_tokens: the longest text (<= max_num_batched_tokens); block_size: pages of the
        decoders' scratch cache."""
        if max_input_tokens > max_num_batched_tokens:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must hold the longest input "
                             f"({max_input_tokens} tokens): a text is never split between steps")
        cfg = model.config
        self.model = model
        self.pooling_type = pooling_type
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.hidden_size = cfg.hidden_size
        self.is_decoder = not hasattr(model, "encode")
        self.attention_fn = attention_fn
        self.params = model.storage_form(params)  # bf16 layers stored packed on CPU (precision.py)
        self.block_size = block_size
        self.page_table_width = -(-max_input_tokens // block_size)
        self.scratch = None
        if self.is_decoder:
            # Enough pages for a full step: each text rounds up to whole pages, page 0 pads.
            num_pages = -(-max_num_batched_tokens // block_size) + max_num_seqs + 1
            shape = kv_page_shape(cfg.num_layers, num_pages, block_size, cfg.num_kv_heads, cfg.head_dim)
            dtype = storage_dtype(weights_dtype(params))
            self.scratch = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
        self.buckets = pooling_buckets(max_num_batched_tokens, max_num_seqs)
        self._jitted = jax.jit(self._embed, donate_argnums=(1,))
        self._compiled: dict[tuple[int, int], object] = {}
        self.compile_times: list[float] = []

    # ---- device side -------------------------------------------------------------------------

    def _embed(self, params, scratch: KVCache | None, batch: PoolingBatch):
        """-> (the scratch cache, pooled [B, D] float32)."""
        with jax.named_scope("model"):
            if self.is_decoder:
                hidden, scratch = self.model.forward(params, batch.tokens, scratch, batch.attn,
                                                     attention_fn=self.attention_fn)
            else:
                hidden = self.model.encode(params, batch.tokens, batch.positions, batch.segment_ids)
        with jax.named_scope("pooling"):
            return scratch, pool(hidden, batch.segment_ids, batch.starts, batch.lengths, self.pooling_type)

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    @property
    def compile_seconds(self) -> float:
        return sum(self.compile_times)

    def warmup(self) -> None:
        """Compile every bucket's graph now (lowered here, compiled on worker threads)."""
        todo = [b for b in self.buckets if b not in self._compiled]
        release_dropped_graphs()
        with ThreadPoolExecutor(_COMPILE_THREADS) as pool_:
            started = {b: (time.perf_counter(), pool_.submit(self._lower(b).compile)) for b in todo}
            for bucket, (start, future) in started.items():
                self._keep(bucket, future.result(), time.perf_counter() - start)

    def _lower(self, bucket: tuple[int, int]):
        return self._jitted.lower(self.params, self.scratch, self.prepare([], bucket))

    def _keep(self, bucket, exe, seconds: float) -> None:
        self._compiled[bucket] = exe
        self.compile_times.append(seconds)
        logger.debug("compiled pooling graph %s in %.2fs", bucket, seconds)

    def _executable(self, bucket: tuple[int, int]):
        """The bucket's graph; compiled here only when warm-up was skipped (--no-warmup)."""
        exe = self._compiled.get(bucket)
        if exe is None:
            start = time.perf_counter()
            exe = self._lower(bucket).compile()
            self._keep(bucket, exe, time.perf_counter() - start)
        return exe

    # ---- host side ---------------------------------------------------------------------------

    def bucket_for(self, num_tokens: int, num_texts: int) -> tuple[int, int]:
        return next(b for b in self.buckets if b[0] >= num_tokens and b[1] >= num_texts)

    def prepare(self, token_lists: list[list[int]], bucket: tuple[int, int]) -> PoolingBatch:
        """One step's texts as padded host arrays of `bucket` (numpy only)."""
        T, B = bucket
        n = len(token_lists)
        lengths = np.zeros(B, np.int32)
        lengths[:n] = [len(ids) for ids in token_lists]
        starts = np.zeros(B, np.int32)
        np.cumsum(lengths[:-1], out=starts[1:])
        used = int(lengths.sum())
        text_of_token = np.repeat(np.arange(n, dtype=np.int32), lengths[:n])  # [used]
        tokens = np.zeros(T, np.int32)
        tokens[:used] = np.fromiter((t for ids in token_lists for t in ids), np.int32, used)
        positions = np.zeros(T, np.int32)
        positions[:used] = np.arange(used, dtype=np.int32) - starts[text_of_token]
        segment_ids = np.full(T, B, np.int32)
        segment_ids[:used] = text_of_token
        attn = self._attention_metadata(lengths, starts, positions, text_of_token, n) if self.is_decoder else None
        return PoolingBatch(tokens=tokens, positions=positions, segment_ids=segment_ids, starts=starts,
                            lengths=lengths, attn=attn)

    def _attention_metadata(self, lengths, starts, positions, text_of_token, n: int) -> AttentionMetadata:
        """Each text gets consecutive scratch pages from page 1; padding tokens write to page 0."""
        S, W, B = self.block_size, self.page_table_width, len(lengths)
        pages_per_text = -(-lengths // S)  # [B]
        first_page = 1 + np.cumsum(pages_per_text) - pages_per_text
        page_table = np.full((B, W), NULL_PAGE, np.int32)
        columns = np.arange(W, dtype=np.int32)
        owned = columns[None, :] < pages_per_text[:, None]
        page_table[owned] = (first_page[:, None] + columns[None, :])[owned]
        used = len(text_of_token)
        slot_mapping = np.zeros(len(positions), np.int32)
        pos = positions[:used]
        slot_mapping[:used] = page_table[text_of_token, pos // S] * S + pos % S
        cu_q_lens = np.zeros(B + 1, np.int32)
        np.cumsum(lengths, out=cu_q_lens[1:])
        return AttentionMetadata(positions=positions, slot_mapping=slot_mapping, cu_q_lens=cu_q_lens,
                                 kv_lens=lengths.copy(), page_table=page_table, num_seqs=np.int32(n))

    def run(self, token_lists: list[list[int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Pooled vectors [len(token_lists), D] float32 (not normalised), and the bucket of each
        step. Every step is queued before the host waits: one transfer back for all of them."""
        pooled, buckets = [], []
        for start, end in plan_steps([len(ids) for ids in token_lists], self.max_num_batched_tokens,
                                     self.max_num_seqs):
            texts = token_lists[start:end]
            bucket = self.bucket_for(sum(len(ids) for ids in texts), len(texts))
            batch = jax.device_put(self.prepare(texts, bucket))  # the step's one host->device transfer
            self.scratch, vectors = self._executable(bucket)(self.params, self.scratch, batch)
            pooled.append((vectors, len(texts)))
            buckets.append(bucket)
        host = jax.device_get([vectors for vectors, _ in pooled])
        rows = [h[:n] for h, (_, n) in zip(host, pooled)]
        return (np.concatenate(rows) if rows else np.zeros((0, self.hidden_size), np.float32)), buckets
