"""--kv-cache-dtype through the commands: `jaxserve serve`, `generate` and `run` on the tiny llama build
an int8 KV cache from the flag or from Ollama's OLLAMA_KV_CACHE_TYPE=q8_0, and answer as LLM does;
q4_0 is refused by name before anything loads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx

from jaxserve import LLM, SamplingParams
from serverlib import running

JAXSERVE = os.path.join(os.path.dirname(sys.executable), "jaxserve")
FLAGS = ["--max-model-len", "64", "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--block-size", "4"]
PROMPT = "w5 w6 w7 w8"


def int8_text(folder: str, prompt: str = PROMPT) -> str:
    llm = LLM(folder, kv_cache_dtype="int8", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4)
    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text


def with_chat_template(folder: str, tmp_path) -> str:
    """A copy of the tiny checkpoint whose tokenizer has a (plain) chat template, which `run` needs."""
    copy = tmp_path / "chat"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return str(copy)


def test_generate_run_and_serve_take_the_kv_cache_dtype(tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint("llama")[0]
    want = int8_text(folder)
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_KV_CACHE_TYPE"}
    done = subprocess.run([JAXSERVE, "generate", PROMPT, "--model", folder, "--max-tokens", "6", "--temperature", "0",
                           "--kv-cache-dtype", "int8", *FLAGS], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip("\n") == want and "tokens, int8" in done.stderr  # the engine's KV cache log line
    # run logs nothing (as Ollama's): its answer is the int8 engine's on the chat-templated prompt.
    done = subprocess.run([JAXSERVE, "run", with_chat_template(folder, tmp_path), PROMPT, "--temperature", "0",
                           "--max-tokens", "6", *FLAGS],
                          capture_output=True, text=True, timeout=600, env={**env, "OLLAMA_KV_CACHE_TYPE": "q8_0"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == int8_text(folder, PROMPT + " ").strip()
    with running([folder, "--kv-cache-dtype", "int8", *FLAGS], tmp_path / "serve.log") as srv:
        model = httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = httpx.post(f"{srv.url}/v1/completions", json={"model": model, "prompt": PROMPT,
                                                              "max_tokens": 6, "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == want
    assert "tokens, int8" in (tmp_path / "serve.log").read_text()


def test_ollama_q4_0_is_refused_by_name():
    done = subprocess.run([JAXSERVE, "run", "w5", "--max-model-len", "64"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OLLAMA_KV_CACHE_TYPE": "q4_0"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "OLLAMA_KV_CACHE_TYPE: q4_0 (a 4-bit KV cache) is not supported; use q8_0" in done.stderr
