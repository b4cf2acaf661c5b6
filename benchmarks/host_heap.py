"""The C heap under XLA:CPU's step buffers: glibc's defaults against JAXSERVE_HOST_HEAP=retain.

The heap is set up once per process, before JAX starts (jaxserve/host_heap.py), so every
measurement runs in a fresh process, the two heaps alternating (`--rounds` pairs: this 2-vCPU host
has whole minutes running slower than the next). Each child builds `LLM(model, max_num_seqs=rows)`,
warms up, then times `--rows` seeded prompts sampled at temperature 0.8 / top_p 0.95 for
`--output-len` tokens (ignore_eos), and a single greedy stream of the same length; it reports
output tokens/s, the page faults and kernel time of the batch run, and the resident memory after it.

    .venv/bin/python benchmarks/host_heap.py                                # SmolLM2, 256 rows
    .venv/bin/python benchmarks/host_heap.py --model ~/.cache/jaxserve/test-models/gemma-3-270m-q4_k_m.gguf --rows 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from jaxserve import LLM, SamplingParams, host_heap
model, rows, output_len = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model=model, max_num_seqs=rows, max_model_len=1024)
rng = np.random.default_rng(0)
prompts = [rng.integers(100, 40000, size=int(rng.integers(16, 64))).tolist() for _ in range(rows)]
sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=output_len, ignore_eos=True, seed=1)
greedy = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=4, ignore_eos=True), use_tqdm=False)
llm.reset_prefix_cache()
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
outs = llm.generate(prompts, sampled, use_tqdm=False)
batch_s = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
with open("/proc/self/statm") as f:
    resident = int(f.read().split()[1]) * resource.getpagesize()
llm.generate(prompts[1:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # its graphs
llm.reset_prefix_cache()
start = time.perf_counter()
llm.generate(prompts[:1], greedy, use_tqdm=False)
single_s = time.perf_counter() - start
print(json.dumps({"heap": host_heap.describe(), "batch_tok_s": sum(len(o.outputs[0].token_ids) for o in outs) / batch_s,
                  "single_tok_s": output_len / single_s, "faults": after.ru_minflt - before.ru_minflt,
                  "kernel_s": after.ru_stime - before.ru_stime, "batch_s": batch_s, "resident_mib": resident >> 20}))
"""


def run_child(heap: str, args) -> dict:
    env = {**os.environ, "JAXSERVE_HOST_HEAP": heap}
    done = subprocess.run([sys.executable, "-c", CHILD, args.model or "", str(args.rows), str(args.output_len)],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the {heap} child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    parser.add_argument("--rows", type=int, default=256, help="sampled prompts, and max_num_seqs")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="pairs of child processes, the heaps alternating")
    parser.add_argument("--json", default=None, help="also write every child's result here")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"system": [], "retain": []}
    for _ in range(args.rounds):
        for heap in results:
            results[heap].append(run_child(heap, args))
            r = results[heap][-1]
            print(f"  {heap:<7} {r['batch_tok_s']:8.1f} tok/s at {args.rows} rows, {r['single_tok_s']:6.1f} "
                  f"one stream, {r['faults']:>10,} faults, {r['kernel_s']:5.1f} s in the kernel of "
                  f"{r['batch_s']:5.1f}, {r['resident_mib']:,} MiB resident", flush=True)
    print(f"median of {args.rounds} per heap; model {args.model or 'SmolLM2-135M-Instruct (bundled)'}, "
          f"{args.rows} rows x {args.output_len} tokens")
    print(f"{'heap':<8}{'tok/s':>10}{'one stream':>12}{'faults':>12}{'kernel s':>10}{'resident MiB':>14}")
    for heap, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("batch_tok_s", "single_tok_s", "faults",
                                                                  "kernel_s", "resident_mib")}
        print(f"{heap:<8}{med['batch_tok_s']:10.1f}{med['single_tok_s']:12.1f}{med['faults']:12,.0f}"
              f"{med['kernel_s']:10.1f}{med['resident_mib']:14,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
