"""One process of the two-process tensor-parallel run in test_distributed.py (not a test module).

    python distributed_worker.py PROCESS_ID COORDINATOR MODEL_FOLDER PROMPTS_JSON
prints the greedy tokens as one JSON line after "TOKENS ".
"""
import json
import sys

from jaxserve.parallel import initialize_distributed

process_id, coordinator, folder, prompts = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
initialize_distributed(coordinator, num_processes=2, process_id=process_id)

import jax  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402

llm = LLM(folder, tensor_parallel_size=2, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64, block_size=4)
q_proj = llm.engine.runner.params["layers"]["attn"]["q_proj"]
assert {d.process_index for d in q_proj.sharding.device_set} == {0, 1}, q_proj.sharding
outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
print("TOKENS " + json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                              "tokens": [o.outputs[0].token_ids for o in outs]}), flush=True)
