"""What pooling a model gets: its sentence-transformers files (modules.json, 1_Pooling, 2_Normalize,
sentence_bert_config.json), else vLLM's defaults; Matryoshka dimensions from config.json; modules
and poolings jaxserve does not run are refused by name."""
from __future__ import annotations

import json

import pytest

from jaxserve.models.pooling import PoolerConfig, pooler_config

TRANSFORMER = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
POOLING = {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


def _folder(tmp_path, modules=None, pooling=None, max_seq_length=None, config=None):
    if modules is not None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if max_seq_length is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    (tmp_path / "config.json").write_text(json.dumps(config or {}))
    return str(tmp_path)


def test_all_minilm_pools_the_mean_normalised_within_256_tokens(minilm):
    assert pooler_config(minilm, encoder=True) == PoolerConfig("mean", True, 256)


@pytest.mark.parametrize("flags, modules, want", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, [TRANSFORMER, POOLING], ("cls", False)),
    ({"pooling_mode_lasttoken": True}, [TRANSFORMER, POOLING, NORMALIZE], ("last", True)),
    ({"pooling_mode": "mean"}, [TRANSFORMER, POOLING, NORMALIZE], ("mean", True)),
])
def test_sentence_transformers_files_pick_pooling_and_normalisation(tmp_path, flags, modules, want):
    config = pooler_config(_folder(tmp_path, modules, flags, max_seq_length=128), encoder=False)
    assert (config.pooling_type, config.normalize, config.max_seq_length) == (*want, 128)


def test_without_sentence_transformers_files_encoders_pool_cls_and_decoders_the_last_token(tmp_path):
    folder = _folder(tmp_path)
    assert pooler_config(folder, encoder=True) == PoolerConfig("cls", True)
    assert pooler_config(folder, encoder=False) == PoolerConfig("last", True)
    assert pooler_config(None, encoder=False) == PoolerConfig("last", True)  # a GGUF file
    # --pooling-type overrides whatever the files say
    assert pooler_config(folder, encoder=False, pooling_type="mean").pooling_type == "mean"


@pytest.mark.parametrize("modules, flags, message", [
    ([TRANSFORMER, POOLING], {"pooling_mode_max_tokens": True}, "pooling max_tokens is not supported"),
    ([TRANSFORMER, POOLING], {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True},
     "pooling cls_token \\+ mean_tokens is not supported"),
    ([TRANSFORMER, POOLING, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"}],
     {"pooling_mode_mean_tokens": True}, "module\\(s\\) Dense are not supported"),
])
def test_unsupported_pipelines_are_refused_by_name(tmp_path, modules, flags, message):
    with pytest.raises(ValueError, match=message):
        pooler_config(_folder(tmp_path, modules, flags), encoder=True)


def test_only_matryoshka_models_take_dimensions(tmp_path):
    (tmp_path / "plain").mkdir(), (tmp_path / "listed").mkdir()
    plain = pooler_config(_folder(tmp_path / "plain"), encoder=True)
    with pytest.raises(ValueError, match="only supported by Matryoshka models"):
        plain.check_dimensions(16, 384)
    listed = pooler_config(_folder(tmp_path / "listed", config={"matryoshka_dimensions": [384, 128, 64]}),
                           encoder=True)
    assert listed.matryoshka and listed.matryoshka_dimensions == (384, 128, 64)
    listed.check_dimensions(64, 384)
    with pytest.raises(ValueError, match=r"dimensions must be one of \[384, 128, 64\] for this model, got 100"):
        listed.check_dimensions(100, 384)
    anything = PoolerConfig("mean", True, matryoshka=True)  # config.json is_matryoshka: any size
    anything.check_dimensions(1, 384)
    with pytest.raises(ValueError, match=r"dimensions must be in \[1, 384\], got 385"):
        anything.check_dimensions(385, 384)
