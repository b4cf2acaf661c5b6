"""Serving load generator for any OpenAI-compatible endpoint, and helpers to start servers.

Each concurrency level keeps C streamed ``/v1/completions`` requests in flight until N requests
have finished, every one made to produce exactly ``--output-len`` tokens (``min_tokens`` with
``max_tokens``, plus ``ignore_eos`` where the server knows it). It reports request throughput,
output tok/s, time to first token (TTFT), time per output token after the first (TPOT) and
inter-token latency (ITL) as mean / p50 / p99.

    # load one running server
    .venv/bin/python benchmarks/serving.py load --base-url http://127.0.0.1:8000 --label jaxserve

jaxserve against llama.cpp's servers (and the single-stream `Llama` API) is benchmarks/peers.py
(`make bench-peers`), built on this file's load generator and server helpers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import httpx
import numpy as np

LEVELS = (1, 4, 16, 32, 64)
# A fixed word pool: prompts are plain English-looking text both servers tokenize the same way.
_WORDS = ("the river city market morning light old friend quiet house garden winter road letter "
          "music small window north story green table evening stone bridge paper clock summer "
          "field harbor lamp forest train coffee mountain song kitchen island cloud village").split()


def synthetic_prompts(n: int, num_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}: " + " ".join(rng.choice(_WORDS) for _ in range(num_words)) for i in range(n)]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0                     # seconds from send to the first generated text
    latency: float = 0.0                  # seconds from send to the end of the stream
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # gaps between successive text chunks
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    first = last = None
    chunks, usage_tokens, itl = 0, None, []
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return RequestResult(ok=False, error=f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if not any(c.get("text") for c in chunk.get("choices") or ()):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(ok=False, error="no text streamed")
    # Servers that report usage in the stream give the exact count; otherwise one chunk per token.
    return RequestResult(ok=True, ttft=first - start, latency=end - start,
                         output_tokens=usage_tokens if usage_tokens is not None else chunks, itl=itl)


def _stats(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


async def run_level(base_url: str, model: str | None, prompts: list[str], concurrency: int, num_requests: int,
                    output_len: int, extra_body: dict | Callable[[int], dict]) -> dict:
    """extra_body: merged into every request's body, or made for each (called with its index)."""
    url = base_url.rstrip("/") + "/v1/completions"
    queue = list(range(num_requests))
    results: list[RequestResult] = []

    async def worker(client):
        while queue:
            i = queue.pop()
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": output_len, "min_tokens": output_len,
                    "temperature": 0.0, "stream": True, **(extra_body(i) if callable(extra_body) else extra_body)}
            if model:
                body["model"] = model
            results.append(await one_request(client, url, body))

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    good = [r for r in results if r.ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    return {
        "concurrency": concurrency, "requests": num_requests, "completed": len(good), "output_len": output_len,
        "errors": [r.error for r in results if not r.ok][:5], "duration_s": duration,
        "request_throughput": len(good) / duration,
        "output_tok_s": sum(r.output_tokens for r in good) / duration,
        "output_tokens_min": min((r.output_tokens for r in good), default=0),
        "ttft_s": _stats([r.ttft for r in good]), "tpot_s": _stats(tpot),
        "itl_s": _stats([x for r in good for x in r.itl]), "e2e_s": _stats([r.latency for r in good]),
    }


def add_load_options(p: argparse.ArgumentParser, levels=LEVELS) -> None:
    """The load's shape, shared with benchmarks/peers.py."""
    p.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=list(levels))
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=48, help="words per synthetic prompt (~70 tokens)")
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per level = max(8, this x C)")
    p.add_argument("--seed", type=int, default=0)


def requests_for(concurrency: int, per_slot: int) -> int:
    return max(8, concurrency * per_slot)


def print_level(label: str, r: dict) -> None:
    ms = lambda s, k: f"{s[k] * 1000:8.1f}" if s[k] is not None else "     n/a"
    print(f"{label:<18}{r['concurrency']:>5}{r['completed']:>5}/{r['requests']:<4}{r['output_tok_s']:>9.1f}"
          f"{r['request_throughput']:>8.2f}{ms(r['ttft_s'], 'p50')}{ms(r['ttft_s'], 'p99')}"
          f"{ms(r['tpot_s'], 'mean')}{ms(r['itl_s'], 'p50')}{ms(r['itl_s'], 'p99')}", flush=True)
    if r["errors"]:
        print(f"  errors: {r['errors']}", flush=True)
    if r["completed"] and r["output_tokens_min"] < r["output_len"]:
        print(f"  warning: a request made only {r['output_tokens_min']} of {r['output_len']} tokens", flush=True)


HEADER = (f"{'server':<18}{'conc':>5}{'done':>10}{'tok/s':>9}{'req/s':>8}{'TTFT50':>8}{'TTFT99':>8}"
          f"{'TPOT':>8}{'ITL50':>8}{'ITL99':>8}   (times in ms)")


# ---------------------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready: {url}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f}s: {url}")


def start_jaxserve(args, extra_flags: list[str] = (), label: str = "jaxserve") -> tuple[subprocess.Popen, str]:
    """`jaxserve serve` sized for args.levels; args.dtype (if set) and extra_flags are added to its flags."""
    port = free_port()
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--max-num-seqs", str(max(args.levels)), "--max-num-batched-tokens", "512", "--max-model-len", "1024",
           "--disable-log-requests"]
    if getattr(args, "dtype", None):
        cmd += ["--dtype", args.dtype]
    cmd += list(extra_flags)
    log = os.path.join(args.out_dir, f"{label}.log")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    base = f"http://127.0.0.1:{port}"
    print(f"{label} ready in {wait_healthy(base + '/health', proc, 900):.1f}s ({' '.join(cmd[3:])})", flush=True)
    return proc, base


def served_model(base_url: str) -> str:
    return httpx.get(base_url + "/v1/models", timeout=10.0).json()["data"][0]["id"]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load")
    add_load_options(load)
    load.add_argument("--base-url", required=True)
    load.add_argument("--model", default=None)
    load.add_argument("--label", default="server")
    load.add_argument("--extra-body", type=json.loads, default={}, help='JSON merged into every request')
    load.add_argument("--json", default=None)
    args = p.parse_args()
    prompts = synthetic_prompts(256, args.prompt_words, args.seed)
    print(HEADER)
    out = []
    for c in args.levels:
        out.append(asyncio.run(run_level(args.base_url, args.model, prompts, c,
                                         requests_for(c, args.requests_per_slot), args.output_len,
                                         args.extra_body)))
        print_level(args.label, out[-1])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
