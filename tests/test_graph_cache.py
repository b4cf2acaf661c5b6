"""The exported step-graph store (jaxserve/graph_cache.py): a second engine reads every warm-up
graph back instead of tracing it and generates exactly what a traced engine does; anything the
graph depends on changes the key; a damaged entry is re-exported, not trusted."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams, graph_cache
from jaxserve.runner import SAMPLER_KINDS, ModelRunner

ARGS = dict(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64, block_size=4, dtype="float32")
PROMPTS = [[5, 17, 33, 42, 61, 7], [9, 9, 100, 3]]


@pytest.fixture(scope="module")
def tiny_folder(tiny_checkpoint):
    return tiny_checkpoint("llama")[0]


def greedy(llm) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def stored(cache_dir) -> list[str]:
    folder = os.path.join(cache_dir, "jaxserve-exported")
    return sorted(f for f in os.listdir(folder) if f.endswith(".exported")) if os.path.isdir(folder) else []


@pytest.fixture(scope="module")
def xla_dir(tmp_path_factory):
    """One persistent compilation cache for the module (so each graph compiles once); each test
    starts with an empty store inside it."""
    return str(tmp_path_factory.mktemp("xla"))


@pytest.fixture
def cache(xla_dir):
    shutil.rmtree(os.path.join(xla_dir, "jaxserve-exported"), ignore_errors=True)
    return xla_dir


@pytest.fixture(scope="module")
def traced_tokens(tiny_folder, xla_dir):
    """What an engine that traces every graph (no store) generates."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelRunner, "_exported_store", lambda self, folder: None)
        llm = LLM(tiny_folder, compilation_cache_dir=xla_dir, **ARGS)
        assert llm.engine.runner.num_graphs_from_store == 0 and stored(xla_dir) == []
        return greedy(llm)


def test_second_engine_reads_every_graph_back(tiny_folder, cache, traced_tokens):
    first = LLM(tiny_folder, compilation_cache_dir=cache, **ARGS)
    graphs = len(first.engine.runner.warmup_keys)  # forward graphs per bucket, samplers per batch size
    assert graphs > len(first.engine.runner.buckets)
    assert first.engine.runner.num_graphs_from_store == 0 and len(stored(cache)) == graphs
    second = LLM(tiny_folder, compilation_cache_dir=cache, **ARGS)
    assert second.engine.runner.num_graphs_from_store == graphs
    assert second.engine.runner.num_compiled_warmup == graphs
    assert greedy(first) == greedy(second) == traced_tokens


def test_key_follows_what_the_graph_depends_on(tiny_folder, cache, monkeypatch):
    keys = LLM(tiny_folder, compilation_cache_dir=cache, **ARGS).engine.runner.warmup_keys
    before = set(stored(cache))
    # Other shapes are other graphs: a longer page table (forward) and token history (penalties);
    # the sampler graphs, which read neither, are the same ones.
    LLM(tiny_folder, compilation_cache_dir=cache, **{**ARGS, "max_model_len": 128})
    after_shapes = set(stored(cache))
    assert len(after_shapes) == len(before) + sum(key.kind not in SAMPLER_KINDS for key in keys)
    # Edited source: every graph is exported again.
    monkeypatch.setattr(graph_cache, "source_fingerprint", lambda: "edited")
    edited = LLM(tiny_folder, compilation_cache_dir=cache, **ARGS)
    assert edited.engine.runner.num_graphs_from_store == 0
    assert len(set(stored(cache)) - after_shapes) == len(before)


def test_key_names_the_attention_function_and_refuses_foreign_ones():
    from jaxserve.pallas_kernels import attention_backend

    reference, pallas = attention_backend("jnp"), attention_backend("pallas")
    assert graph_cache.describe_callable(reference) != graph_cache.describe_callable(pallas) is not None
    assert graph_cache.describe_callable(lambda *a: None) is None  # not jaxserve's: not keyed, not stored
    assert graph_cache.describe_callable(np.sum) is None


@pytest.mark.parametrize("damage", [b"", b"not a pickle", None])
def test_damaged_graph_is_exported_again(tiny_folder, cache, traced_tokens, damage):
    LLM(tiny_folder, compilation_cache_dir=cache, **ARGS)
    victim = os.path.join(cache, "jaxserve-exported", stored(cache)[0])
    if damage is None:
        import pickle
        with open(victim, "wb") as f:
            pickle.dump({"something": "else"}, f)  # a readable pickle of the wrong thing
    else:
        with open(victim, "wb") as f:
            f.write(damage)
    llm = LLM(tiny_folder, compilation_cache_dir=cache, **ARGS)
    runner = llm.engine.runner
    assert runner.num_graphs_from_store == len(runner.warmup_keys) - 1
    assert greedy(llm) == traced_tokens
    again = LLM(tiny_folder, compilation_cache_dir=cache, **ARGS)  # the re-exported file is whole
    assert again.engine.runner.num_graphs_from_store == len(runner.warmup_keys)


def test_the_source_fingerprint_covers_subpackages(tmp_path, monkeypatch):
    """An edit anywhere under a traced package, its subpackages too (jaxserve/sampling/ holds the
    sampler), changes the fingerprint, so graphs exported before it are not read back."""
    import sys

    (tmp_path / "traced_pkg" / "sub").mkdir(parents=True)
    (tmp_path / "traced_pkg" / "__init__.py").write_text("")
    (tmp_path / "traced_pkg" / "sub" / "__init__.py").write_text("")
    core = tmp_path / "traced_pkg" / "sub" / "core.py"
    core.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(graph_cache, "_TRACED_PACKAGES", ("traced_pkg",))
    fingerprints = []
    for text in ("X = 1\n", "X = 2\n", "X = 1\n"):
        core.write_text(text)
        graph_cache.source_fingerprint.cache_clear()
        fingerprints.append(graph_cache.source_fingerprint())
    graph_cache.source_fingerprint.cache_clear()
    sys.modules.pop("traced_pkg", None)
    assert fingerprints[0] != fingerprints[1] and fingerprints[0] == fingerprints[2]
