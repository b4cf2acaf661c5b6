"""Offline embeddings (`LLM.embed`, vLLM's API): all-MiniLM-L6-v2 against a sentence-transformers
style reference (transformers BertModel, the pooling its files name, normalised); decoders run as
pooling models against transformers' hidden states; input limits, truncation, Matryoshka
dimensions; the runner each model gets; nothing compiles after warm-up."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxserve import LLM
from jaxserve.pooling_params import PoolingParams
from testlib import compile_counter, sentence_embeddings

COUNTER = compile_counter()
TEXTS = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome",
         "Ein Mann isst Essen. ¿Qué hora es? 東京は日本の首都です。", "x",
         "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs, and jaxserve pads every batch "
         "of texts to a few bucket sizes so that it compiles one graph per bucket, once, at start-up."]
# 301 distinct words: whether truncation kept the first or the last tokens shows in the ids.
LONG = " ".join(f"w{i}" for i in range(301))


def _minilm_pipeline(folder: str) -> tuple[str, bool]:
    """(pooling, normalize) read from the sentence-transformers files here, not by jaxserve's reader."""
    with open(os.path.join(folder, "modules.json")) as f:
        kinds = [m["type"].rsplit(".", 1)[-1] for m in json.load(f)]
    with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
        flags = json.load(f)
    pooling = "mean" if flags["pooling_mode_mean_tokens"] else "cls" if flags["pooling_mode_cls_token"] else "last"
    return pooling, "Normalize" in kinds


def _cosines(outs, reference) -> np.ndarray:
    ours = np.array([o.outputs.embedding for o in outs])
    return np.sum(ours * reference, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)


def test_embeddings_match_sentence_transformers(minilm, minilm_llm, minilm_hf):
    hf_model, tokenizer = minilm_hf
    pooling, normalize = _minilm_pipeline(minilm)
    outs = minilm_llm.embed(TEXTS)
    ids = [tokenizer(t).input_ids for t in TEXTS]
    assert [o.prompt_token_ids for o in outs] == ids
    assert all(len(o.outputs.embedding) == 384 and isinstance(o.outputs.embedding[0], float) for o in outs)
    reference = sentence_embeddings(hf_model, ids, pooling=pooling, normalize=normalize)
    assert _cosines(outs, reference).min() >= 0.9999
    np.testing.assert_allclose([np.linalg.norm(o.outputs.embedding) for o in outs], 1.0, atol=1e-5)
    # Token ids embed as their text does.
    by_ids = minilm_llm.embed(ids[:2])
    np.testing.assert_allclose([o.outputs.embedding for o in by_ids], [o.outputs.embedding for o in outs[:2]],
                               atol=1e-6)
    # So do vLLM's prompt dicts.
    by_dicts = minilm_llm.embed([{"prompt": TEXTS[0]}, {"prompt_token_ids": ids[1]}])
    np.testing.assert_allclose([o.outputs.embedding for o in by_dicts], [o.outputs.embedding for o in outs[:2]],
                               atol=1e-6)


def test_batches_of_every_size_compile_nothing_after_warmup(minilm_llm):
    engine = minilm_llm.engine
    runner = engine.runner
    assert runner.num_compiled == len(runner.buckets) == 5  # T 16..256, B 8: all built at warm-up
    before, buckets_before = COUNTER.count, engine.bucket_counts.copy()
    single = minilm_llm.embed("one short text")
    many = minilm_llm.embed([f"sentence number {i} of a batch larger than one step" for i in range(21)])
    longest = minilm_llm.embed(LONG, truncate_prompt_tokens=-1)
    assert COUNTER.count == before, "embedding compiled a new graph"
    assert runner.num_compiled == 5
    used = engine.bucket_counts - buckets_before
    assert len(used) >= 3 and (256, 8) in used  # several buckets, the largest one included
    # A text embeds the same alone and among 20 others in a step.
    assert np.allclose(minilm_llm.embed("sentence number 3 of a batch larger than one step")[0].outputs.embedding,
                       many[3].outputs.embedding, atol=1e-5)
    assert len(single) == 1 and len(many) == 21 and len(longest[0].prompt_token_ids) == 256


def test_a_text_past_the_input_limit_is_refused_unless_truncation_is_asked(minilm_llm, minilm_hf):
    hf_model, tokenizer = minilm_hf
    ids = tokenizer(LONG).input_ids
    assert len(ids) > 256
    with pytest.raises(ValueError, match=f"prompt has {len(ids)} tokens, more than this model's input limit of 256"):
        minilm_llm.embed(LONG)
    # vLLM's truncate_prompt_tokens keeps the last tokens; [CLS] and [SEP] stay.
    (out,) = minilm_llm.embed(LONG, truncate_prompt_tokens=-1)
    assert out.prompt_token_ids == [ids[0], *ids[-255:]] and len(out.prompt_token_ids) == 256
    (ten,) = minilm_llm.embed(LONG, truncate_prompt_tokens=10)
    assert ten.prompt_token_ids == [ids[0], *ids[-9:]]
    reference = sentence_embeddings(hf_model, [out.prompt_token_ids, ten.prompt_token_ids])
    assert _cosines([out, ten], reference).min() >= 0.9999
    (by_ids,) = minilm_llm.embed(ids, truncate_prompt_tokens=10)  # token ids: the last 10, as they are
    assert by_ids.prompt_token_ids == ids[-10:]
    # Ollama's side keeps the first tokens.
    (first,) = minilm_llm.embed(LONG, pooling_params=PoolingParams(truncate_prompt_tokens=-1, truncation_side="right"))
    assert first.prompt_token_ids == [*ids[:255], ids[-1]]
    with pytest.raises(ValueError, match="truncate_prompt_tokens \\(300\\) is more than this model's input limit"):
        minilm_llm.embed(LONG, truncate_prompt_tokens=300)


@pytest.mark.parametrize("prompts, message", [
    ([], "prompt must hold at least one input"),
    ([[]], "prompt is empty"),
    (["ok", [101, 30522]], "prompt\\[1\\] holds token id 30522, outside the vocabulary \\[0, 30522\\)"),
    (["ok", {"prompt_token_ids": [101, "7"]}], "prompt\\[1\\] token ids must be integers, got '7'"),
    (["ok", {"text": "hi"}], "prompt\\[1\\]: a prompt dict needs exactly one of 'prompt'"),
])
def test_bad_prompts_are_refused_by_name(minilm_llm, prompts, message):
    with pytest.raises(ValueError, match=message):
        minilm_llm.embed(prompts)
    assert minilm_llm.embed("still fine")[0].outputs.embedding  # nothing broke


def test_each_api_refuses_the_other_kind_of_model(minilm, minilm_llm, tiny_checkpoint):
    with pytest.raises(ValueError, match="LLM.generate\\(\\) is only supported for generating models"):
        minilm_llm.generate("Hello")
    with pytest.raises(ValueError, match="LLM.chat\\(\\) is only supported for generating models"):
        minilm_llm.chat([{"role": "user", "content": "Hello"}])
    with pytest.raises(ValueError, match="dimensions is only supported by Matryoshka models"):
        minilm_llm.embed("Hello", pooling_params=PoolingParams(dimensions=64))
    folder, _ = tiny_checkpoint("llama")
    generating = LLM(folder, warmup=False, max_num_seqs=2, max_num_batched_tokens=16)
    assert generating.runner_type == "generate"
    with pytest.raises(ValueError, match="LLM.embed\\(\\) is only supported for pooling models.*runner='pooling'"):
        generating.embed("w3 w4")
    with pytest.raises(ValueError, match="BertModel cannot generate text, it only embeds"):
        LLM(minilm, runner="generate")
    with pytest.raises(ValueError, match="max_model_len \\(512\\) exceeds this model's input limit \\(256"):
        LLM(minilm, max_model_len=512)
    with pytest.raises(ValueError, match="runner 'pooling' runs on one device"):
        LLM(minilm, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="runner 'pooling' serves no LoRA adapters"):
        LLM(minilm, enable_lora=True)
    from jaxserve.engine_args import EngineArgs
    from jaxserve.lowering import lower_step_graphs
    with pytest.raises(ValueError, match="runner 'pooling' \\(BertModel\\) is not supported yet"):
        lower_step_graphs(EngineArgs(model=minilm), "cuda")


@pytest.fixture(scope="module")
def matryoshka_llama(tiny_checkpoint, tmp_path_factory):
    """The tiny llama checkpoint as a Matryoshka model: its files linked, is_matryoshka added."""
    source, hf_model = tiny_checkpoint("llama")
    folder = tmp_path_factory.mktemp("matryoshka_llama")
    for name in os.listdir(source):
        if name != "config.json":
            os.symlink(os.path.join(source, name), folder / name)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    (folder / "config.json").write_text(json.dumps({**config, "is_matryoshka": True}))
    return str(folder), hf_model


# 11 and 9 tokens cross the 4-token pages of the scratch cache; one text is a single token.
DECODER_PROMPTS = [list(np.random.default_rng(0).integers(3, 300, n)) for n in (11, 6, 9, 1)]


@pytest.mark.parametrize("kind, pooling_type", [("llama", "mean"), ("qwen3", "last")])
def test_decoders_pool_transformers_hidden_states(kind, pooling_type, tiny_checkpoint, matryoshka_llama):
    folder, hf_model = matryoshka_llama if kind == "llama" else tiny_checkpoint(kind)
    llm = LLM(folder, runner="pooling", pooling_type=pooling_type, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=32, block_size=4)
    assert llm.runner_type == "pooling" and llm.engine.pooler.normalize
    outs = llm.embed(DECODER_PROMPTS)
    reference = sentence_embeddings(hf_model.model, DECODER_PROMPTS, pooling=pooling_type)
    ours = np.array([o.outputs.embedding for o in outs])
    assert ours.shape == (4, 64)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    with pytest.raises(ValueError, match="LLM.generate\\(\\) is only supported for generating models"):
        llm.generate([1, 2, 3])
    if kind == "llama":  # Matryoshka: the first 16 values, renormalised
        (cut,) = llm.embed([DECODER_PROMPTS[0]], pooling_params=PoolingParams(dimensions=16))
        want = reference[0][:16] / np.linalg.norm(reference[0][:16])
        np.testing.assert_allclose(cut.outputs.embedding, want, atol=1e-5)
        with pytest.raises(ValueError, match="dimensions must be in \\[1, 64\\], got 65"):
            llm.embed([DECODER_PROMPTS[0]], pooling_params=PoolingParams(dimensions=65))
