"""Serving side of benchmarks/peers.py: jaxserve in each mode, llama-cpp-python's server and
llama.cpp's `llama-server -np 32 -cb`, all on the bundled GGUF, loaded level by level in turn.

Every server runs for the whole run (idle ones cost nothing); each concurrency level visits every
server before the next level starts, so a slow minute on a shared host hits all of them. Each peer
runs at its best thread count: with several candidates, a short C = 1 probe picks it.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import statistics
import subprocess
from dataclasses import dataclass

from serving import (HEADER, free_port, print_level, requests_for, run_level, served_model, start_jaxserve, stop,
                     synthetic_prompts, wait_healthy)

JAXSERVE, LLAMA_CPP_PYTHON, LLAMA_SERVER = "jaxserve", "llama-cpp-python", "llama-server"


@dataclass
class Server:
    name: str          # the label in tables and plots
    kind: str          # JAXSERVE, LLAMA_CPP_PYTHON or LLAMA_SERVER
    setting: str       # the flags it runs with, for the table
    proc: subprocess.Popen
    base_url: str
    extra_body: dict   # what makes it produce exactly max_tokens tokens


def parse_mode(text: str) -> tuple[str, str]:
    """`LABEL=FLAGS` (FLAGS as on the command line) or just `LABEL` for the engine's defaults."""
    label, _, flags = text.partition("=")
    if not label:
        raise ValueError(f"a mode needs a label: {text!r}")
    return label, flags


def eog_token_ids(gguf_path: str) -> list[int]:
    """Token ids llama.cpp ends a generation at: the GGUF's eos/eot, and the usual end-of-text names."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    ids = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in reader.fields:
            field = reader.fields[key]
            ids.add(int(field.parts[field.data[0]][0]))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    names = {"<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"}
    for index, part in enumerate(tokens.data):
        if bytes(tokens.parts[part]).decode("utf-8", "replace") in names:
            ids.add(index)
    return sorted(ids)


def start_llama_cpp_python(args, model: str, threads: int, label: str) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    flags = ["--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "2048",
             # By default a new request cuts off the one streaming: every request must run to its end.
             "--interrupt_requests", "False"]
    cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(args.out_dir, f"{label}.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    print(f"{label} ready in {wait_healthy(base + '/v1/models', proc, 300):.1f}s", flush=True)
    return proc, base, " ".join(flags)


def start_llama_server(args, model: str, threads: int, label: str) -> tuple[subprocess.Popen, str, str]:
    """llama.cpp's server with continuous batching; -c is shared by the slots, so it gets room for
    every slot's prompt and output."""
    port = free_port()
    ctx = args.llama_server_slots * args.llama_server_ctx_per_slot
    flags = ["-np", str(args.llama_server_slots), "-cb", "-c", str(ctx), "-t", str(threads), "-tb", str(threads)]
    cmd = [args.llama_server, "-m", model, "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(args.out_dir, f"{label}.log"), "w"))
    base = f"http://127.0.0.1:{port}"
    print(f"{label} ready in {wait_healthy(base + '/health', proc, 300):.1f}s", flush=True)
    return proc, base, " ".join(flags)


def start_at_best_threads(args, kind: str, starter, model: str, prompts, extra_body: dict) -> tuple[Server, dict]:
    """Start the peer at each candidate thread count, keep the fastest at C = 1 (median of the
    probe rounds, candidates alternating), stop the others."""
    candidates = {}
    try:
        for t in args.peer_threads:
            candidates[t] = starter(args, model, t, f"{kind}-t{t}")
        probe = {t: [] for t in candidates}
        if len(candidates) > 1:
            for _ in range(args.probe_rounds):
                for t, (_, base, _) in candidates.items():
                    r = asyncio.run(run_level(base, served_model(base), prompts, 1, args.probe_requests,
                                              args.probe_tokens, extra_body))
                    probe[t].append(r["output_tok_s"])
            print(f"{kind} thread probe (C=1, tok/s): "
                  + ", ".join(f"{t} threads {statistics.median(v):.1f}" for t, v in probe.items()), flush=True)
        best = max(candidates, key=lambda t: statistics.median(probe[t]) if probe[t] else 0.0)
    except BaseException:
        for proc, _, _ in candidates.values():
            stop(proc)
        raise
    for t, (proc, _, _) in candidates.items():
        if t != best:
            stop(proc)
    proc, base, setting = candidates[best]
    return Server(kind, kind, setting, proc, base, extra_body), {"threads": best, "probe_tok_s": probe}


def start_servers(args, model: str, prompts) -> tuple[list[Server], dict]:
    servers, probes = [], {}
    try:
        for label, flags in args.modes:
            proc, base = start_jaxserve(args, shlex.split(flags), label=label)
            servers.append(Server(label, JAXSERVE, flags or "defaults", proc, base, {"ignore_eos": True}))
        if args.peer_python != "none":
            # llama-cpp-python's server has no ignore_eos: bias the end-of-generation tokens away.
            bias = {"logit_bias": {str(t): -100.0 for t in eog_token_ids(model)}}
            server, probes[LLAMA_CPP_PYTHON] = start_at_best_threads(
                args, LLAMA_CPP_PYTHON, start_llama_cpp_python, model, prompts, bias)
            servers.append(server)
        if args.llama_server != "none":
            server, probes[LLAMA_SERVER] = start_at_best_threads(
                args, LLAMA_SERVER, start_llama_server, model, prompts, {"ignore_eos": True})
            servers.append(server)
    except BaseException:
        for s in servers:
            stop(s.proc)
        raise
    return servers, probes


def run(args) -> dict:
    """Every server at every level; returns what peers.py writes to peers_serving.json."""
    from jaxserve.models import bundled_model_path

    os.makedirs(args.out_dir, exist_ok=True)
    model = bundled_model_path()
    prompts = synthetic_prompts(256, args.prompt_words, args.seed)
    servers, probes = start_servers(args, model, prompts)
    results = {s.name: [] for s in servers}
    try:
        models = {s.name: served_model(s.base_url) for s in servers}
        # One untimed request each, so none pays a first-request cost inside the timed levels.
        for s in servers:
            asyncio.run(run_level(s.base_url, models[s.name], prompts, 1, 1, 8, s.extra_body))
        print(HEADER)
        for c in args.levels:
            for s in servers:
                r = asyncio.run(run_level(s.base_url, models[s.name], prompts, c,
                                          requests_for(c, args.requests_per_slot), args.output_len, s.extra_body))
                results[s.name].append(r)
                print_level(s.name, r)
    finally:
        for s in servers:
            stop(s.proc)
    return {"servers": {s.name: {"kind": s.kind, "setting": s.setting, **probes.get(s.kind, {})} for s in servers},
            "results": results}


def plot(serving: dict, path: str, title: str) -> None:
    """tok/s and TTFT p50 against concurrency: one line per jaxserve mode and per peer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, levels in serving["results"].items():
        peer = serving["servers"][name]["kind"] != JAXSERVE
        style = dict(marker="s" if peer else "o", linestyle="--" if peer else "-")
        c = [r["concurrency"] for r in levels if r["completed"]]
        ax1.plot(c, [r["output_tok_s"] for r in levels if r["completed"]], label=name, **style)
        ax2.plot(c, [r["ttft_s"]["p50"] * 1000 for r in levels if r["completed"]], label=name, **style)
    for ax, label in ((ax1, "output tokens/s"), (ax2, "time to first token p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
