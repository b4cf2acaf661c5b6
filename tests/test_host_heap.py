"""The C heap under XLA:CPU's buffers (jaxserve/host_heap.py): a step's large blocks are kept for
the next step instead of being mapped and faulted in again, and the free pages go back on demand.

The heap is set up once per process, before JAX starts, so the measurements run in fresh processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxserve import host_heap

# Calls of a jitted function whose buffers are 40 MiB each (over glibc's largest mmap threshold),
# counting the page faults per call; then a 256 MiB block freed, and the process's resident size
# before and after give_back_free_memory.
PROBE = r"""
import json, resource, sys
import numpy as np
from jaxserve import host_heap
kept = host_heap.keep_freed_blocks()
import jax, jax.numpy as jnp

@jax.jit
def step(x):
    p = jax.nn.softmax(x * 1.3, axis=-1)
    return jnp.cumsum(p, axis=-1)[:, -1]

x = jax.random.normal(jax.random.key(0), (160, 65536))
for _ in range(40):  # the kept heap grows to its size over the first calls, then holds
    jax.block_until_ready(step(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    jax.block_until_ready(step(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

block = np.ones(1 << 28, np.uint8)
del block
freed = resident()
host_heap.give_back_free_memory()
print(json.dumps({"kept": kept, "describe": host_heap.describe(), "faults_per_call": faults,
                  "resident_freed": freed, "resident_given_back": resident()}))
"""


def _probe(**env) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_heap._glibc() is None or not os.path.exists("/proc/self/statm"),
                    reason="the heap settings are glibc's (Linux)")
def test_kept_heap_stops_the_page_faults_of_large_step_buffers_and_gives_pages_back():
    kept = _probe(JAX_PLATFORMS="cpu", JAXSERVE_HOST_HEAP="retain")
    system = _probe(JAX_PLATFORMS="cpu", JAXSERVE_HOST_HEAP="system")
    assert kept["kept"] and "one arena keeps the blocks" in kept["describe"], kept
    assert not system["kept"] and "glibc's defaults (JAXSERVE_HOST_HEAP is not 'retain')" == system["describe"], system
    # glibc's defaults map each 40 MiB buffer afresh every call (10,240 pages apiece).
    assert system["faults_per_call"] > 10_000, system
    assert kept["faults_per_call"] * 4 < system["faults_per_call"], (kept, system)
    # A kept heap holds a freed 256 MiB block until it is given back.
    assert kept["resident_freed"] - kept["resident_given_back"] > 200 << 20, kept


def test_the_heap_is_kept_only_when_jax_is_about_to_start_on_the_cpu(monkeypatch):
    monkeypatch.setattr(host_heap, "_backends_started", lambda: False)
    monkeypatch.setattr(host_heap, "_accelerator_plugins", lambda: [])
    for platforms, cpu in [("cpu", True), ("cpu,cuda", True), ("cuda,cpu", False), ("tpu", False)]:
        monkeypatch.setattr(host_heap, "_platforms", lambda p=platforms: p)
        assert host_heap.cpu_backend_ahead()[0] is cpu, platforms
    monkeypatch.setattr(host_heap, "_platforms", lambda: None)
    assert host_heap.cpu_backend_ahead()[0] is True
    monkeypatch.setattr(host_heap, "_accelerator_plugins", lambda: ["xla_cuda13"])
    assert host_heap.cpu_backend_ahead() == (False, "JAX would start an accelerator plugin (xla_cuda13)")
    # Once JAX has started, XLA's threads have arenas of their own: too late, whatever the platform.
    monkeypatch.setattr(host_heap, "_backends_started", lambda: True)
    monkeypatch.setattr(host_heap, "_platforms", lambda: "cpu")
    assert host_heap.cpu_backend_ahead()[0] is False


def test_llm_sets_the_heap_up_before_it_loads_the_model(tmp_path):
    """A fresh process's LLM, asked to retain, decides the heap before JAX starts (even when the
    model then fails to load)."""
    code = ("from jaxserve import LLM, host_heap\n"
            f"try:\n    LLM(model={str(tmp_path / 'no-such-model')!r})\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
            "print(host_heap.describe())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "JAXSERVE_HOST_HEAP": "retain"})
    assert run.returncode == 0, run.stderr[-3000:]
    refused, described = run.stdout.strip().splitlines()[-2:]
    assert refused.startswith("FileNotFoundError") and "no-such-model" in refused, run.stdout
    expected = "one arena keeps the blocks" if host_heap._glibc() is not None else "the C library is not glibc"
    assert expected in described, run.stdout


def test_a_bad_heap_setting_is_refused_by_name():
    with pytest.raises(ValueError, match="JAXSERVE_HOST_HEAP must be 'system'.*not 'keep'"):
        host_heap.keep_freed_blocks(environ={"JAXSERVE_HOST_HEAP": "keep"})


def test_the_hint_names_rows_past_glibcs_mmap_ceiling(monkeypatch):
    monkeypatch.setattr(host_heap, "_kept", False)
    monkeypatch.setattr(host_heap, "_glibc", lambda: object())
    line = host_heap.hint(256, 49152)
    assert "[256, 49152] float32 rows are 48 MiB" in line and "JAXSERVE_HOST_HEAP=retain" in line
    assert host_heap.hint(64, 49152) is None  # 12 MiB: glibc keeps blocks that size in its heap
    assert host_heap.hint(64, 262144) is not None  # Gemma 3's vocabulary: 64 MiB
    monkeypatch.setattr(host_heap, "_kept", True)
    assert host_heap.hint(256, 49152) is None


def test_a_jax_without_the_started_check_counts_as_started(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.delattr(xla_bridge, "backends_are_initialized")
    assert host_heap._backends_started() is True  # so the heap is left as glibc set it
