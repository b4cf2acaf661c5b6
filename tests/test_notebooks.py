"""The notebooks in notebooks/ run top to bottom on CPU, in a kernel of this test's interpreter, and
what they computed holds: each ends with a cell printing a JSON dict of checks, all of which must
be true. Notebooks are executed in memory; nothing is written back."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 600  # seconds; a cold compilation cache makes the first SmolLM2 start slow

# The checks each notebook must report (it may report more; all must be true).
EXPECTED = {
    "01_quickstart": {"greedy_says_paris", "chat_says_paris", "same_seed_same_tokens_in_a_batch",
                      "other_seed_other_tokens", "greedy_picks_rank_1", "stats_count_the_tokens"},
    "02_sampling_strategies": {"seven_strategies_ran", "greedy_always_rank_1", "second_best_always_rank_2",
                               "samplers_differ", "entropies_finite", "pluggable_graphs_compiled"},
    "03_sharding": {"four_devices", "q_proj_split_by_heads", "kv_cache_split_by_kv_heads", "tp2_same_tokens",
                    "tp4_same_tokens", "tp3_refused_naming_numbers", "smollm2_tp2_refused",
                    "dp2_on_two_devices", "dp2_both_replicas_worked", "dp2_same_tokens"},
    "04_profiling": {"trace_files", "every_phase_every_step", "device_step_dominates", "ops_have_scopes",
                     "model_layers_in_scopes", "prefill_and_decode_buckets"},
}

# Appended to the in-memory copy: which interpreter the kernel ran.
KERNEL_PROBE = "import json, sys; print(json.dumps({'kernel_prefix': sys.prefix}))"


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


def last_json_line(cell) -> dict:
    text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, f"cell printed nothing on stdout:\n{cell.source}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_checks_hold(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert nb.cells[-1].cell_type == "code", "the last cell must print the notebook's checks"
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_PROBE))
    # kernel_name "python3" is the native kernel: jupyter_client launches it with sys.executable (the
    # venv's python, where ipykernel is installed); the probe below confirms it. The kernel inherits
    # this process's environment, XLA_FLAGS from tests/conftest.py included, so its step graphs hit
    # the compilation cache the other tests fill.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback

    probe = last_json_line(nb.cells[-1])
    assert os.path.realpath(probe["kernel_prefix"]) == os.path.realpath(sys.prefix), probe
    checks = last_json_line(nb.cells[-2])
    missing = EXPECTED[name] - set(checks)
    assert not missing, f"{name} did not report {sorted(missing)}"
    failed = sorted(k for k, ok in checks.items() if ok is not True)
    assert not failed, f"{name}: checks failed: {failed} (all: {checks})"
