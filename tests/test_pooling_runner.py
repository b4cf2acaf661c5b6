"""The pooling runner's host side: the (T, B) buckets of its graphs, and texts packed whole, in
order, into steps within both budgets."""
from __future__ import annotations

import numpy as np

from jaxserve.pooling_runner import plan_steps, pooling_buckets


def test_buckets_are_powers_of_two_up_to_the_budget():
    assert pooling_buckets(512, 64) == [(16, 16), (32, 32), (64, 64), (128, 64), (256, 64), (512, 64)]
    assert pooling_buckets(256, 8) == [(16, 8), (32, 8), (64, 8), (128, 8), (256, 8)]
    assert pooling_buckets(300, 5) == [(16, 5), (32, 5), (64, 5), (128, 5), (256, 5), (300, 5)]


def test_steps_keep_texts_whole_and_in_order_within_both_budgets():
    lengths = list(np.random.default_rng(0).integers(1, 257, 200))
    steps = plan_steps(lengths, 512, 8)
    assert steps[0][0] == 0 and steps[-1][1] == 200
    assert all(a[1] == b[0] for a, b in zip(steps, steps[1:]))  # contiguous: order kept, nothing skipped
    for start, end in steps:
        assert 1 <= end - start <= 8 and sum(lengths[start:end]) <= 512
        # a step ends only where the next text would not fit
        if end < 200:
            assert end - start == 8 or sum(lengths[start:end + 1]) > 512
    assert plan_steps([1] * 20, 512, 8) == [(0, 8), (8, 16), (16, 20)]
    assert plan_steps([], 512, 8) == []
