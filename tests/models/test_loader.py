"""load_model on HF folders: dtypes, sharded checkpoints, and a clear error for every bad input
(missing path or files, unsupported architecture, wrong or missing tensor, unknown dtype).
"""
from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import load_model, resolve_dtype


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(folder, edit):
    """Rewrite model.safetensors after `edit(dict of numpy arrays)`."""
    from safetensors.numpy import load_file, save_file
    path = f"{folder}/model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(str(tmp_path / "no-such-model"))


def test_missing_files_are_named(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    no_config = _copy(folder, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(no_config))

    no_weights = _copy(folder, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"\*\.safetensors"):
        load_model(str(no_weights))

    no_tokenizer = _copy(folder, tmp_path / "c")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_model(str(no_tokenizer))


def test_unsupported_hf_architecture_lists_supported(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("llama")[0], tmp_path / "gpt2")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(str(folder))


def test_unsupported_gguf_architecture_lists_supported(tmp_path):
    import gguf
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        load_model(str(path))


def test_wrong_tensor_shape_names_tensor_and_shapes(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("llama")[0], tmp_path / "bad")
    name = "model.layers.1.self_attn.k_proj.weight"

    def truncate(tensors):
        tensors[name] = tensors[name][:16]
    _rewrite_tensors(folder, truncate)
    with pytest.raises(ValueError, match=rf"{name}.*\(16, 64\).*expected \(32, 64\)"):
        load_model(str(folder), "float32")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    folder = _copy(tiny_checkpoint("qwen2")[0], tmp_path / "nobias")
    name = "model.layers.0.self_attn.v_proj.bias"
    _rewrite_tensors(folder, lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=name):
        load_model(str(folder), "float32")


def test_dtypes(tiny_checkpoint):
    from jaxserve.precision import auto_dtype
    assert resolve_dtype("auto") == jnp.dtype(auto_dtype()[0])  # which one depends on the CPU: test_engine_args
    assert resolve_dtype("bf16") == jnp.bfloat16 and resolve_dtype("half") == jnp.float16
    with pytest.raises(ValueError, match="'int8'.*float32.*bfloat16"):
        resolve_dtype("int8")
    folder, _ = tiny_checkpoint("llama")
    with pytest.raises(ValueError, match="int8"):
        load_model(folder, "int8")

    full = load_model(folder, "float32")
    half = load_model(folder, "bf16")
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(half.params)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(half.params)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_sharded_checkpoint_loads_same_params(tiny_checkpoint, tmp_path):
    folder, hf_model = tiny_checkpoint("qwen3")
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folder}/{name}", sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1

    single, split = load_model(folder, "float32"), load_model(str(sharded), "float32")
    assert split.config == single.config and split.name == "sharded"
    jax.tree_util.tree_map(np.testing.assert_array_equal, single.params, split.params)


def test_bfloat16_checkpoint_loads(tiny_checkpoint, tmp_path):
    import copy

    import torch
    folder, hf_model = tiny_checkpoint("qwen2")
    bf16 = tmp_path / "bf16"
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(str(bf16), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folder}/{name}", bf16 / name)

    rounded = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), load_model(folder, "float32").params)
    as_bf16, as_f32 = load_model(str(bf16), "bf16").params, load_model(str(bf16), "float32").params
    jax.tree_util.tree_map(np.testing.assert_array_equal, rounded, as_bf16)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a.astype(jnp.float32), b),
                           rounded, as_f32)


def test_two_gguf_tokenizers_loading_at_once_both_load():
    """Each GGUF load starts its tokenizer in a thread; two at once raced on transformers' lazily
    imported attributes (seen when this ran first in a process: AttributeError 'TokenizersBackend')."""
    from jaxserve.models import load_model

    first, second = load_model(None), load_model(None)
    assert second.tokenizer("Hello").input_ids == first.tokenizer("Hello").input_ids
