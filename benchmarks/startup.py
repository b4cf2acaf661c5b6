"""Start-up time of `jaxserve run` and `jaxserve serve` on the bundled SmolLM2, cold and warm, and
where it goes.

Every start is a fresh process. A round gives each measurement a new, empty JAXSERVE_CACHE_ROOT:
"cold" is the first start on it (nothing converted, nothing compiled), "warm" the second.

- breakdown: one start timed from inside, with `jaxserve run`'s engine settings (one sequence,
  128-token steps) or `serve`'s defaults: imports; the model load, split into config (the GGUF
  reader) and weights (dequantised, or read back from the weight cache); the tokenizer, which
  loads on a thread of its own beside them and the graphs (so its time is not part of the sum);
  the engine without its graphs (KV cache, params on the device, any wait for the tokenizer); the
  graphs (warm-up); the first token of a chat "Hi" (template, prefill, one sampled token); and
  the total from exec to that token.
- run: `jaxserve run smollm2 Hi --max-tokens 1`, from exec to its first byte on stdout.
- serve: `jaxserve serve`, from exec to the first `/health` answering 200.

    .venv/bin/python benchmarks/startup.py                                # 3 rounds, float32 and bfloat16
    .venv/bin/python benchmarks/startup.py --rounds 1 --dtype float32 --what breakdown-run
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ENGINES = {"run": {"max_num_seqs": 1, "max_num_batched_tokens": 128}, "serve": {}}
WHAT = ("breakdown-run", "breakdown-serve", "run", "serve")
PHASES = ("import", "model.config", "model.tokenizer", "model.weights", "engine", "graphs", "first_token", "total")

# The child of a breakdown: times the phases of one start by wrapping the functions that do them.
BREAKDOWN = r"""
import json, sys, time
spawned = float(sys.argv[1])
engine_args = json.loads(sys.argv[2])
t0 = time.perf_counter()
import jax
from jaxserve.llm import LLM
from jaxserve.models import loader, loader_gguf
from jaxserve.runner import ModelRunner
from jaxserve.sampling_params import SamplingParams
times = {"import": time.perf_counter() - t0}
spent = {"open_gguf": 0.0, "tokenizer": 0.0, "load_model": 0.0, "warmup": 0.0}

def timed(owner, name, key):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - start
    setattr(owner, name, wrapper)

timed(loader_gguf, "open_gguf", "open_gguf")
timed(loader_gguf, "load_gguf_tokenizer", "tokenizer")
import jaxserve.models
timed(jaxserve.models, "load_model", "load_model")  # the name LLM imports
timed(ModelRunner, "warmup", "warmup")
start = time.perf_counter()
llm = LLM(**engine_args)
built = time.perf_counter() - start
first_start = time.perf_counter()
out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
now = time.time()
times["first_token"] = time.perf_counter() - first_start
times["model.tokenizer"] = spent["tokenizer"]  # on its own thread, beside the weights and graphs
times["model.config"] = spent["open_gguf"]
times["model.weights"] = spent["load_model"] - times["model.config"]
times["graphs"] = spent["warmup"]
times["engine"] = built - spent["load_model"] - spent["warmup"]
times["total"] = now - spawned
runner = getattr(llm.engine, "replicas", [llm.engine])[0].runner
print(json.dumps({"times": times, "graphs": len(runner.warmup_keys), "from_store": runner.num_graphs_from_store,
                  "dtype": str(jax.tree_util.tree_leaves(llm.loaded.params)[0].dtype),
                  "text": out[0].outputs[0].text}))
"""


def child_env(root: str) -> dict:
    env = dict(os.environ, JAXSERVE_CACHE_ROOT=root)
    env.pop("JAXSERVE_DTYPE", None)  # --dtype decides
    return env


def breakdown(root: str, dtype: str, engine: str) -> dict:
    args = json.dumps({"dtype": dtype, **ENGINES[engine]})
    done = subprocess.run([sys.executable, "-c", BREAKDOWN, repr(time.time()), args], env=child_env(root),
                          capture_output=True, text=True, timeout=900)
    if done.returncode:
        raise RuntimeError(f"breakdown child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def jaxserve_bin() -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), "jaxserve")]


def first_token_of_run(root: str, dtype: str) -> dict:
    start = time.time()
    proc = subprocess.Popen(jaxserve_bin() + ["run", "smollm2", "Hi", "--max-tokens", "1", "--temperature", "0",
                                              "--dtype", dtype],
                            env=child_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    seconds = time.time() - start
    rest, err = proc.communicate(timeout=900)
    if proc.returncode or not first:
        raise RuntimeError(f"jaxserve run failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return {"times": {"total": seconds}, "text": (first + rest).decode().strip()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_of_serve(root: str, dtype: str) -> dict:
    port = free_port()
    start = time.time()
    proc = subprocess.Popen(jaxserve_bin() + ["serve", "--port", str(port), "--dtype", dtype],
                            env=child_env(root), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jaxserve serve exited ({proc.returncode}):\n{proc.stderr.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return {"times": {"total": time.time() - start}}
            except OSError:
                pass
            if time.time() - start > 900:
                raise RuntimeError("jaxserve serve was not healthy within 900 s")
            time.sleep(0.05)
    finally:
        proc.send_signal(2)  # SIGINT: Sanic's clean shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


MEASURE = {"breakdown-run": lambda root, dtype: breakdown(root, dtype, "run"),
           "breakdown-serve": lambda root, dtype: breakdown(root, dtype, "serve"),
           "run": first_token_of_run, "serve": health_of_serve}


def summarise(results: list[dict]) -> None:
    """Median (min-max) of every phase per measurement, dtype and cache state."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["what"], r["dtype"], r["cache"]), []).append(r["times"])
    print("\n| measurement | dtype | cache | " + " | ".join(PHASES) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in PHASES) + " |")
    for (what, dtype, cache), runs in groups.items():
        cells = []
        for phase in PHASES:
            values = [t[phase] for t in runs if phase in t]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.2f}")
            else:
                cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"| {what} | {dtype} | {cache} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--what", default=",".join(WHAT), help=f"comma-separated, of {', '.join(WHAT)}")
    parser.add_argument("--warm-only", action="store_true",
                        help="one cold start per measurement and dtype to fill the cache, then only warm rounds")
    args = parser.parse_args()
    whats = args.what.split(",")
    dtypes = args.dtype.split(",")
    results = []
    if importlib.util.find_spec("llama_cpp") is None:
        print("peer: llama-cpp-python is not installed here; Ollama's ~1 s start for a model this size is "
              "the figure from issue 11, not measured here")
    else:
        print("llama-cpp-python is installed, but this benchmark does not time it yet")
    for what in whats:
        for dtype in dtypes:
            root = None
            for round_ in range(args.rounds):
                if root is None or not args.warm_only:
                    if root is not None:
                        shutil.rmtree(root, ignore_errors=True)
                    root = tempfile.mkdtemp(prefix="jaxserve-startup-")
                    states = ("cold", "warm")
                else:
                    states = ("warm",)
                for cache in states:
                    result = {"what": what, "dtype": dtype, "cache": cache, "round": round_,
                              **MEASURE[what](root, dtype)}
                    print(json.dumps(result), flush=True)
                    results.append(result)
            shutil.rmtree(root, ignore_errors=True)
    summarise(results)


if __name__ == "__main__":
    main()
