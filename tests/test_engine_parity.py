"""Logits and greedy tokens through the whole engine path (scheduler, pages, chunked prefill,
runner) against transformers: tiny random models of every family, and the bundled SmolLM2."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from jaxserve import LLM, SamplingParams
from jaxserve.block_pool import BlockPool
from jaxserve.config import SchedulerConfig
from jaxserve.models import load_model
from jaxserve.pallas_kernels import attention_backend
from jaxserve.request import Request, RequestStatus
from jaxserve.runner import ModelRunner
from jaxserve.scheduler import Scheduler

PROMPTS = [[5, 17, 33, 99, 4, 250, 61, 7, 300, 12, 45], [8, 140, 141, 9, 77, 3], [200, 201, 13, 19, 88, 64, 32, 16, 6]]


def engine_logits(folder: str, prompts, *, block_size=4, budget=8, dtype="float32"):
    """All-position logits of each prompt, computed by the engine's scheduler and runner in chunks."""
    loaded = load_model(folder, dtype)
    sched_cfg = SchedulerConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=budget)
    pool = BlockPool(num_pages=64, block_size=block_size)
    scheduler = Scheduler(sched_cfg, pool)
    runner = ModelRunner(loaded.model, loaded.params, num_pages=64, block_size=block_size, max_model_len=64,
                         max_num_seqs=4, max_num_batched_tokens=budget,
                         attention_fn=attention_backend("jnp"))
    model = loaded.model

    @jax.jit
    def all_logits(params, kv_cache, inputs):
        hidden, kv_cache = model.forward(params, inputs.tokens, kv_cache, inputs.attn,
                                         attention_fn=runner.attention_fn)
        return kv_cache, model.compute_logits(params, hidden)

    requests = [Request(str(i), list(p), SamplingParams(max_tokens=1), seed=0, max_tokens=1, eos_token_ids=())
                for i, p in enumerate(prompts)]
    for r in requests:
        scheduler.add(r)
    rows = {r.request_id: [] for r in requests}
    chunked = False
    while scheduler.has_work():
        out = scheduler.schedule()
        chunked |= any(not s.samples for s in out.seqs)
        _, inputs = runner.prepare(out, [None] * len(out.seqs))
        runner.kv_cache, logits = all_logits(runner.params, runner.kv_cache, inputs.model)
        logits = np.asarray(logits)
        offset = 0
        for seq in out.seqs:
            rows[seq.request.request_id].append(logits[offset:offset + seq.num_tokens])
            offset += seq.num_tokens
        scheduler.update_after_step(out)
        for seq in out.seqs:
            if seq.samples:
                scheduler.finish(seq.request, RequestStatus.FINISHED_LENGTH)
    assert chunked, "the token budget should have split at least one prompt"
    return [np.concatenate(rows[r.request_id]) for r in requests]


def test_paged_chunked_logits_match_transformers(tiny_checkpoint, tiny_kind):
    folder, hf = tiny_checkpoint(tiny_kind)
    ours = engine_logits(folder, PROMPTS)
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def hf_greedy(hf, prompt, new_tokens):
    """transformers generate(do_sample=False), never stopping early (the engine runs with ignore_eos)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_continuations_match_transformers_generate(tiny_checkpoint, tiny_kind):
    folder, hf = tiny_checkpoint(tiny_kind)
    llm = LLM(folder, dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)


CHATS = ["What is the capital of France?", "Write a haiku about snow.", "What is 12 times 7?",
         "Name three primary colors.", "Translate 'good morning' to French.", "Who wrote Hamlet?",
         "Give me a synonym for happy.", "What is the boiling point of water in Celsius?"]


def test_smollm2_chat_batch_matches_transformers(smollm2_llm, smollm2_hf):
    llm = smollm2_llm
    tok = llm.get_tokenizer()
    conversations = [[{"role": "user", "content": c}] for c in CHATS]
    # The engine is shared by the session: another test may have cached these prompts' pages.
    llm.reset_prefix_cache()
    steps_before = llm.stats().steps
    outs = llm.chat(conversations, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    # 8 prompts of ~30 tokens against a 64-token budget: some prompt was computed over several steps.
    log = list(llm.engine.step_log)[-(llm.stats().steps - steps_before):]
    prefill_steps = [sum(1 for r in log if r.scheduled.get(o.request_id, 0) > 1) for o in outs]
    assert max(prefill_steps) >= 2
    for conv, out in zip(conversations, outs):
        ids = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False).input_ids
        assert out.prompt_token_ids == ids
        with torch.no_grad():
            want = smollm2_hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == want, (conv, out.outputs[0].text)
    assert "Paris" in outs[0].outputs[0].text
