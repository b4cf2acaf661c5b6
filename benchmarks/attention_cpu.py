"""Speed of the tuned jnp CPU attention path at SmolLM2-135M's shapes, here and at a baseline commit,
side by side in one run.

The driver checks the baseline out into a git worktree, lays it out the way the repository installs
(jaxserve/ plus models/, pallas_kernels/ and server/ as its subpackages) and runs worker processes
alternately on the baseline and on this working tree, so a noisy neighbour slows both alike. Each
worker imports whichever name the path has there (`ragged_paged_attention_jnp`, or before the rename
in 5042783 `ragged_paged_attention_reference`), reports the file it imported, compiles once per
case and times calls one by one. The driver reports min and median ms per case and after/before.

    .venv/bin/python benchmarks/attention_cpu.py                              # 8 rounds against 6afbe46
    .venv/bin/python benchmarks/attention_cpu.py --rounds 4 --cases decode_b64_bf16,prefill512_fp32
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_TREE = "/tmp/attn-base"
BASE_PKG = "/tmp/attn-basepkg"
# Top-level directories that install as subpackages of jaxserve (pyproject.toml's package-dir).
SUBPACKAGES = ("models", "pallas_kernels", "server")

# SmolLM2-135M's attention: 9 query heads over 3 KV heads of 64, pages of 16 tokens.
N, K, H, S = 9, 3, 64, 16
# Page-table width: 1024 tokens per sequence, room for every case's KV.
W = 64
# Enough pages for 64 sequences of 512 tokens on distinct pages, plus the reserved page 0.
NUM_PAGES = 4096
SM_SCALE = H ** -0.5
# (q_len, kv_len) per sequence. The mixed step is what continuous batching runs: decodes beside a
# 256-token prompt chunk that follows 256 tokens already cached.
STEPS = {
    "decode_b1": [(1, 512)],
    "decode_b8": [(1, 512)] * 8,
    "decode_b64": [(1, 512)] * 64,
    "mixed_4dec_256chunk": [(1, 512)] * 4 + [(256, 512)],
    "prefill512": [(512, 512)],
}
DTYPES = ("fp32", "bf16")  # bf16: pages stored packed as uint16, as the CPU engine stores them
CASES = [f"{step}_{dtype}" for step in STEPS for dtype in DTYPES]


# ----------------------------------------------------------------------------- worker

def import_attention():
    """The jnp CPU path of whichever jaxserve is on sys.path, and the file it came from."""
    import jaxserve.pallas_kernels as kernels

    # Chosen by the files of the package found, not by trying the new name: setuptools' editable
    # finder serves a submodule the baseline lacks from this tree, so the import would succeed.
    if os.path.exists(os.path.join(os.path.dirname(kernels.__file__), "ragged_paged_attention_jnp.py")):
        from jaxserve.pallas_kernels.ragged_paged_attention_jnp import ragged_paged_attention_jnp as fn
    else:
        from jaxserve.pallas_kernels.reference import ragged_paged_attention_reference as fn
    # `fn` is a jitted function; its module is where the name is defined, not where it was imported.
    return fn, os.path.realpath(sys.modules[fn.__module__].__file__)


def loaded_jaxserve_files():
    return sorted({os.path.realpath(m.__file__) for name, m in list(sys.modules.items())
                   if name.split(".")[0] == "jaxserve" and getattr(m, "__file__", None)})


def build_step(seqs, dtype, rng):
    """Arguments of one step: random q and pages, each sequence on its own random pages; page-table
    columns past a sequence's pages hold stale ids, as after a free."""
    import jax.numpy as jnp
    import numpy as np
    from jaxserve.precision import pack

    q_lens = np.array([s[0] for s in seqs], np.int32)
    kv_lens = np.array([s[1] for s in seqs], np.int32)
    need = -(-kv_lens // S)
    free = rng.permutation(np.arange(1, NUM_PAGES))  # page 0 is never handed out
    page_table = rng.integers(0, NUM_PAGES, (len(seqs), W)).astype(np.int32)
    used = 0
    for b, n in enumerate(need):
        page_table[b, :n] = free[used:used + n]
        used += n
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(q_lens.sum())
    q = jnp.asarray(rng.standard_normal((T, N, H), np.float32))  # activations are float32 on CPU
    pages = []
    for _ in range(2):
        p = jnp.asarray(rng.standard_normal((NUM_PAGES, S, K, H), np.float32))  # [P, S, K, H]
        pages.append(pack(p.astype(jnp.bfloat16)) if dtype == "bf16" else p)
    return (q, *pages, jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu_q_lens),
            jnp.asarray(len(seqs), jnp.int32))


def run_worker(cases, iters, min_time_s, warmup):
    import jax
    import numpy as np

    fn, path = import_attention()
    report = {"name": fn.__name__, "module": fn.__module__, "file": path, "jax": jax.__version__,
              "cases": {}}
    for case in cases:
        step, dtype = case.rsplit("_", 1)
        args = build_step(STEPS[step], dtype, np.random.default_rng(0))
        compile_start = time.perf_counter()
        out = fn(*args, sm_scale=SM_SCALE).block_until_ready()
        compile_s = time.perf_counter() - compile_start
        for _ in range(warmup):
            fn(*args, sm_scale=SM_SCALE).block_until_ready()
        times = []  # ms; a short call gets more samples, so its min is not one lucky call
        while len(times) < iters or sum(times) < min_time_s * 1e3:
            start = time.perf_counter()
            fn(*args, sm_scale=SM_SCALE).block_until_ready()
            times.append((time.perf_counter() - start) * 1e3)
        report["cases"][case] = {
            "min_ms": min(times), "median_ms": statistics.median(times), "first_call_s": compile_s,
            "pages_dtype": str(args[1].dtype),
            # Same seed and inputs on both sides: equal hashes mean the same numbers came out.
            "out_sha1": hashlib.sha1(np.asarray(out).tobytes()).hexdigest()[:12]}
    report["loaded"] = loaded_jaxserve_files()
    print(json.dumps(report))


# ----------------------------------------------------------------------------- driver

def make_baseline(rev):
    """Check `rev` out at BASE_TREE and lay it out as an installed jaxserve under BASE_PKG."""
    remove_baseline()
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", BASE_TREE, rev], check=True,
                   stdout=subprocess.DEVNULL)
    pkg = os.path.join(BASE_PKG, "jaxserve")
    os.makedirs(pkg)
    for name in os.listdir(os.path.join(BASE_TREE, "jaxserve")):
        os.symlink(os.path.join(BASE_TREE, "jaxserve", name), os.path.join(pkg, name))
    for name in SUBPACKAGES:
        os.symlink(os.path.join(BASE_TREE, name), os.path.join(pkg, name))


def remove_baseline():
    if os.path.exists(BASE_TREE):
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", BASE_TREE], check=False)
    subprocess.run(["git", "-C", REPO, "worktree", "prune"], check=False)
    shutil.rmtree(BASE_PKG, ignore_errors=True)


def spawn_worker(side, args):
    """One worker on the baseline ("before", from outside the repository so the editable install
    of this tree is shadowed by BASE_PKG) or on this tree ("after")."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    cwd = REPO
    if side == "before":
        env["PYTHONPATH"] = BASE_PKG
        cwd = "/tmp"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--cases", ",".join(args.cases),
           "--iters", str(args.iters), "--min-time-s", str(args.min_time_s), "--warmup", str(args.warmup)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # Fail rather than compare this tree with itself.
    expected = os.path.realpath(BASE_TREE) if side == "before" else REPO
    stray = [f for f in [report["file"], *report["loaded"]] if not f.startswith(expected + os.sep)]
    if stray:
        raise RuntimeError(f"{side} worker imported {stray}, expected only files under {expected}")
    return report


def cpu_name():
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown")


def summarise(reports, cases):
    """Per case and side: min over every round's min, median of the rounds' medians."""
    rows = []
    for case in cases:
        row = {"case": case}
        for side in ("before", "after"):
            runs = [r["cases"][case] for r in reports[side]]
            row[side] = {"min_ms": min(r["min_ms"] for r in runs),
                         "median_ms": statistics.median(r["median_ms"] for r in runs),
                         "round_medians_ms": [round(r["median_ms"], 3) for r in runs]}
        row["ratio_min"] = row["after"]["min_ms"] / row["before"]["min_ms"]
        row["ratio_median"] = row["after"]["median_ms"] / row["before"]["median_ms"]
        row["same_output"] = ({r["cases"][case]["out_sha1"] for r in reports["before"]}
                              == {r["cases"][case]["out_sha1"] for r in reports["after"]})
        rows.append(row)
    return rows


def print_table(rows):
    print("| case | before min ms | after min ms | after/before (min) | before median ms "
          "| after median ms | after/before (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        b, a = r["before"], r["after"]
        print(f"| {r['case']} | {b['min_ms']:.3f} | {a['min_ms']:.3f} | {r['ratio_min']:.3f} "
              f"| {b['median_ms']:.3f} | {a['median_ms']:.3f} | {r['ratio_median']:.3f} |")


def run_driver(args):
    reports = {"before": [], "after": []}
    started = time.time()
    make_baseline(args.baseline_rev)
    try:
        for i in range(args.rounds):
            for side in ("before", "after"):
                report = spawn_worker(side, args)
                reports[side].append(report)
                print(f"round {i + 1}/{args.rounds} {side}: {report['module']}.{report['name']} "
                      f"from {report['file']} ({time.time() - started:.0f} s)", file=sys.stderr)
    finally:
        remove_baseline()
    rows = summarise(reports, args.cases)
    cpu = cpu_name()
    print(f"CPU: {cpu}; {os.cpu_count()} CPUs; jax {reports['after'][0]['jax']}; {args.rounds} rounds "
          f"x >= {args.iters} calls and >= {args.min_time_s} s per case; "
          f"before = {args.baseline_rev}, after = this working tree")
    for side in ("before", "after"):
        r = reports[side][0]
        print(f"{side}: {r['module']}.{r['name']} from {r['file']}")
    print_table(rows)
    differing = [r["case"] for r in rows if not r["same_output"]]
    print("outputs bit-identical before and after:", "yes" if not differing else f"no: {differing}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cpu": cpu, "baseline_rev": args.baseline_rev, "rounds": args.rounds,
                       "iters": args.iters, "rows": rows, "reports": reports}, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help="time the jaxserve on sys.path and print JSON")
    parser.add_argument("--baseline-rev", default="6afbe46", help="the 'before' commit")
    parser.add_argument("--rounds", type=int, default=8, help="before/after worker pairs")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per case per worker, at least")
    parser.add_argument("--min-time-s", type=float, default=0.5,
                        help="time at least this much per case per worker (more calls if short)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls after the compiling one")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--out", help="write rows and raw worker reports as JSON here")
    args = parser.parse_args()
    args.cases = args.cases.split(",")
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {CASES}")
    if args.worker:
        run_worker(args.cases, args.iters, args.min_time_s, args.warmup)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
