"""jaxserve beside llama.cpp on this CPU, same GGUF, same run (issue 15), and the README's tables.

`make peers` builds the peers from one llama-cpp-python sdist for this CPU: llama-cpp-python (its
OpenAI server and its `Llama` API) in .venv-peers, llama.cpp's `llama-server` in .venv-peers/bin.

    serving   jaxserve in each --mode, llama-cpp-python's server, `llama-server -np 32 -cb`, C = 1/4/16/32
              (benchmarks/peers_serving.py); tok/s, TTFT p50/p99; the plot
    single    LLM.generate in each --llm-mode against the `Llama` API at 1 and 2 threads, a plain and
              a code-edit prompt (benchmarks/peers_single.py); decode tok/s and TTFT
    offline   benchmarks/offline_throughput.py (64 x 128 against transformers generate, fp32)
    table     the markdown tables from the JSON files the others wrote
    all       serving, single, offline, table

    make bench-peers                                 # = peers.py all, with the peers' paths
    .venv/bin/python benchmarks/peers.py serving --mode jaxserve --mode int8="--quantization int8"
    .venv/bin/python benchmarks/peers.py single --llm-mode fp32='{"dtype": "float32"}' --single-rounds 5
    .venv/bin/python benchmarks/peers.py table       # again, from benchmarks/results/peers_*.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers_serving  # noqa: E402
from serving import add_load_options  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = (1, 4, 16, 32)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def run_info() -> dict:
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=HERE)
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "date": datetime.datetime.now().isoformat(timespec="minutes"),
            "commit": commit.stdout.strip()}


def _path(args, what: str) -> str:
    return os.path.join(args.out_dir, f"peers_{what}.json")


def _write(args, what: str, result: dict) -> None:
    with open(_path(args, what), "w") as f:
        json.dump({**run_info(), "args": vars(args), **result}, f, indent=1)
    print(f"wrote {_path(args, what)}", flush=True)


def _read(args, what: str) -> dict | None:
    try:
        with open(_path(args, what)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def serving(args) -> None:
    result = peers_serving.run(args)
    _write(args, "serving", result)
    info = run_info()
    peers_serving.plot(result, args.plot, f"SmolLM2-135M-Instruct (Q4_1 GGUF), {args.output_len} greedy tokens per "
                                          f"request, {info['cpu']} ({info['cpus']} CPUs), {info['date'][:10]}")
    print(f"wrote {args.plot}", flush=True)


def single(args) -> None:
    import peers_single

    _write(args, "single", peers_single.run(args))


def offline(args) -> None:
    cmd = [sys.executable, os.path.join(HERE, "offline_throughput.py"), "--json", _path(args, "offline"),
           *shlex.split(args.offline_args)]
    subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------------ tables

def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _at(levels: list[dict], c: int) -> dict | None:
    return next((r for r in levels if r["concurrency"] == c and r["completed"]), None)


def serving_rows(data: dict) -> list[str]:
    """One row per server and level: tok/s, TTFT, and tok/s as a multiple of each peer's."""
    servers, results = data["servers"], data["results"]
    peers = [n for n, s in servers.items() if s["kind"] != peers_serving.JAXSERVE]
    columns = ["C", "server", "setting", "tok/s", "TTFT p50 ms", "TTFT p99 ms"] + [f"tok/s vs {p}" for p in peers]
    rows = ["| " + " | ".join(columns) + " |", "| --- " * len(columns) + "|"]
    levels = sorted({r["concurrency"] for rs in results.values() for r in rs})
    for c in levels:
        for name, s in servers.items():
            r = _at(results[name], c)
            if r is None:
                continue
            ratios = [_ratio(r["output_tok_s"], (_at(results[p], c) or {}).get("output_tok_s")) if p != name else "1"
                      for p in peers]
            rows.append(f"| {c} | {name} | `{s['setting']}` | {r['output_tok_s']:.1f} | {r['ttft_s']['p50'] * 1000:.0f} | "
                        f"{r['ttft_s']['p99'] * 1000:.0f} |" + "".join(f" {x} |" for x in ratios))
    return rows


def _best_llama(by_engine: dict) -> tuple[str, dict] | None:
    llama = [(n, e) for n, e in by_engine.items() if e["engine"] == "llama.cpp Llama API"]
    return max(llama, key=lambda ne: ne[1]["decode_tok_s"]) if llama else None


def single_rows(data: dict) -> list[str]:
    rows = ["| prompt | engine | setting | decode tok/s | TTFT ms | decode vs llama.cpp (best threads) | "
            "greedy tokens equal to llama.cpp's |", "| --- " * 7 + "|"]
    for prompt, by_engine in data["summary"].items():
        best = _best_llama(by_engine)
        for name, e in by_engine.items():
            same = e["same_greedy_prefix_as_llama_cpp"]
            same = "n/a" if same is None else f"first {same} of {e['tokens']}"
            ratio = _ratio(e["decode_tok_s"], best[1]["decode_tok_s"]) if best else "n/a"
            rows.append(f"| {prompt} | {e['engine']} | `{e['setting']}` ({name}) | {e['decode_tok_s']:.1f} | "
                        f"{e['ttft_s'] * 1000:.0f} | {ratio} | {same} |")
    return rows


def target_rows(serving_data: dict | None, single_data: dict | None, offline_data: dict | None) -> list[str]:
    """The issue's targets: each jaxserve mode's figure against its peer's, the ratio and the goal."""
    rows = ["| target | jaxserve | value | peer | peer value | ratio | goal | met |", "| --- " * 8 + "|"]

    def row(target, ours, value, peer, peer_value, goal, higher=True, unit=""):
        ratio = value / peer_value if value and peer_value else None
        met = "n/a" if ratio is None else ("yes" if (ratio >= goal if higher else ratio <= goal) else "no")
        rows.append(f"| {target} | {ours} | {value:.1f}{unit} | {peer} | {peer_value:.1f}{unit} | "
                    f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {'≥' if higher else '≤'} {goal}x | {met} |")

    if single_data:
        for prompt, by_engine in single_data["summary"].items():
            best = _best_llama(by_engine)
            if best is None:
                continue
            for name, e in by_engine.items():
                if e["engine"] != "llama.cpp Llama API":
                    row(f"single-stream decode tok/s, {prompt} prompt", name, e["decode_tok_s"],
                        f"Llama API, {best[1]['setting']}", best[1]["decode_tok_s"], 1)
    if serving_data:
        servers, results = serving_data["servers"], serving_data["results"]
        ours = [n for n, s in servers.items() if s["kind"] == peers_serving.JAXSERVE]
        for peer, goal in ((peers_serving.LLAMA_CPP_PYTHON, 6), (peers_serving.LLAMA_SERVER, 2)):
            if peer in results and _at(results[peer], 32):
                for name in ours:
                    if _at(results[name], 32):
                        row("tok/s at 32 concurrent streams", name, _at(results[name], 32)["output_tok_s"],
                            peer, _at(results[peer], 32)["output_tok_s"], goal)
        for peer in (peers_serving.LLAMA_SERVER, peers_serving.LLAMA_CPP_PYTHON):
            if peer in results and _at(results[peer], 1):
                for name in ours:
                    if _at(results[name], 1):
                        row("TTFT p50 at concurrency 1", name, _at(results[name], 1)["ttft_s"]["p50"] * 1000,
                            peer, _at(results[peer], 1)["ttft_s"]["p50"] * 1000, 1, higher=False, unit=" ms")
    if offline_data and "transformers" in offline_data["rounds"][0]:
        rounds = offline_data["rounds"]
        hf = statistics.median(r["transformers"]["output_tok_s"] for r in rounds)
        batch = rounds[0]["transformers"].get("batch_size")
        args = offline_data["args"]
        for name in rounds[0]:
            if name != "transformers":
                row(f"offline {args['num_prompts']} x {args['output_len']} tok/s", name,
                    statistics.median(r[name]["output_tok_s"] for r in rounds),
                    f"transformers generate fp32, batch {batch}", hf, 2)
    return rows


def table(args) -> None:
    serving_data, single_data, offline_data = _read(args, "serving"), _read(args, "single"), _read(args, "offline")
    info = next((d for d in (serving_data, single_data) if d), None)
    if info:
        print(f"CPU: {info['cpu']} ({info['cpus']} CPUs); {info['date']}; jaxserve {info['commit']}\n")
    print("\n".join(target_rows(serving_data, single_data, offline_data)))
    if serving_data:
        print("\n" + "\n".join(serving_rows(serving_data)))
    if single_data:
        print("\n" + "\n".join(single_rows(single_data)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("all", "serving", "single", "offline", "table"))
    add_load_options(p, levels=LEVELS)
    p.add_argument("--mode", dest="modes", action="append", type=peers_serving.parse_mode, default=None,
                   help='a jaxserve serve mode, LABEL="FLAGS" (repeatable; default: one, "jaxserve", the '
                        'engine defaults)')
    p.add_argument("--llm-mode", dest="llm_modes", action="append", type=lambda v: (v.partition("=")[0],
                   json.loads(v.partition("=")[2] or "{}")), default=None,
                   help="a jaxserve LLM mode for the single-stream run, LABEL='JSON kwargs' (repeatable)")
    p.add_argument("--peer-python", default=".venv-peers/bin/python",
                   help="a Python with llama-cpp-python[server] (make peers builds it); none: skip it")
    p.add_argument("--llama-server", default=".venv-peers/bin/llama-server", help="none: skip it")
    p.add_argument("--peer-threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                   help="thread counts to try for each peer; the fastest at C = 1 is kept")
    p.add_argument("--probe-rounds", type=int, default=2)
    p.add_argument("--probe-requests", type=int, default=2)
    p.add_argument("--probe-tokens", type=int, default=64)
    p.add_argument("--llama-server-slots", type=int, default=32, help="-np")
    p.add_argument("--llama-server-ctx-per-slot", type=int, default=512,
                   help="-c is this x slots: room for a prompt (~70 tokens) and its output")
    p.add_argument("--dtype", default=None, help="jaxserve --dtype for every serve mode (default: the engine's)")
    p.add_argument("--single-rounds", type=int, default=5)
    p.add_argument("--offline-args", default="", help="flags for offline_throughput.py, e.g. '--rounds 1'")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--plot", default="benchmarks/results/peers.png")
    args = p.parse_args(argv)
    args.modes = args.modes or [("jaxserve", "")]
    args.llm_modes = args.llm_modes or [("jaxserve", {})]
    os.makedirs(args.out_dir, exist_ok=True)
    steps = {"serving": [serving], "single": [single], "offline": [offline], "table": [table],
             "all": [serving, single, offline, table]}[args.what]
    for step in steps:
        step(args)


if __name__ == "__main__":
    main()
