"""On-demand JAX profiler traces of the engine, and compile logging.

A trace covers every step run between ``start`` and ``stop``: host phases (schedule, prepare,
device step, outputs) as annotations and device ops under the models' ``jax.named_scope``s. It is
written under ``<trace_dir>/plugins/profile/<run>/``: ``*.xplane.pb`` opens in TensorBoard/XProf
(point it at trace_dir), ``perfetto_trace.json.gz`` in ui.perfetto.dev.
"""
from __future__ import annotations

import glob
import logging
import os
import threading

import jax

# Host-side phase names, as they appear in the trace.
SCHEDULE = "jaxserve.schedule"
PREPARE = "jaxserve.prepare_inputs"
DEVICE_STEP = "jaxserve.device_step"
PROCESS_OUTPUTS = "jaxserve.process_outputs"


def annotate(name: str):
    """A host-side trace span; costs next to nothing while no trace is running."""
    return jax.profiler.TraceAnnotation(name)


class Profiler:
    """One trace at a time (JAX's profiler is process-wide)."""

    def __init__(self, trace_dir: str | None = None):
        self.trace_dir = trace_dir or None
        self._active_dir: str | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._active_dir is not None

    def start(self, trace_dir: str | None = None) -> str:
        """Start tracing into trace_dir (else the configured one); returns the folder used."""
        with self._lock:
            if self._active_dir is not None:
                raise RuntimeError(f"a profile is already being recorded into {self._active_dir}")
            folder = trace_dir or self.trace_dir
            if not folder:
                raise ValueError("no profiler directory: pass trace_dir, or build the engine with profiler_dir "
                                 "(--profiler-dir, JAXSERVE_PROFILER_DIR)")
            os.makedirs(folder, exist_ok=True)
            jax.profiler.start_trace(folder, create_perfetto_trace=True)
            self._active_dir = folder
            return folder

    def stop(self) -> str:
        """Stop tracing; returns the run folder holding the trace files."""
        with self._lock:
            if self._active_dir is None:
                raise RuntimeError("no profile is being recorded: call start first")
            folder, self._active_dir = self._active_dir, None
            jax.profiler.stop_trace()
        runs = sorted(glob.glob(os.path.join(folder, "plugins", "profile", "*")), key=os.path.getmtime)
        return runs[-1] if runs else folder


def enable_compile_logging() -> None:
    """Log every XLA compilation (JAX's own log line per compile, and the runner's per step graph)."""
    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jaxserve.runner").setLevel(logging.DEBUG)  # its per-graph compile lines
