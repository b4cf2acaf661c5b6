"""`jaxserve serve --distributed` over two local CPU processes (one device each, tensor parallel 2):
process 0 serves HTTP and mirrors every engine call to process 1, so both run the sharded steps in
lockstep; the answers equal the one-process offline ones, and process 1 exits when process 0 stops."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx

from jaxserve import LLM, SamplingParams
from serverlib import ServerProcess, free_port
from testlib import PAGE_SIZE

TINY = ["--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--max-model-len", "64",
        "--block-size", str(PAGE_SIZE)]
PROMPTS = [[5, 17, 33, 8, 9, 100], [7, 7, 250, 3]]


def test_two_process_server_answers_as_one_device(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("llama")
    llm = LLM(folder, max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64, block_size=PAGE_SIZE)
    want = [o.outputs[0].text for o in llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10),
                                                    use_tqdm=False)]
    coordinator = f"127.0.0.1:{free_port()}"
    common = [folder, *TINY, "--tensor-parallel-size", "2", "--distributed", "--coordinator-address", coordinator,
              "--num-processes", "2"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    jaxserve = os.path.join(os.path.dirname(sys.executable), "jaxserve")
    follower_log = open(tmp_path / "follower.log", "w")
    follower = subprocess.Popen([jaxserve, "serve", *common, "--process-id", "1"], stdout=follower_log,
                                stderr=subprocess.STDOUT, env={**os.environ, **env})
    leader = ServerProcess([*common, "--process-id", "0", "--served-model-name", "tiny"], tmp_path / "leader.log",
                           env=env)
    try:
        leader.wait_ready()
        got = []
        for prompt in PROMPTS:
            r = httpx.post(f"{leader.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 10,
                                                                 "temperature": 0}, timeout=120)
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["text"])
        assert got == want
        assert follower.poll() is None  # still following
    finally:
        assert leader.stop() == 0, leader.read_log()[-3000:]
        follower.wait(timeout=60)
        follower_log.close()
    assert follower.returncode == 0, open(tmp_path / "follower.log").read()[-3000:]
