"""Random ragged batches for the attention tests: a flat token batch over paged KV, with
padding tokens, padded sequence slots, and NaN in every page no sequence owns."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest


@dataclasses.dataclass
class RaggedCase:
    q: jnp.ndarray           # [T, N, H]
    k_pages: jnp.ndarray     # [P, S, K, H], unowned pages finite garbage (for the dense oracle)
    v_pages: jnp.ndarray     # [P, S, K, H]
    kv_lens: jnp.ndarray     # [B]
    page_table: jnp.ndarray  # [B, W]
    cu_q_lens: jnp.ndarray   # [B + 1]
    num_seqs: jnp.ndarray    # []
    owned: np.ndarray        # [P] bool, pages some real sequence owns

    @property
    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_table, self.cu_q_lens,
                self.num_seqs)

    @property
    def poisoned_args(self):
        """Same batch with NaN in every page no sequence owns: reading one poisons the output."""
        nan = jnp.asarray(~self.owned)[:, None, None, None]
        k = jnp.where(nan, jnp.nan, self.k_pages)
        v = jnp.where(nan, jnp.nan, self.v_pages)
        return (self.q, k, v, *self.args[3:])


def build_case(seqs, *, num_tokens=None, num_slots=None, num_heads=4, num_kv_heads=2, head_dim=64,
               page_size=4, max_pages_per_seq=16, num_pages=None, seed=0) -> RaggedCase:
    """seqs: [(q_len, kv_len), ...] for the real sequences, in batch order.

    num_tokens >= sum(q_len) pads the token axis; num_slots >= len(seqs) adds padded slots.
    """
    rng = np.random.default_rng(seed)
    q_lens = np.array([s[0] for s in seqs], np.int32)
    kv_lens = np.array([s[1] for s in seqs], np.int32)
    assert (kv_lens >= q_lens).all() and (q_lens >= 0).all()
    T = num_tokens or int(q_lens.sum())
    B = num_slots or len(seqs)
    W, S = max_pages_per_seq, page_size
    need = -(-kv_lens // S)
    assert (need <= W).all() and T >= q_lens.sum()
    P = num_pages or int(need.sum()) + 3
    # Page 0 stays reserved (never owned), as in the block pool; shuffle the rest.
    free = rng.permutation(np.arange(1, P))
    page_table = np.zeros((B, W), np.int32)
    owned = np.zeros(P, bool)
    used = 0
    for b, n in enumerate(need):
        page_table[b, :n] = free[used:used + n]
        owned[free[used:used + n]] = True
        # Columns past the sequence's pages hold stale ids of other pages, as after a free.
        page_table[b, n:] = rng.integers(0, P, W - n)
        used += n
    page_table[len(seqs):] = rng.integers(0, P, (B - len(seqs), W))
    cu = np.zeros(B + 1, np.int32)
    cu[1:len(seqs) + 1] = np.cumsum(q_lens)
    cu[len(seqs) + 1:] = cu[len(seqs)]
    kv = np.zeros(B, np.int32)
    kv[:len(seqs)] = kv_lens
    K, N, H = num_kv_heads, num_heads, head_dim
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return RaggedCase(q=f(T, N, H), k_pages=f(P, S, K, H), v_pages=f(P, S, K, H), kv_lens=jnp.asarray(kv),
                      page_table=jnp.asarray(page_table), cu_q_lens=jnp.asarray(cu),
                      num_seqs=jnp.asarray(len(seqs), jnp.int32), owned=owned)


# (q_len, kv_len) per real sequence, page size 4. Chunks start and end on and off page
# boundaries and decodes sit on the first and last slot of a page. The padded scenarios share one
# shape bucket (24 tokens, 8 slots, 40 pages) so each setting compiles once for all of them.
BUCKET = dict(num_tokens=24, num_slots=8, num_pages=40, max_pages_per_seq=8)
SCENARIOS = {
    "decode": dict(seqs=[(1, 5), (1, 8), (1, 9), (1, 1), (1, 17)], **BUCKET),
    "prefill": dict(seqs=[(19, 19)], **BUCKET),
    # decodes beside prefill chunks; (6, 14) and (3, 23) continue a cached prefix
    "mixed": dict(seqs=[(1, 9), (6, 14), (1, 4), (5, 5), (3, 23)], **BUCKET),
    # chunks that exactly fill pages or end on a page's last slot
    "page_boundaries": dict(seqs=[(4, 8), (4, 12), (1, 16), (8, 16), (2, 3)], **BUCKET),
    # no padding at all: the last block's reads end exactly at the end of q
    "decode_exact": dict(seqs=[(1, 5), (1, 8), (1, 9), (1, 1), (1, 17)]),
    "mixed_exact": dict(seqs=[(1, 9), (6, 14), (1, 4), (5, 5), (3, 23)]),
    # a step of at most reference.ONE_PASS_MAX_TOKENS tokens: prefill chunks as one-token blocks
    "small_step_mixed": dict(seqs=[(1, 9), (6, 14), (3, 23)], num_tokens=12, num_slots=8, num_pages=40,
                             max_pages_per_seq=8),
}


def pytest_generate_tests(metafunc):
    """Tests taking `scenario` (kwargs for build_case) run once per entry of SCENARIOS."""
    if "scenario" in metafunc.fixturenames:
        metafunc.parametrize("scenario", list(SCENARIOS.values()), ids=list(SCENARIOS))


@pytest.fixture
def make_case():
    return build_case
