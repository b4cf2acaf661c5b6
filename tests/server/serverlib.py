"""Helpers for the server tests: `jaxserve serve` as a subprocess on a free 127.0.0.1 port, and
/metrics readers."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx

from testlib import SMOLLM2_ENGINE_ARGS

MODEL = "smollm2"
ENGINE_FLAGS = ["--max-num-seqs", str(SMOLLM2_ENGINE_ARGS["max_num_seqs"]),
                "--max-num-batched-tokens", str(SMOLLM2_ENGINE_ARGS["max_num_batched_tokens"]),
                "--max-model-len", str(SMOLLM2_ENGINE_ARGS["max_model_len"])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`verify`: what httpx checks an HTTPS server's certificate with (an ssl.SSLContext of the
    test's CA); the URL is https:// when one is given."""

    def __init__(self, args: list[str], log_path, env: dict | None = None, verify=None):
        self.port = free_port()
        self.verify = verify if verify is not None else True
        self.url = f"{'https' if verify is not None else 'http'}://127.0.0.1:{self.port}"
        self.log_path = log_path
        jaxserve = os.path.join(os.path.dirname(sys.executable), "jaxserve")
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([jaxserve, "serve", "--port", str(self.port), *ENGINE_FLAGS, *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jaxserve serve exited with {self.proc.returncode}:\n{self.read_log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"jaxserve serve not ready after {timeout} s:\n{self.read_log()[-3000:]}")

    def read_log(self) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self, sig=signal.SIGINT, timeout: float = 10) -> int:
        if self.log.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(args: list[str], log_path, env: dict | None = None, verify=None):
    """A ready `jaxserve serve` for a fixture to yield; stopped with SIGINT (as Ctrl-C) on the way
    out, and required to exit cleanly."""
    srv = ServerProcess(args, log_path, env, verify)
    try:
        srv.wait_ready()
        yield srv
    finally:
        assert srv.stop() == 0, srv.read_log()[-3000:]


def scrape(url: str) -> dict[str, float]:
    """/metrics as {"name{labels}": value} (only jaxserve: samples)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        if line.startswith("jaxserve:"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str) -> float:
    """Sum of a metric's samples over all label sets."""
    pattern = re.compile(rf"^{re.escape(name)}(\{{.*\}})?$")
    return sum(v for k, v in samples.items() if pattern.match(k))


def wait_idle(url: str, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        idle = (metric(samples, "jaxserve:num_requests_running") == 0
                and metric(samples, "jaxserve:num_requests_waiting") == 0)
        if idle or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)
