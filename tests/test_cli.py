"""`jaxserve generate` streams the same completion the offline API makes, and refuses a model that only embeds."""
from __future__ import annotations

import os
import subprocess
import sys

from jaxserve import SamplingParams


def test_generate_command_streams_the_greedy_completion(smollm2_llm):
    prompt = "The capital of France is"
    want = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    jaxserve = os.path.join(os.path.dirname(sys.executable), "jaxserve")
    done = subprocess.run([jaxserve, "generate", prompt, "--max-tokens", "12", "--max-model-len", "512"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip("\n") == want.outputs[0].text


def test_generate_command_reports_bad_input_without_a_traceback():
    jaxserve = os.path.join(os.path.dirname(sys.executable), "jaxserve")
    done = subprocess.run([jaxserve, "generate", "hi", "--model", "/no/such/model"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "/no/such/model" in done.stderr and "Traceback" not in done.stderr


def test_generate_command_refuses_an_embedding_model(minilm):
    jaxserve = os.path.join(os.path.dirname(sys.executable), "jaxserve")
    done = subprocess.run([jaxserve, "generate", "hi", "--model", minilm, "--no-warmup"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "runs as a pooling model (it embeds): it cannot generate text" in done.stderr
