"""The converted-weights cache (models/weight_cache.py): a warm load gives bit-identical params and
the same config without reading the GGUF, a rewritten file gets a new entry, and a damaged entry
is ignored and rebuilt."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np
import pytest

from jaxserve.models import load_model, weight_cache
from jaxserve.models.config import ModelConfig, RopeScaling

VOCAB = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "▁b"]
D, F, HEADS, KV_HEADS, LAYERS = 32, 64, 2, 1, 2


def write_tiny_llama_gguf(path, seed: int) -> None:
    """A two-layer llama GGUF with a sentencepiece vocabulary; the feed-forward weights are Q8_0 so
    the load dequantises, as for real files."""
    import gguf
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(VOCAB))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(VOCAB)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * 5)
    writer.add_token_scores([0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weight(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(VOCAB), D))
    writer.add_tensor("output_norm.weight", weight(D))
    head_dim = D // HEADS
    for layer in range(LAYERS):
        blk = f"blk.{layer}."
        writer.add_tensor(blk + "attn_norm.weight", weight(D))
        writer.add_tensor(blk + "ffn_norm.weight", weight(D))
        writer.add_tensor(blk + "attn_q.weight", weight(HEADS * head_dim, D))
        writer.add_tensor(blk + "attn_k.weight", weight(KV_HEADS * head_dim, D))
        writer.add_tensor(blk + "attn_v.weight", weight(KV_HEADS * head_dim, D))
        writer.add_tensor(blk + "attn_output.weight", weight(D, HEADS * head_dim))
        for name, shape in (("ffn_gate", (F, D)), ("ffn_up", (F, D)), ("ffn_down", (D, F))):
            q8 = gguf.quants.quantize(weight(*shape), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(blk + name + ".weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache-root"
    monkeypatch.setenv("JAXSERVE_CACHE_ROOT", str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(path, seed=0)
    return str(path)


def entries(root) -> list[str]:
    folder = root / "weights"
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if folder.exists() else []


def assert_bit_identical(a, b) -> None:
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, path
        assert x.tobytes() == y.tobytes(), path


def refuse_to_read_the_file(monkeypatch):
    from jaxserve.models import loader_gguf

    def refuse(*args, **kwargs):
        raise AssertionError("a warm load parsed the GGUF file")

    monkeypatch.setattr(loader_gguf, "open_gguf", refuse)
    monkeypatch.setattr("gguf.GGUFReader", refuse)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_warm_load_is_bit_identical_and_skips_the_file(tiny_gguf, cache_root, monkeypatch, dtype):
    uncached = load_model(tiny_gguf, dtype, weight_cache=False)
    assert entries(cache_root) == []
    cold = load_model(tiny_gguf, dtype)
    assert len(entries(cache_root)) == 1
    with monkeypatch.context() as patch:
        refuse_to_read_the_file(patch)
        warm = load_model(tiny_gguf, dtype)
    for loaded in (cold, warm):
        assert loaded.config == uncached.config
        assert type(loaded.model) is type(uncached.model)
        assert_bit_identical(loaded.params, uncached.params)
    assert warm.tokenizer("a b").input_ids == uncached.tokenizer("a b").input_ids
    # Each dtype is its own entry.
    load_model(tiny_gguf, "float16")
    assert len(entries(cache_root)) == 2


def test_rewritten_file_gets_a_new_entry(tiny_gguf, cache_root):
    first = load_model(tiny_gguf, "float32")
    old_key = entries(cache_root)
    write_tiny_llama_gguf(tiny_gguf, seed=1)  # same path and size, other weights
    second = load_model(tiny_gguf, "float32")
    assert entries(cache_root) != old_key and len(entries(cache_root)) == 1  # the stale entry is dropped
    assert_bit_identical(second.params, load_model(tiny_gguf, "float32", weight_cache=False).params)
    assert not np.array_equal(np.asarray(first.params["embed"]), np.asarray(second.params["embed"]))


def test_key_follows_file_dtype_and_loader_version(tiny_gguf, monkeypatch):
    key = weight_cache.cache_key(tiny_gguf, np.float32)
    assert weight_cache.cache_key(tiny_gguf, np.float32) == key
    assert weight_cache.cache_key(tiny_gguf, np.float16) != key
    monkeypatch.setattr(weight_cache, "LOADER_VERSION", weight_cache.LOADER_VERSION + 1)
    assert weight_cache.cache_key(tiny_gguf, np.float32) != key
    monkeypatch.undo()
    stat = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: counts as rewritten
    assert weight_cache.cache_key(tiny_gguf, np.float32) != key


def damage_truncate(folder):
    with open(folder / "params.bin", "r+b") as f:
        f.truncate(100)


def damage_manifest(folder):
    (folder / "manifest.json").write_text('{"format": 1, "config": {')


def damage_missing_params(folder):
    os.remove(folder / "params.bin")


def damage_shapes(folder):
    # A readable entry whose arrays are not what the family expects (as from an older loader).
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["arrays"][0]["shape"] = [1]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [damage_truncate, damage_manifest, damage_missing_params, damage_shapes])
def test_damaged_entry_is_ignored_and_rebuilt(tiny_gguf, cache_root, monkeypatch, caplog, damage):
    reference = load_model(tiny_gguf, "float32", weight_cache=False)
    load_model(tiny_gguf, "float32")
    [key] = entries(cache_root)
    damage(cache_root / "weights" / key)
    with caplog.at_level(logging.WARNING, logger="jaxserve.models"):
        rebuilt = load_model(tiny_gguf, "float32")
    assert "weight cache entry" in caplog.text
    assert_bit_identical(rebuilt.params, reference.params)
    assert entries(cache_root) == [key]
    with monkeypatch.context() as patch:  # the rebuilt entry is whole again
        refuse_to_read_the_file(patch)
        assert_bit_identical(load_model(tiny_gguf, "float32").params, reference.params)


def test_unwritable_cache_root_still_loads(tiny_gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("JAXSERVE_CACHE_ROOT", str(blocker))
    loaded = load_model(tiny_gguf, "float32")
    assert_bit_identical(loaded.params, load_model(tiny_gguf, "float32", weight_cache=False).params)


def test_config_round_trips_through_the_manifest():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=8, intermediate_size=16,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=RopeScaling("freq_factors", freq_factors=(1.0, 0.25)),
                         eos_token_ids=(2, 7), bos_token_id=1, sliding_window=None)
    assert weight_cache.config_from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config
