"""models/lora.py against numpy: each token gets x @ W + (x @ A_s) @ B_s of its own slot s (slot 0,
the base model, gets nothing), and a slot write replaces that slot only, in every layer."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models.lora import LoRALayer, LoRAWeights, add_lora, module_shapes, token_slot_mask, write_slot
from jaxserve.precision import PACKED

CONFIG = SimpleNamespace(hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=12, num_layers=3,
                         num_experts=0)
SLOTS, RANK = 2, 4  # stored slots 1 and 2


def _random_slot(rng, layers: int) -> tuple[dict, dict]:
    shapes = module_shapes(CONFIG)
    return ({m: rng.standard_normal((layers, i, RANK)).astype(np.float32) for m, (i, o) in shapes.items()},
            {m: rng.standard_normal((layers, RANK, o)).astype(np.float32) for m, (i, o) in shapes.items()})


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (PACKED, 5e-2)], ids=["float32", "packed-bf16"])
def test_each_token_gets_its_own_slots_update_and_slot_zero_none(dtype, tolerance):
    rng = np.random.default_rng(0)
    weights = LoRAWeights.zeros(CONFIG, SLOTS, RANK, dtype)  # stored as the model's weights are
    slots = {s: _random_slot(rng, CONFIG.num_layers) for s in (1, 2)}
    write = jax.jit(write_slot, donate_argnums=(0,))
    for s, (a, b) in slots.items():
        weights = write(weights, np.int32(s), a, b)
    token_slots = np.array([0, 2, 1, 1, 0, 2], np.int32)
    x = rng.standard_normal((len(token_slots), 12)).astype(np.float32)  # into down_proj: in = F
    base = rng.standard_normal((len(token_slots), 8)).astype(np.float32)
    layer = 1
    lora = LoRALayer(a={m: w[layer] for m, w in weights.a.items()}, b={m: w[layer] for m, w in weights.b.items()},
                     token_mask=token_slot_mask(jnp.asarray(token_slots), SLOTS, jnp.float32))
    got = np.asarray(jax.jit(lambda y, x: add_lora(y, lora, "down_proj", x))(base, x))
    want = base.copy()
    for t, s in enumerate(token_slots):
        if s:
            a, b = slots[s][0]["down_proj"][layer], slots[s][1]["down_proj"][layer]
            want[t] += x[t] @ a @ b
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(got[token_slots == 0], base[token_slots == 0])
    assert add_lora(base, None, "down_proj", x) is base  # LoRA off: the graph is left as it was


def test_a_slot_write_replaces_that_slot_in_every_layer_and_nothing_else():
    rng = np.random.default_rng(1)
    weights = LoRAWeights.zeros(CONFIG, SLOTS, RANK, jnp.float32)
    first, second = _random_slot(rng, CONFIG.num_layers), _random_slot(rng, CONFIG.num_layers)
    weights = write_slot(weights, jnp.int32(1), *first)
    weights = write_slot(weights, jnp.int32(2), *first)
    weights = write_slot(weights, jnp.int32(2), *second)  # a slot reused by another adapter
    weights = write_slot(weights, jnp.int32(1), *second)
    for m in module_shapes(CONFIG):
        a, b = np.asarray(weights.a[m]), np.asarray(weights.b[m])  # [L, I, S, R], [L, S, R, O]
        for s in (1, 2):  # stored at index s - 1
            np.testing.assert_array_equal(a[:, :, s - 1], second[0][m])
            np.testing.assert_array_equal(b[:, s - 1], second[1][m])
    assert (weights.num_slots, weights.max_rank) == (SLOTS, RANK)
