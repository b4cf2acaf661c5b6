"""Speculative decoding through the commands: `jaxserve generate`, `run` and `serve` take
--speculative-model (a draft model's path, or "[ngram]") and answer exactly as plain greedy decoding
does, /metrics counting the drafts."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx

from jaxserve import LLM, SamplingParams
from serverlib import running
from test_kv_cache_dtype_serve import with_chat_template

JAXSERVE = os.path.join(os.path.dirname(sys.executable), "jaxserve")
FLAGS = ["--max-model-len", "64", "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--block-size", "4"]
PROMPT = "w5 w6 w7 w8 w5 w6 w7"


def plain_text(folder: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    llm = LLM(folder, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)[0].outputs[0].text


def test_generate_run_and_serve_speculate_with_a_draft_model_and_ngrams(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("llama")[0]
    draft = ["--speculative-model", folder, "--num-speculative-tokens", "3"]  # the model drafting for itself
    ngram = ["--speculative-model", "[ngram]", "--num-speculative-tokens", "3", "--ngram-prompt-lookup-max", "3"]
    want = plain_text(folder)
    # One process per command: generate with n-grams, run and serve with the draft model.
    done = subprocess.run([JAXSERVE, "generate", PROMPT, "--model", folder, "--max-tokens", "12",
                           "--temperature", "0", *ngram, *FLAGS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip("\n") == want and "3 drafts a step from n-gram prompt lookup" in done.stderr
    chat = with_chat_template(folder, tmp_path)
    done = subprocess.run([JAXSERVE, "run", chat, PROMPT, "--temperature", "0", "--max-tokens", "12",
                           "--speculative-model", chat, "--num-speculative-tokens", "3", *FLAGS],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == plain_text(folder, PROMPT + " ").strip()
    with running([folder, *draft, *FLAGS], tmp_path / "serve.log") as srv:
        model = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(f"{srv.url}/v1/completions", json={"model": model, "prompt": PROMPT,
                                                              "max_tokens": 12, "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
    drafted = [line for line in metrics.splitlines() if line.startswith("jaxserve:spec_decode_num_draft_tokens_total")]
    accepted = [line for line in metrics.splitlines()
                if line.startswith("jaxserve:spec_decode_num_accepted_tokens_total")]
    assert "3 drafts a step from the draft model" in (tmp_path / "serve.log").read_text()
    # A model drafting for itself: every draft accepted.
    assert float(drafted[0].split()[-1]) > 0 and accepted[0].split()[-1] == drafted[0].split()[-1]
