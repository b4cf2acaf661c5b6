"""The ragged-batch metadata every model forward receives, and the paged KV cache layout.

The scheduler flattens all scheduled tokens of all sequences into one array of T tokens
(prefill chunks and decode tokens side by side); this dataclass says where each token
belongs. T and B are padded to buckets on the host, so every field has a static shape.
"""
from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Device arrays describing one ragged step (T tokens over B sequence slots).

    Padding: tokens past ``cu_q_lens[num_seqs]`` are padding and write their K/V into
    page 0, which the block pool never hands out; padded sequence slots have
    ``q_len == 0`` (repeated ``cu_q_lens`` value) and ``kv_len == 0``.
    """

    positions: jax.Array     # [T] int32, position of each token within its sequence
    slot_mapping: jax.Array  # [T] int32, flat KV slot (page * S + offset) each token writes
    cu_q_lens: jax.Array     # [B + 1] int32, token offsets of each sequence in the flat batch
    kv_lens: jax.Array       # [B] int32, KV length of each sequence *including* this step's tokens
    page_table: jax.Array    # [B, W] int32, pages owned by each sequence (W = max_model_len / S)
    num_seqs: jax.Array      # [] int32, number of real sequences (<= B)


def kv_page_shape(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                  head_dim: int) -> tuple[int, ...]:
    """The shape the cache's page arrays are stored in: [L, P, S, K, H], or [L, P, S, H] for a
    model with one KV head (multi-query attention: Gemma 3 270M and 1B).

    Why one head drops its axis: XLA:CPU lays an array with a size-1 axis out with that axis
    outermost inside the layer loop, then copies the whole cache between that layout and the
    plain one (the same bytes) before the loop, in every iteration and after it. Gemma 3 270M's
    decode step spent most of its time in those copies (benchmarks/README.md, "One KV head").
    The scales of 8-bit pages take this shape without its last axis."""
    heads = () if num_kv_heads == 1 else (num_kv_heads,)
    return (num_layers, num_pages, page_size, *heads, head_dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """The paged KV cache of all layers: page p of layer l holds S consecutive tokens.

    8-bit pages (int8, fp8: --kv-cache-dtype, jaxserve/kv_cache_dtype.py) come with a float32
    scale per token slot and KV head, the value of an element being page * scale; other pages
    hold the values themselves and no scales. With one KV head the arrays have no K axis
    (`kv_page_shape`); the model code reads L, P and S from the first three axes and K, H from
    its config, so it takes either form.
    """

    k: jax.Array  # [L, P, S, K, H] ([L, P, S, H] when K == 1)
    v: jax.Array  # [L, P, S, K, H]
    k_scale: jax.Array | None = None  # [L, P, S, K] ([L, P, S] when K == 1) float32, with 8-bit pages only
    v_scale: jax.Array | None = None  # [L, P, S, K] float32

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]
