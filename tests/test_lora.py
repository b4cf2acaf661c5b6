"""Multi-LoRA through the whole engine against transformers + PEFT: two adapters of different ranks,
scalings and target modules give the greedy tokens of the model with the adapter merged
(merge_and_unload), alone and mixed in one batch with base-model rows (and one adapter on every
projection of Qwen2 and Qwen3, whose q/k/v have a bias or a norm after them); the prefix cache never
hands one adapter's pages to another; more adapters than slots wait their turn; loading,
swapping and unloading compile nothing; bad adapters are refused by name and the engine carries on.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from testlib import compile_counter, make_peft_adapter
from test_engine_parity import hf_greedy
from jaxserve import LLM, SamplingParams
from jaxserve.engine import LLMEngine
from jaxserve.lora import LoRAAdapter, LoRAConfig, LoRARequest, parse_lora_modules
from jaxserve.lora_manager import LoRAManager
from jaxserve.runner import LORA_WRITE

COUNTER = compile_counter()
PROMPTS = [[5, 17, 33, 99, 4, 250, 61, 7, 300, 12, 45], [8, 140, 141, 9, 77, 3], [200, 201, 13, 19, 88, 64, 32, 16, 6]]
NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def lora_llm(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    return LLM(folder, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
               enable_lora=True, max_loras=2, max_lora_rank=8)


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint, tiny_adapters):
    """(adapter name or None, prompt index) -> transformers' greedy tokens, computed once."""
    _, base = tiny_checkpoint("llama")
    models = {None: base, **{name: merged for name, (_, merged) in tiny_adapters.items()}}
    return {(name, i): hf_greedy(model, p, NEW_TOKENS) for name, model in models.items() for i, p in enumerate(PROMPTS)}


def lora_requests(tiny_adapters) -> dict[str, LoRARequest]:
    return {name: LoRARequest(name, i + 1, folder) for i, (name, (folder, _)) in enumerate(sorted(tiny_adapters.items()))}


def test_each_adapter_alone_and_mixed_with_the_base_model_matches_peft_merged(lora_llm, tiny_adapters, oracle):
    loras = lora_requests(tiny_adapters)
    for name, lora in loras.items():
        outs = lora_llm.generate(PROMPTS, GREEDY, lora_request=lora, use_tqdm=False)
        for i, out in enumerate(outs):
            assert oracle[name, i] != oracle[None, i], "the adapter should change the greedy tokens"
            assert out.outputs[0].token_ids == oracle[name, i], (name, i)
    # One batch: every prompt with no adapter and with each adapter, rows interleaved.
    rows = [(name, i) for i in range(len(PROMPTS)) for name in (None, *loras)]
    steps_before = lora_llm.stats().steps
    outs = lora_llm.generate([PROMPTS[i] for _, i in rows], GREEDY,
                             lora_request=[loras.get(name) for name, _ in rows], use_tqdm=False)
    for (name, i), out in zip(rows, outs):
        assert out.outputs[0].token_ids == oracle[name, i], (name, i)
    adapter_of = {out.request_id: name for (name, _), out in zip(rows, outs)}
    log = list(lora_llm.engine.step_log)[-(lora_llm.stats().steps - steps_before):]
    assert any({adapter_of[rid] for rid in record.scheduled} == {None, *loras} for record in log), \
        "some step should run base rows and both adapters together"


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])  # q/k/v bias; per-head q/k norm after the projection
def test_an_adapter_on_all_seven_projections_of_other_families_matches_peft_merged(kind, tiny_checkpoint, tmp_path):
    folder, hf = tiny_checkpoint(kind)
    merged = make_peft_adapter(hf, tmp_path / "all", seed=3, r=4, lora_alpha=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    llm = LLM(folder, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              enable_lora=True, max_lora_rank=4)
    lora = LoRARequest("all", 1, str(tmp_path / "all"))
    outs = llm.generate(PROMPTS, GREEDY, lora_request=[lora, None, lora], use_tqdm=False)
    for i, (model, out) in enumerate(zip((merged, hf, merged), outs)):
        assert out.outputs[0].token_ids == hf_greedy(model, PROMPTS[i], NEW_TOKENS), i
    assert outs[0].outputs[0].token_ids != hf_greedy(hf, PROMPTS[0], NEW_TOKENS)


@pytest.mark.parametrize("kind", ["gemma3", "qwen2_moe"])
def test_adapters_on_layer_periods_and_on_experts_models(kind, tiny_checkpoint, tmp_path):
    """Gemma 3's layers run as a period scan plus a tail: each layer still gets its own slice of
    the adapter. A mixture of experts has no one MLP: adapters of q/k/v/o work there, and one
    naming an MLP projection is refused."""
    folder, hf = tiny_checkpoint(kind)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    merged = make_peft_adapter(hf, tmp_path / "a", seed=4, r=4, lora_alpha=8,
                               target_modules=attention + (["gate_proj", "down_proj"] if kind == "gemma3" else []))
    llm = LLM(folder, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
              enable_lora=True, max_lora_rank=4)
    lora = LoRARequest("a", 1, str(tmp_path / "a"))
    outs = llm.generate(PROMPTS[:2], GREEDY, lora_request=[lora, None], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == hf_greedy(merged, PROMPTS[0], NEW_TOKENS)
    assert outs[1].outputs[0].token_ids == hf_greedy(hf, PROMPTS[1], NEW_TOKENS)
    assert outs[0].outputs[0].token_ids != hf_greedy(hf, PROMPTS[0], NEW_TOKENS)
    if kind == "qwen2_moe":
        # PEFT cannot target the fused experts; a hand-made adapter naming mlp.gate_proj stands in.
        with pytest.raises(ValueError, match="gate_proj"):
            llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest("mlp", 2, str(_mlp_adapter(tmp_path, folder))),
                         use_tqdm=False)


def _mlp_adapter(tmp_path, folder):
    """An adapter of a dense model's gate_proj, written by hand (folder's model has experts)."""
    import json

    from safetensors.numpy import save_file

    out = tmp_path / "mlp"
    out.mkdir()
    config = json.load(open(f"{folder}/config.json"))
    D = config["hidden_size"]
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["gate_proj"], "base_model_name_or_path": None}))
    save_file({"base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": np.zeros((2, D), np.float32),
               "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight": np.zeros((8, 2), np.float32)},
              str(out / "adapter_model.safetensors"))
    return out


def test_the_prefix_cache_keys_pages_by_adapter(lora_llm, tiny_adapters, oracle):
    loras = lora_requests(tiny_adapters)
    a, b = sorted(loras)
    pool, prompt = lora_llm.engine.pool, PROMPTS[0]  # 11 tokens: 2 full pages of 4 can be shared
    lora_llm.reset_prefix_cache()

    def run(name, lora):
        hits = pool.prefix_hits
        out = lora_llm.generate(prompt, GREEDY, lora_request=lora, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == oracle[name, 0], name
        return pool.prefix_hits - hits

    assert run(a, loras[a]) == 0
    assert run(None, None) == 0      # the same tokens under no adapter: not a's pages
    assert run(b, loras[b]) == 0     # nor under another adapter
    assert run(a, loras[a]) == 8     # a's own pages again
    assert run(None, None) == 8
    # Unloaded and loaded again from the same files: a new adapter as far as the cache knows.
    assert lora_llm.engine.remove_lora(a)
    assert run(a, loras[a]) == 0


def test_more_adapters_than_slots_wait_and_loading_swapping_unloading_compile_nothing(lora_llm, tiny_adapters, oracle):
    runner = lora_llm.engine.runner
    assert LORA_WRITE in runner.warmup_keys
    assert runner.num_compiled_warmup == len(runner.warmup_keys) == runner.num_compiled
    before = COUNTER.count
    loras = lora_requests(tiny_adapters)
    # A third adapter (a's files under another name) with max_loras=2: one of them must wait for a
    # slot, which is then written over.
    a = sorted(loras)[0]
    third = LoRARequest("third", 99, loras[a].lora_path)
    lora_llm.engine.add_lora(third)
    names = [*loras, "third"]
    requests = {**loras, "third": third}
    rows = [(name, i) for i in range(len(PROMPTS)) for name in names]
    steps_before = lora_llm.stats().steps
    outs = lora_llm.generate([PROMPTS[i] for _, i in rows], GREEDY,
                             lora_request=[requests[name] for name, _ in rows], use_tqdm=False)
    for (name, i), out in zip(rows, outs):
        assert out.outputs[0].token_ids == oracle[a if name == "third" else name, i], (name, i)
    adapter_of = {out.request_id: name for (name, _), out in zip(rows, outs)}
    log = list(lora_llm.engine.step_log)[-(lora_llm.stats().steps - steps_before):]
    per_step = [{adapter_of[rid] for rid in record.scheduled} for record in log]
    assert max(len(s) for s in per_step) == 2 and set().union(*per_step) == set(names)
    assert lora_llm.engine.remove_lora("third") and not lora_llm.engine.remove_lora("third")
    outs = lora_llm.generate(PROMPTS[:1], GREEDY, lora_request=loras[a], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == oracle[a, 0]
    assert COUNTER.count == before, "loading, swapping or unloading an adapter compiled a graph"
    assert runner.num_compiled == len(runner.warmup_keys)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _rename_tensor(folder: str, old: str, new: str) -> None:
    from safetensors.numpy import load_file, save_file
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    tensors = {k.replace(old, new): v for k, v in tensors.items()}
    save_file(tensors, path)


def _bad_adapters(tmp_path, tiny_checkpoint, tiny_adapters) -> dict[str, tuple[str, str]]:
    """kind -> (adapter folder, the words its refusal must contain)."""
    good = tiny_adapters["attn_mlp"][0]
    qwen3_folder, qwen3 = tiny_checkpoint("qwen3")  # head_dim 32: q/k/v/o of other shapes
    _, llama = tiny_checkpoint("llama")
    bad = {"missing folder": (str(tmp_path / "nowhere"), "no such folder")}
    no_weights = _copy(good, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "adapter_model.safetensors"))
    bad["no weights"] = (no_weights, "no adapter_model.safetensors")
    bad["rank above max"] = (str(tmp_path / "rank16"), "rank 16 (q_proj) is above --max-lora-rank 8")
    make_peft_adapter(llama, tmp_path / "rank16", r=16, lora_alpha=16, target_modules=["q_proj"])
    lacking = _copy(good, tmp_path / "lacking")
    _edit_config(lacking, target_modules=["q_proj", "c_attn"])
    bad["target the model lacks"] = (lacking, "targets c_attn, which this model does not have")
    lm_head = _copy(good, tmp_path / "lm_head")
    _rename_tensor(lm_head, "layers.0.mlp.down_proj", "layers.0.mlp.lm_head")
    bad["tensor of a module it lacks"] = (lm_head, "layers.0.mlp.lm_head.lora_A.weight is not the LoRA A/B")
    bad["shapes of another model"] = (str(tmp_path / "qwen3"), "needs A [r, 64] and B [64, r]: the adapter belongs to another model")
    make_peft_adapter(qwen3, tmp_path / "qwen3", r=4, target_modules=["q_proj"])
    deeper = _copy(good, tmp_path / "deeper")
    _rename_tensor(deeper, "layers.1.", "layers.5.")
    bad["layers of another model"] = (deeper, "layer 5, but the base model has 2 layers")
    named = _copy(good, tmp_path / "named")
    _edit_config(named, base_model_name_or_path=qwen3_folder)
    bad["base model named"] = (named, f"trained on {qwen3_folder}, another model than the one served (head_dim 32 vs 16)")
    dora = _copy(good, tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    bad["DoRA"] = (dora, "uses DoRA, which jaxserve does not support")
    return bad


def test_bad_adapters_are_refused_by_name_and_the_engine_carries_on(lora_llm, tiny_checkpoint, tiny_adapters, oracle,
                                                                    tmp_path):
    registered = {r.lora_name for r in lora_llm.engine.list_loras()}
    for i, (kind, (folder, words)) in enumerate(_bad_adapters(tmp_path, tiny_checkpoint, tiny_adapters).items()):
        with pytest.raises(ValueError, match=re.escape(words)):
            lora_llm.generate(PROMPTS[0], GREEDY, lora_request=LoRARequest(f"bad{i}", 1000 + i, folder), use_tqdm=False)
    assert {r.lora_name for r in lora_llm.engine.list_loras()} == registered
    assert not lora_llm.engine.has_unfinished_requests()
    # A name bound to other files is refused too; the good adapters still serve.
    name, (folder, _) = "attn_mlp", tiny_adapters["attn_mlp"]
    lora_llm.generate(PROMPTS[1], GREEDY, lora_request=LoRARequest(name, 1, folder), use_tqdm=False)
    with pytest.raises(ValueError, match="is loaded as id 1"):
        lora_llm.generate(PROMPTS[1], GREEDY, lora_request=LoRARequest(name, 1, folder + "/.."), use_tqdm=False)
    outs = lora_llm.generate(PROMPTS, GREEDY, lora_request=LoRARequest(name, 1, folder), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [oracle[name, i] for i in range(len(PROMPTS))]


def test_an_engine_without_lora_refuses_adapters():
    engine = LLMEngine.__new__(LLMEngine)  # what LLM(enable_lora=False) builds holds no LoRA manager
    engine.loras = None
    with pytest.raises(ValueError, match="LoRA is not enabled: start the engine with enable_lora=True"):
        LLMEngine.add_lora(engine, LoRARequest("a", 1, "/a"))


# ---- host bookkeeping --------------------------------------------------------------------------

def _adapter(name: str, uid_source=iter(range(10_000))) -> LoRAAdapter:
    return LoRAAdapter(LoRARequest(name, 1 + next(uid_source), f"/{name}"), rank=1, a={}, b={})


def test_slots_are_held_by_running_requests_and_the_least_recently_used_idle_one_is_reused():
    manager = LoRAManager(LoRAConfig(max_loras=2, max_lora_rank=8), model_config=None)
    x, y, z = (_adapter(n) for n in "xyz")
    manager.adapters = {a.name: a for a in (x, y, z)}
    assert manager.acquire(x) == 1 and manager.acquire(y) == 2 and manager.acquire(x) == 1
    assert manager.take_writes() == [(1, x), (2, y)] and manager.take_writes() == []
    assert manager.acquire(z) is None              # both slots held by running requests
    manager.release(2)                             # y idle: its slot goes to z
    assert manager.acquire(z) == 2 and manager.take_writes() == [(2, z)]
    manager.release(1), manager.release(1)         # x idle, then z idle: x is the older
    manager.release(2)
    assert manager.acquire(y) == 1 and manager.take_writes() == [(1, y)]
    assert manager.acquire(z) == 2 and manager.take_writes() == []  # still resident: no write


def test_an_unloaded_adapter_keeps_its_slot_until_its_last_request_ends():
    manager = LoRAManager(LoRAConfig(max_loras=1, max_lora_rank=8), model_config=None)
    x, y = _adapter("x"), _adapter("y")
    manager.adapters = {"x": x, "y": y}
    slot = manager.acquire(x)
    assert manager.remove("x") and "x" not in manager.adapters
    assert manager.acquire(y) is None              # x's request still runs with it
    manager.release(slot)
    assert manager.acquire(y) == slot and manager.slot_of == {y.uid: slot}
    assert not manager.remove("x")


def test_lora_modules_take_vllm_forms():
    got = parse_lora_modules(["a=/p/a", '{"name": "b", "path": "/p/b", "base_model_name": "base"}'])
    assert got == [LoRARequest("a", 1, "/p/a"), LoRARequest("b", 2, "/p/b", "base")]
    for bad, words in (("a", "neither name=path nor a JSON object"), ('{"name": "a"}', 'needs string fields'),
                       ("{nope", "is not valid JSON")):
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_lora_modules([bad])
    with pytest.raises(ValueError, match="given twice"):
        parse_lora_modules(["a=/x", "a=/y"])


def test_serve_refuses_lora_modules_without_enable_lora(capsys):
    from jaxserve.cli import main
    with pytest.raises(SystemExit) as done:
        main(["serve", "--lora-modules", "a=/nowhere"])
    assert done.value.code == 2 and "--lora-modules needs --enable-lora" in capsys.readouterr().err


def test_slot_contents_are_padded_to_the_max_rank_with_every_module():
    shapes = {"q_proj": (3, 4), "down_proj": (5, 3)}
    a, b = np.ones((2, 3, 2), np.float32), np.full((2, 2, 4), 2.0, np.float32)
    adapter = LoRAAdapter(LoRARequest("x", 1, "/x"), rank=2, a={"q_proj": a}, b={"q_proj": b})
    slot_a, slot_b = adapter.slot_arrays(shapes, num_layers=2, max_rank=4, dtype=np.float32)
    assert slot_a["q_proj"].shape == (2, 3, 4) and slot_b["q_proj"].shape == (2, 4, 4)
    np.testing.assert_array_equal(slot_a["q_proj"][..., :2], a)
    assert not slot_a["q_proj"][..., 2:].any() and not slot_b["q_proj"][:, 2:].any()
    assert not slot_a["down_proj"].any() and slot_b["down_proj"].shape == (2, 4, 3)
