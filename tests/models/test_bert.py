"""The BERT encoder (all-MiniLM-L6-v2, from its safetensors): transformers' hidden states for each
text of a ragged, padded batch; each pooling over that batch equals the same pooling per text."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxserve.models import load_model
from jaxserve.models.pooling import pool

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog near the river bank.", "a"]
T = 48  # the padded flat batch: 27 real tokens, the rest padding


@pytest.fixture(scope="module")
def encoder(minilm, minilm_hf):
    """(LoadedModel, jitted encode, the ragged batch of TEXTS, their token ids, transformers' hidden states)."""
    lm = load_model(minilm, "float32")
    hf_model, tokenizer = minilm_hf
    ids = [tokenizer(t).input_ids for t in TEXTS]
    n = sum(map(len, ids))
    tokens = np.zeros(T, np.int32)
    tokens[:n] = np.concatenate(ids)
    tokens[n:] = 1037  # padding with a real token: it must not leak into any text
    positions = np.zeros(T, np.int32)
    positions[:n] = np.concatenate([np.arange(len(i)) for i in ids])
    segments = np.full(T, len(ids), np.int32)
    segments[:n] = np.repeat(np.arange(len(ids)), [len(i) for i in ids])
    with torch.no_grad():
        reference = [hf_model(torch.tensor([i])).last_hidden_state[0].numpy() for i in ids]
    hidden = np.asarray(jax.jit(lm.model.encode)(lm.params, tokens, positions, segments))
    return lm, hidden, (tokens, positions, segments), ids, reference


def test_ragged_batch_matches_transformers_hidden_states(encoder):
    lm, hidden, _, ids, reference = encoder
    assert lm.config.architecture == "BertModel" and lm.config.num_layers == 6 and lm.config.hidden_size == 384
    assert hidden.shape == (T, 384) and hidden.dtype == np.float32
    start = 0
    for text_ids, ref in zip(ids, reference):
        np.testing.assert_allclose(hidden[start:start + len(text_ids)], ref, atol=2e-5, rtol=0)
        start += len(text_ids)


@pytest.mark.parametrize("pooling_type", ["mean", "cls", "last"])
def test_pooling_by_segment_equals_pooling_each_text(encoder, pooling_type):
    _, hidden, (_, _, segments), ids, reference = encoder
    lengths = np.array([len(i) for i in ids] + [0], np.int32)  # one padding slot
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    pooled = np.asarray(pool(hidden, segments, starts, lengths, pooling_type))
    want = [{"mean": r.mean(0), "cls": r[0], "last": r[-1]}[pooling_type] for r in reference]
    assert pooled.shape == (4, 384)
    np.testing.assert_allclose(pooled[:3], np.stack(want), atol=2e-5, rtol=0)


def test_the_unused_pooler_is_skipped_without_a_warning(minilm, caplog):
    with caplog.at_level("WARNING", logger="jaxserve.models.loader"):
        lm = load_model(minilm, "float32")
    assert "ignoring" not in caplog.text
    assert set(lm.params) == {"embed", "position_embed", "type_embed", "embed_norm", "layers"}
