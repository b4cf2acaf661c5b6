"""Fixtures for model tests: tiny random transformers checkpoints saved to disk, a tiny tokenizer,
and a builder for ragged paged batches (the host-side work the scheduler does in the engine).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import AttentionMetadata, KVCache
from jaxserve.models.metadata import kv_page_shape

from testlib import PAGE_SIZE


@dataclasses.dataclass
class RaggedBatch:
    tokens: jnp.ndarray  # [T] int32, padded
    md: AttentionMetadata
    q_slices: list[slice]  # rows of each real sequence in the T axis


def build_batch(seqs: list[tuple[list[int], int]], page_tables: list[list[int]], *,
                num_tokens: int = 32, max_seqs: int = 4, width: int = 8) -> RaggedBatch:
    """One ragged step. seqs[b] = (new tokens, number of tokens already in the cache); page_tables[b]
    = pages owned by sequence b. T and B are padded; padding tokens write into page 0."""
    tokens, positions, slots, cu, kv_lens, q_slices = [], [], [], [0], [], []
    table = np.zeros((max_seqs, width), np.int32)
    for b, ((new, cached), pages) in enumerate(zip(seqs, page_tables)):
        table[b, :len(pages)] = pages
        q_slices.append(slice(len(tokens), len(tokens) + len(new)))
        for i, tok in enumerate(new):
            pos = cached + i
            tokens.append(tok)
            positions.append(pos)
            slots.append(pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
        cu.append(len(tokens))
        kv_lens.append(cached + len(new))
    num_real = len(tokens)
    assert num_real <= num_tokens and len(seqs) <= max_seqs
    pad = num_tokens - num_real
    tokens += [0] * pad
    positions += [0] * pad
    slots += [i % PAGE_SIZE for i in range(pad)]  # garbage page 0
    cu += [num_real] * (max_seqs - len(seqs))
    kv_lens += [0] * (max_seqs - len(seqs))
    md = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32), slot_mapping=jnp.asarray(slots, jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32), kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(table), num_seqs=jnp.asarray(len(seqs), jnp.int32))
    return RaggedBatch(jnp.asarray(tokens, jnp.int32), md, q_slices)


def empty_cache(config, num_pages: int, dtype=jnp.float32) -> KVCache:
    shape = kv_page_shape(config.num_layers, num_pages, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@pytest.fixture
def ragged_batch():
    return build_batch


@pytest.fixture
def kv_cache_factory():
    return empty_cache


