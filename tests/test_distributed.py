"""Multi-process tensor parallelism: two local CPU processes joined by jax.distributed (gloo
collectives), one device each, split the tiny model over both and give the one-device tokens."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from jaxserve import LLM, SamplingParams
from testlib import PAGE_SIZE

PROMPTS = [[5, 17, 33, 8, 9, 100], [7, 7, 250, 3]]
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_model_and_match_one_device(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    want = [o.outputs[0].token_ids for o in LLM(
        folder, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64, block_size=PAGE_SIZE).generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)]
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}  # one device per process
    procs = [subprocess.Popen([sys.executable, WORKER, str(i), coordinator, folder, json.dumps(PROMPTS)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        line = next(l for l in out.splitlines() if l.startswith("TOKENS "))
        results.append(json.loads(line[len("TOKENS "):]))
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["count"] == 2 for r in results)
    assert [r["tokens"] for r in results] == [want, want]
