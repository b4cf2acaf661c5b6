"""benchmarks/gpu_check.py at tiny shapes, as a lent GPU machine runs it: without gguf or sanic
(that machine has neither) and without jaxserve installed (it gets the working tree only)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

# Imports of gguf and sanic fail; the editable install's finder is gone, so jaxserve comes from the
# checkout the way the script finds it there.
LIKE_THE_GPU_MACHINE = f"""
import runpy, sys
sys.modules["gguf"] = None
sys.modules["sanic"] = None
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_tiny_run_passes_and_reports_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-c", LIKE_THE_GPU_MACHINE, "--tiny", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "total wall time" in done.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["tiny"]
    sections = report["sections"]
    assert set(sections) == {"environment", "kernel_check", "decode", "prefill"}
    assert all(s["status"] == "ok" for s in sections.values()), sections
    assert sections["environment"]["device_kind"] and sections["environment"]["jax_version"]
    models = set(report["models"])
    assert models == {"smollm2-135m", "llama-3.1-8b"}

    kernel = sections["kernel_check"]
    assert kernel["passed"]
    pairs = {(m, b) for m in models for b in ("pallas", "jnp")}
    assert {(r["model"], r["backend"]) for r in kernel["results"]} == pairs
    for r in kernel["results"]:
        # A real comparison: a finite, non-trivial error on outputs that are not all zeros.
        assert r["error"] is None
        assert math.isfinite(r["max_abs_error"]) and 0 <= r["max_abs_error"] <= r["tolerance"]
        assert r["max_abs_reference"] > 0.1
        assert 1 in r["q_lens"] and max(r["q_lens"]) > 1  # decodes and prefills in one step

    decode = sections["decode"]["results"]
    assert not sections["decode"]["notes"] and not sections["decode"]["errors"]
    assert {(r["model"], r["backend"], r["batch"]) for r in decode} == {
        (m, b, n) for m in models for b in ("pallas", "jnp") for n in report["plan"]["batch_sizes"]}
    for r in decode:
        assert r["step_s"] > 0 and r["tok_s"] > 0 and r["hbm_gb_s"] > 0 and r["steps"] >= 1
        assert r["tok_s"] == r["batch"] / r["step_s"]
        assert r["kv_bytes"] > 0 and r["weight_bytes"] > 0
        assert r["hbm_share"] is None  # no known peak for a CPU

    prefill = sections["prefill"]["results"]
    assert {(r["model"], r["backend"]) for r in prefill} == pairs
    for r in prefill:
        assert r["tokens"] == report["plan"]["prefill_tokens"] and r["step_s"] > 0 and r["tok_s"] > 0


def load_gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_budget_skips_what_would_not_fit_and_errors_do_not_stop_the_rest(tmp_path, monkeypatch):
    gpu_check = load_gpu_check(monkeypatch)
    check = gpu_check.Check(gpu_check.TINY, gpu_check.Budget(0.5), tmp_path / "x.json", report={})
    calls = []

    def measure(model: str, backend: str) -> list[dict]:
        calls.append((model, backend))
        time.sleep(0.3)
        if model == "llama-3.1-8b":
            raise RuntimeError("out of memory")
        return [{"model": model, "backend": backend}]

    result = gpu_check.each_model_backend(check, "decode", measure)
    # Each model's first backend starts (nothing known yet); its second would need the 0.3 s the
    # first took, which is no longer left.
    assert calls == [("smollm2-135m", "pallas"), ("llama-3.1-8b", "pallas")]
    assert result["results"] == [{"model": "smollm2-135m", "backend": "pallas"}]
    assert len(result["notes"]) == 2 and all("skipped" in note for note in result["notes"])
    assert len(result["errors"]) == 1 and "out of memory" in result["errors"][0]


def test_no_budget_is_a_failed_run(tmp_path):
    # The kernel check never ran, so nothing showed the kernel right.
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--budget-s", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert not report["ok"]
    assert all(s["status"] == "skipped" and "budget" in s["note"] for s in report["sections"].values())


def test_kernel_check_fails_a_wrong_or_raising_kernel(tmp_path, monkeypatch):
    gpu_check = load_gpu_check(monkeypatch)
    import jax.numpy as jnp

    def wrong(q, *args, **kwargs):
        return jnp.zeros_like(q)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(gpu_check, "attention_backend", lambda name: {"pallas": wrong, "jnp": broken}[name])
    plan = dataclasses.replace(gpu_check.TINY, models={"llama-3.1-8b": gpu_check.TINY.models["llama-3.1-8b"]})
    result = gpu_check.kernel_check(gpu_check.Check(plan, gpu_check.Budget(60), tmp_path / "x.json", report={}))
    assert not result["passed"]
    by_backend = {r["backend"]: r for r in result["results"]}
    assert by_backend["pallas"]["max_abs_error"] > by_backend["pallas"]["tolerance"]
    assert not by_backend["pallas"]["passed"] and by_backend["pallas"]["error"] is None
    assert by_backend["jnp"]["max_abs_error"] is None and "no kernel image" in by_backend["jnp"]["error"]
    assert not by_backend["jnp"]["passed"]
