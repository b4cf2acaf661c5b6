"""One prepared device check for a lent NVIDIA GPU: the attention kernels against the dense oracle,
then decode and prefill speed through the runner, for random-weight SmolLM2-135M and Llama-3.1-8B.

Nothing is fetched and no model files are read: the weights are random, built on the device. The
decode steps run B sequences that each have `context` tokens of KV in their pages already (the
pages hold zeros, which costs the same to read), through ModelRunner.prepare and run_graphs, as
the engine does; HBM bandwidth is the weights and KV such a step must read over its median time.

    python benchmarks/gpu_check.py --out gpu_check.json    # a lent H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --tiny --out /tmp/x.json # tiny shapes, on CPU: under a minute

Each section is a function; a time budget (`--budget-s`) skips what would not fit, with a note.
The JSON is rewritten after every section, so a run cut short still leaves what it measured.
Exits 1 unless the kernel check ran and passed and nothing raised.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# JAX keeps 75% of GPU memory by default; the 8B decode runner at B = 256 holds 16 GB of weights
# and 35 GB of KV pages, which leaves an 80 GB H100 little room for the jnp path's temporaries.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

ROOT = Path(__file__).resolve().parent.parent


def use_checkout() -> None:
    """Import jaxserve from this checkout where it is not installed (a lent machine gets the working
    tree, not the package). models/ and pallas_kernels/ sit at the top of the repository but are
    subpackages of jaxserve (pyproject's package-dir), so the root joins jaxserve's package path."""
    if importlib.util.find_spec("jaxserve") is None:
        sys.path.insert(0, str(ROOT))
    import jaxserve
    if importlib.util.find_spec("jaxserve.models") is None:
        jaxserve.__path__.append(str(ROOT))


use_checkout()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.models import ModelConfig, RopeScaling, model_class  # noqa: E402
from jaxserve.pallas_kernels import attention_backend, ragged_paged_attention_reference  # noqa: E402
from jaxserve.parallel import ParallelConfig, build_mesh, param_shardings  # noqa: E402
from jaxserve.request import Request  # noqa: E402
from jaxserve.runner import ModelRunner  # noqa: E402
from jaxserve.sampling_params import SamplingParams  # noqa: E402
from jaxserve.scheduler import ScheduledSeq, SchedulerOutput  # noqa: E402

BACKENDS = ("pallas", "jnp")
# Peak HBM bandwidth by device_kind substring (SXM parts; the H100 PCIe and NVL have other peaks).
PEAK_HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
# Largest |kernel - oracle| allowed on unit-normal q, k, v: bf16 rounds each output to 2^-8 of its
# size (the kernel tests' 3e-2); float32 leaves room for TF32 dots on a GPU.
TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-3}


def llama(**fields) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", rms_norm_eps=1e-5, **fields)


FULL_MODELS = {
    "smollm2-135m": llama(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                          num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                          tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.1-8b": llama(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                          num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                          rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192),
                          max_position_embeddings=131072),
}
# The same families at tiny shapes: G = 3 (padded to 4 in the GPU kernel) and tied embeddings
# like SmolLM2; G = 4, llama3 RoPE and a separate lm_head like Llama-3.1.
TINY_MODELS = {
    "smollm2-135m": llama(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=3, num_kv_heads=1, head_dim=16, rope_theta=100000.0,
                          tie_word_embeddings=True),
    "llama-3.1-8b": llama(vocab_size=512, hidden_size=64, intermediate_size=224, num_layers=2,
                          num_heads=8, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
                          rope_scaling=RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64)),
}


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What one run measures."""

    models: dict[str, ModelConfig]  # display name -> shapes
    dtype: str                      # weights and KV pages
    batch_sizes: tuple[int, ...]    # decode B
    context: int                    # KV tokens already in each decoding sequence's pages
    prefill_tokens: int             # T of the one-sequence prefill
    decode_steps: int               # timed decode steps after one warm-up (compiling) step
    prefill_steps: int              # timed prefill steps after one warm-up step
    block_size: int = 16            # tokens per KV page
    chunk_tokens: tuple[int, int] = (64, 32)  # kernel check: a prefill chunk and a fresh prompt


FULL = Plan(FULL_MODELS, "bfloat16", (1, 8, 64, 256), context=1024, prefill_tokens=2048,
            decode_steps=10, prefill_steps=5)
TINY = Plan(TINY_MODELS, "float32", (1, 8), context=40, prefill_tokens=64, decode_steps=3,
            prefill_steps=2, chunk_tokens=(16, 8))


class Budget:
    """Wall time left; a unit of work runs only if the time it is expected to take is left."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, need_s: float) -> bool:
        return self.left() > need_s


@dataclasses.dataclass
class Check:
    """One run's state: the plan, the clock, the report and the models built so far."""

    plan: Plan
    budget: Budget
    out: Path
    report: dict[str, Any]
    mesh: Any = None
    models: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # name -> (model, params)

    def skip_note(self, what: str, need_s: float) -> str:
        left = max(0.0, self.budget.left())
        need = f", needs ~{need_s:.0f} s" if need_s else ""
        return f"{what}: skipped, {left:.0f} s of the {self.budget.seconds:.0f} s budget left{need}"

    def write(self) -> None:
        self.report["wall_s"] = round(self.budget.elapsed(), 2)
        self.out.write_text(json.dumps(self.report, indent=2) + "\n")


def log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------- models

def built_model(check: Check, name: str):
    """(model, params) of `name`: random weights initialised on the device by one jitted call,
    laid out as the runner's mesh lays them out (so the runner moves nothing)."""
    if name not in check.models:
        cfg = check.plan.models[name]
        model = model_class(cfg.architecture)(cfg)
        dtype = jnp.dtype(check.plan.dtype)
        init = lambda rng: model.init_params(rng, dtype)  # noqa: E731
        rng = jax.random.key(0)
        shardings = param_shardings(jax.eval_shape(init, rng), check.mesh, cfg)
        start = time.perf_counter()
        params = jax.block_until_ready(jax.jit(init, out_shardings=shardings)(rng))
        check.models[name] = (model, params)
        check.report["models"][name] = {**dataclasses.asdict(cfg), "dtype": check.plan.dtype,
                                        "param_bytes": tree_bytes(params),
                                        "init_s": round(time.perf_counter() - start, 3)}
        log(f"  {name}: {tree_bytes(params) / 1e9:.3f} GB of random {check.plan.dtype} weights "
            f"in {time.perf_counter() - start:.1f} s")
    return check.models[name]


def tree_bytes(tree) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree))


def decode_weight_bytes(cfg: ModelConfig, params) -> int:
    """Weight bytes one decode step reads: every layer, the final norm and the logits matrix (the
    embedding table when tied); an untied embedding gives only B rows, left out."""
    logits_matrix = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return tree_bytes(params["layers"]) + tree_bytes(params["final_norm"]) + tree_bytes(logits_matrix)


def kv_read_bytes(cfg: ModelConfig, kv_len: int, dtype) -> int:
    """KV bytes one sequence's attention reads in one step: K and V of every layer."""
    return kv_len * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize


# ----------------------------------------------------------------------------- sections

def environment(check: Check) -> dict:
    device = jax.devices()[0]
    import jaxlib
    plugins = sorted(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                     if d.metadata["Name"] and d.metadata["Name"].replace("_", "-").startswith("jax-cuda"))
    peak = next((bw for key, bw in PEAK_HBM_BYTES_PER_S.items()
                 if key in device.device_kind and not any(s in device.device_kind for s in ("PCIe", "NVL"))),
                None)
    check.report["peak_hbm_bytes_per_s"] = peak
    return {"device_kind": device.device_kind, "platform": device.platform,
            "platform_version": getattr(getattr(device, "client", None), "platform_version", None),
            "jax_plugins": plugins,
            "num_devices": jax.device_count(), "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "python": sys.version.split()[0],
            "peak_hbm_bytes_per_s": peak}


def mixed_step(plan: Plan, cfg: ModelConfig, seed: int = 0) -> dict:
    """A ragged step of four decodes (long, half, short and one-token contexts) between a prefill
    chunk after earlier context and a fresh prompt, padded with tokens and sequence slots, over
    shuffled pages: the attention arguments, unit-normal q/k/v in the plan's dtype."""
    C, S = plan.context, plan.block_size
    chunk, fresh = plan.chunk_tokens
    q_lens = [1, chunk, 1, fresh, 1, 1]
    kv_lens = [C + 1, C // 3 + chunk, C // 2 + 1, fresh, 17, 1]
    num_slots = 8
    num_tokens = 1 << sum(q_lens).bit_length()  # a power of two with padding tokens
    pages = [-(-n // S) for n in kv_lens]
    rng = np.random.default_rng(seed)
    ids = 1 + rng.permutation(sum(pages))  # page 0 is the null page
    page_table = np.zeros((num_slots, max(pages)), np.int32)
    for b, (first, n) in enumerate(zip(np.cumsum([0] + pages[:-1]), pages)):
        page_table[b, :n] = ids[first:first + n]
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    dtype = jnp.dtype(plan.dtype)
    return dict(
        q=jax.random.normal(kq, (num_tokens, N, H), dtype),
        k_pages=jax.random.normal(kk, (1 + sum(pages), S, K, H), dtype),
        v_pages=jax.random.normal(kv, (1 + sum(pages), S, K, H), dtype),
        kv_lens=jnp.asarray(kv_lens + [0] * (num_slots - len(kv_lens)), jnp.int32),
        page_table=jnp.asarray(page_table),
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]).tolist()
                              + [sum(q_lens)] * (num_slots - len(q_lens)), jnp.int32),
        num_seqs=jnp.int32(len(q_lens)))


def kernel_check(check: Check) -> dict:
    """Each backend's attention against the dense oracle on a mixed step of each model's shapes."""
    rows = []
    tolerance = TOLERANCE[check.plan.dtype]
    for name, cfg in check.plan.models.items():
        args = mixed_step(check.plan, cfg)
        sm_scale = cfg.head_dim ** -0.5
        want = np.asarray(ragged_paged_attention_reference(**args, sm_scale=sm_scale), np.float32)
        for backend in BACKENDS:
            try:
                got = np.asarray(attention_backend(backend)(**args, sm_scale=sm_scale), np.float32)
                error, failure = float(np.max(np.abs(got - want))), None
            except Exception:  # recorded as a failed check; the other pairs still run
                error, failure = math.nan, traceback.format_exc()
                log(failure)
            passed = bool(math.isfinite(error) and error <= tolerance)
            rows.append({"model": name, "backend": backend, "dtype": check.plan.dtype, "error": failure,
                         "num_tokens": int(args["q"].shape[0]),
                         "q_lens": np.diff(np.asarray(args["cu_q_lens"]))[:int(args["num_seqs"])].tolist(),
                         "kv_lens": np.asarray(args["kv_lens"])[:int(args["num_seqs"])].tolist(),
                         "max_abs_error": error if math.isfinite(error) else None,
                         "max_abs_reference": float(np.max(np.abs(want))),
                         "tolerance": tolerance, "passed": passed})
            log(f"  {name} {backend}: max |err| {error:.3g} (tolerance {tolerance:g}) "
                f"{'ok' if passed else 'FAILED'}")
    return {"passed": all(r["passed"] for r in rows), "results": rows}


def sequence(request_id: str, num_tokens: int, first_page: int, block_size: int, vocab: int,
             rng: np.random.Generator) -> Request:
    """A request of `num_tokens` random tokens on consecutive pages from `first_page`."""
    req = Request(request_id, rng.integers(0, vocab, num_tokens).tolist(), SamplingParams(temperature=0.0),
                  seed=0, max_tokens=1, eos_token_ids=())
    req.block_ids = list(range(first_page, first_page + -(-num_tokens // block_size)))
    return req


def timed_steps(runner: ModelRunner, sched: SchedulerOutput, steps: int, max_seconds: float = 5.0) -> dict:
    """One warm-up step (it compiles the bucket's graphs), then up to `steps` timed ones on the same
    inputs, fewer where they pass `max_seconds` (a slow backend must not eat the budget)."""
    bucket, inputs = runner.prepare(sched, [None] * len(sched.seqs))
    compile_before = runner.compile_seconds
    start = time.perf_counter()
    runner.run_graphs(bucket, inputs)
    first = time.perf_counter() - start
    times = []
    while len(times) < steps and sum(times) < max_seconds:
        start = time.perf_counter()
        runner.run_graphs(bucket, inputs)
        times.append(time.perf_counter() - start)
    return {"bucket": list(bucket), "first_step_s": round(first, 4),
            "compile_s": round(runner.compile_seconds - compile_before, 4),
            "step_s": statistics.median(times), "step_s_min": min(times), "steps": len(times)}


def release(runner: ModelRunner) -> None:
    """Free the runner's KV pages now (the next runner needs the memory; the params are shared)."""
    for pages in (runner.kv_cache.k, runner.kv_cache.v):
        pages.delete()


def each_model_backend(check: Check, section: str, measure: Callable[[str, str], list[dict]]) -> dict:
    """measure(model, backend) for every pair the budget allows; a pair that raises is recorded and
    the rest still run."""
    rows, notes, errors, took = [], [], [], {}
    for name in check.plan.models:
        for backend in BACKENDS:
            need = took.get(name, 0.0)  # the other backend's time, once one has run
            if not check.budget.allows(need):
                notes.append(check.skip_note(f"{section} {name} {backend}", need))
                log("  " + notes[-1])
                continue
            start = time.perf_counter()
            try:
                rows += measure(name, backend)
            except Exception:
                errors.append(f"{name} {backend}: {traceback.format_exc()}")
                log(f"  {name} {backend}: ERROR\n{traceback.format_exc()}")
            took[name] = time.perf_counter() - start
    return {"results": rows, "notes": notes, "errors": errors}


def decode(check: Check) -> dict:
    """Decode steps at each B: every sequence has plan.context tokens of KV and decodes one more."""
    plan = check.plan

    def measure(name: str, backend: str) -> list[dict]:
        model, params = built_model(check, name)
        cfg, S, max_b = model.config, plan.block_size, max(plan.batch_sizes)
        pages_per_seq = -(-(plan.context + 1) // S)
        runner = ModelRunner(model, params, num_pages=1 + max_b * pages_per_seq, block_size=S,
                             max_model_len=pages_per_seq * S, max_num_seqs=max_b,
                             max_num_batched_tokens=max_b, attention_fn=attention_backend(backend),
                             mesh=check.mesh)
        rng, rows, last_s = np.random.default_rng(0), [], 0.0
        weight_bytes = decode_weight_bytes(cfg, runner.params)
        try:
            for batch in plan.batch_sizes:
                if not check.budget.allows(last_s):  # the last B's time: less than this one will take
                    note = check.skip_note(f"decode {name} {backend} B={batch}", last_s)
                    log("  " + note)
                    rows.append({"model": name, "backend": backend, "batch": batch, "skipped": note})
                    continue
                start = time.perf_counter()
                seqs = []
                for b in range(batch):
                    req = sequence(f"d{b}", plan.context + 1, 1 + b * pages_per_seq, S, cfg.vocab_size, rng)
                    req.num_computed_tokens = plan.context
                    seqs.append(ScheduledSeq(req, plan.context, 1))
                row = timed_steps(runner, SchedulerOutput(seqs=seqs), plan.decode_steps)
                kv_bytes = batch * kv_read_bytes(cfg, plan.context + 1, plan.dtype)
                bandwidth = (weight_bytes + kv_bytes) / row["step_s"]
                peak = check.report["peak_hbm_bytes_per_s"]
                rows.append({"model": name, "backend": backend, "batch": batch, "context": plan.context, **row,
                             "tok_s": batch / row["step_s"], "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
                             "hbm_gb_s": bandwidth / 1e9, "hbm_share": bandwidth / peak if peak else None})
                log(f"  {name} {backend} B={batch}: {row['step_s'] * 1e3:.2f} ms/step, "
                    f"{batch / row['step_s']:.1f} tok/s, {bandwidth / 1e9:.1f} GB/s "
                    f"(first step {row['first_step_s']:.1f} s)")
                last_s = time.perf_counter() - start
        finally:
            release(runner)
        return rows

    return each_model_backend(check, "decode", measure)


def prefill(check: Check) -> dict:
    """One sequence's whole prompt of plan.prefill_tokens tokens in one step."""
    plan = check.plan

    def measure(name: str, backend: str) -> list[dict]:
        model, params = built_model(check, name)
        T, S = plan.prefill_tokens, plan.block_size
        runner = ModelRunner(model, params, num_pages=1 + -(-T // S), block_size=S, max_model_len=T,
                             max_num_seqs=1, max_num_batched_tokens=T, attention_fn=attention_backend(backend),
                             mesh=check.mesh)
        try:
            req = sequence("p", T, 1, S, model.config.vocab_size, np.random.default_rng(0))
            row = timed_steps(runner, SchedulerOutput(seqs=[ScheduledSeq(req, 0, T)]), plan.prefill_steps)
        finally:
            release(runner)
        log(f"  {name} {backend} T={T}: {row['step_s'] * 1e3:.1f} ms, {T / row['step_s']:.0f} tok/s "
            f"(first step {row['first_step_s']:.1f} s)")
        return [{"model": name, "backend": backend, "tokens": T, **row, "tok_s": T / row["step_s"]}]

    return each_model_backend(check, "prefill", measure)


SECTIONS: dict[str, Callable[[Check], dict]] = {
    "environment": environment, "kernel_check": kernel_check, "decode": decode, "prefill": prefill}


# ----------------------------------------------------------------------------- the run

def run(check: Check) -> bool:
    """Every section in order, each recorded with its status; True if all went well."""
    ok = True
    for name, section in SECTIONS.items():
        if not check.budget.allows(0):
            check.report["sections"][name] = {"status": "skipped", "note": check.skip_note(name, 0)}
            continue
        log(f"== {name}")
        start = time.perf_counter()
        try:
            result = section(check)
            status = "error" if result.get("errors") else "ok"
        except Exception:
            result, status = {"errors": [traceback.format_exc()]}, "error"
            log(traceback.format_exc())
        ok &= status == "ok" and result.get("passed", True)
        check.report["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - start, 2),
                                          **result}
        check.write()
    return ok


def table(report: dict) -> str:
    """The report's measurements as plain-text tables."""
    sections = report["sections"]
    lines = [f"device: {sections.get('environment', {}).get('device_kind')}  "
             f"jax {jax.__version__}  dtype {report['dtype']}  wall {report['wall_s']:.1f} s"]
    kernel = sections.get("kernel_check", {})
    for r in kernel.get("results", []):
        error = "-" if r["max_abs_error"] is None else f"{r['max_abs_error']:.3g}"
        lines.append(f"kernel  {r['model']:<13} {r['backend']:<7} max|err| {error:<9} "
                     f"tol {r['tolerance']:g}  {'ok' if r['passed'] else 'FAILED'}")
    decode_rows = sections.get("decode", {}).get("results", [])
    if decode_rows:
        lines.append(f"{'decode':<7} {'model':<13} {'backend':<7} {'B':>4} {'ms/step':>9} {'tok/s':>10} "
                     f"{'GB/s':>8} {'% peak':>7}")
    for r in decode_rows:
        if "skipped" in r:
            lines.append(f"{'':<7} {r['model']:<13} {r['backend']:<7} {r['skipped']}")
            continue
        share = f"{100 * r['hbm_share']:.1f}" if r["hbm_share"] is not None else "-"
        lines.append(f"{'':<7} {r['model']:<13} {r['backend']:<7} {r['batch']:>4} {r['step_s'] * 1e3:>9.2f} "
                     f"{r['tok_s']:>10.1f} {r['hbm_gb_s']:>8.1f} {share:>7}")
    for r in sections.get("prefill", {}).get("results", []):
        lines.append(f"prefill {r['model']:<13} {r['backend']:<7} T={r['tokens']}  {r['step_s'] * 1e3:.1f} ms  "
                     f"{r['tok_s']:.0f} tok/s")
    for name, s in sections.items():
        for note in s.get("notes", []) + ([s["note"]] if "note" in s else []):
            lines.append(f"note: {note}")
        if s.get("status") == "error":
            lines.append(f"ERROR in {name}: see the JSON's sections.{name}.errors")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in float32 (CPU, tests)")
    parser.add_argument("--out", default="gpu_check.json", help="JSON report path")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip remaining work, with a note, rather than run past this many seconds")
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else FULL
    check = Check(plan, Budget(args.budget_s), Path(args.out),
                  report={"tiny": args.tiny, "dtype": plan.dtype, "budget_s": args.budget_s,
                          "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "models"},
                          "peak_hbm_bytes_per_s": None, "models": {}, "sections": {}})
    check.mesh = build_mesh(ParallelConfig())
    log(f"gpu_check: {jax.devices()[0].device_kind}, jax {jax.__version__}, {'tiny' if args.tiny else 'full'} "
        f"shapes, budget {args.budget_s:.0f} s")
    # A run whose kernel check did not run (no budget) has not shown the kernel right.
    ok = run(check) and check.report["sections"]["kernel_check"].get("passed", False)
    check.report["ok"] = ok
    check.write()
    log(table(check.report))
    log(f"total wall time {check.budget.elapsed():.1f} s; report in {check.out}; {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
