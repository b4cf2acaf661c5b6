"""The grouped matmul under the MoE block, both ways: ragged_dot (accelerators) and the CPU's
blocks of one expert each, against a numpy loop over the groups."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.moe import CPU_BLOCK_ROWS, grouped_matmul
from jaxserve.precision import targeting


def numpy_grouped(x, w, group_sizes):
    out = np.zeros((x.shape[0], w.shape[2]), np.float64)
    start = 0
    for g, size in enumerate(group_sizes):
        out[start:start + size] = x[start:start + size] @ w[g]
        start += size
    return out


# Empty groups, a group of exactly one block, groups ending mid-block, a group longer than two
# blocks, and 5 rows past the groups (which must come out zero).
GROUPS = [0, CPU_BLOCK_ROWS, 3, 0, 2 * CPU_BLOCK_ROWS + 5, 1, 7]


@pytest.mark.parametrize("platform", ["cpu", "cuda"], ids=["cpu-blocks", "ragged_dot"])
def test_grouped_matmul_matches_a_loop_over_groups(platform):
    rng = np.random.default_rng(0)
    M, K, N = sum(GROUPS) + 5, 24, 40
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((len(GROUPS), K, N)).astype(np.float32)
    with targeting(platform):
        got = np.asarray(grouped_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(GROUPS, jnp.int32)))
    np.testing.assert_allclose(got, numpy_grouped(x, w, GROUPS), atol=1e-4, rtol=0)
