"""The C heap under XLA:CPU's buffers: keep a step's large blocks for the next step (opt-in).

On a CPU backend XLA takes every buffer of a step (logits, the sampler's full-vocabulary arrays,
activations) from malloc and frees it when the step is done. glibc hands out a block over its
mmap threshold (32 MiB at most) as a fresh mapping and unmaps it when it is freed, and the blocks
of XLA's worker threads come from heaps of their own, which it gives back when they empty. So each
step maps its large buffers again and faults them in a 4 KiB page at a time, the kernel zeroing
every page. [256, 49152] float32 logits are 48 MiB; with Gemma 3's 262k vocabulary 33 rows make a
block that size. Measured on a 2-vCPU EPYC (benchmarks/README.md, "The C heap under XLA:CPU"):
Gemma 3 270M sampling 64 rows made 12.8 million page faults in 41 s, 25 s of it in the kernel.

``JAXSERVE_HOST_HEAP=retain`` makes glibc keep what it frees: one arena for every thread
(M_ARENA_MAX 1), no mapping of its own per large block (M_MMAP_MAX 0), and no trimming by itself.
That run then made 53 thousand faults and 1.43x the tokens/s. It is not the default: the process
holds what its steps freed (that run: 5.3 GiB resident against 3.9), and with every thread on one
arena XLA's threads contend for its lock (a single stream measured 0-7% slower). `LLM` (so `serve`,
`run` and `generate`) logs a hint when an engine's rows make blocks past glibc's ceiling on
glibc's own heap.

A thread takes its arena when it first allocates, and XLA's threads do so as its CPU client
starts, so `keep_freed_blocks` must run before JAX starts its backends: `LLM` and `serve` call it
first thing, and it keeps the blocks only when that backend will be the CPU (on an accelerator the
host holds no step buffers). With blocks kept nothing returns free pages by itself, so
`give_back_free_memory` (malloc_trim) runs after a model load (its host copies of the weights) and
after a dropped model is collected. Other C libraries (musl, macOS) are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# mallopt takes an int and glibc keeps the threshold as a size_t: -1 is "never trim by itself"
# (a step's temporaries are one block, and Gemma 3's at 64 rows passed a 1 GiB threshold).
NEVER_TRIM = -1
MMAP_CEILING = 32 << 20  # glibc's largest mmap threshold on 64-bit: a larger block is always mapped
ENV = "JAXSERVE_HOST_HEAP"

# None until keep_freed_blocks has decided; then why it did or did not.
_decision: str | None = None
_kept = False


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt and malloc_trim are glibc's)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return libc


def _accelerator_plugins() -> list[str]:
    """PJRT plugins JAX would load (CUDA, ROCm, ...) and libtpu: where JAX would not default to the CPU."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return names


def _backends_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)  # private: a JAX without it counts as started
    return started is None or started()


def _platforms() -> str | None:
    import jax

    return jax.config.jax_platforms  # JAX_PLATFORMS, or what the program set


def cpu_backend_ahead() -> tuple[bool, str]:
    """Whether JAX will run on the CPU with its backends not yet started (once they have, XLA's
    threads have their arenas), decided without starting them; and why."""
    if _backends_started():
        return False, "JAX's backends started before jaxserve could set the heap up"
    platforms = _platforms()
    if platforms:
        first = platforms.split(",")[0].strip()
        return first == "cpu", f"JAX_PLATFORMS names {first} first"
    plugins = _accelerator_plugins()
    if plugins:
        return False, f"JAX would start an accelerator plugin ({', '.join(plugins)})"
    return True, "the CPU backend, no accelerator plugin installed"


def keep_freed_blocks(environ=os.environ) -> bool:
    """Make glibc keep the blocks XLA:CPU frees, when JAX is about to start on the CPU -> whether
    the heap keeps them now. Decides once per process; later calls say what the first decided."""
    global _decision, _kept
    asked = environ.get(ENV, "system")
    if asked not in ("system", "retain"):
        raise ValueError(f"{ENV} must be 'system' (glibc's defaults) or 'retain' (keep the blocks XLA:CPU "
                         f"frees), not {asked!r}")
    if _decision is not None:
        return _kept
    if asked == "system":
        _decision = f"{ENV} is not 'retain'"
        return False
    libc = _glibc()
    if libc is None:
        _decision = "the C library is not glibc"
        return False
    cpu, _decision = cpu_backend_ahead()
    if cpu:
        # The arena count first: the other two matter once every thread shares the main arena.
        _kept = bool(libc.mallopt(M_ARENA_MAX, 1) and libc.mallopt(M_MMAP_MAX, 0)
                     and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
        if not _kept:
            _decision = "glibc's mallopt refused a setting"
    logger.debug("host heap: %s", describe())
    return _kept


def describe() -> str:
    """What the heap does, for the start-up log."""
    if _decision is None:
        return "glibc's defaults (not decided)"
    if _kept:
        return f"one arena keeps the blocks XLA:CPU frees ({_decision})"
    return f"glibc's defaults ({_decision})"


def hint(max_num_seqs: int, vocab_size: int) -> str | None:
    """The log line that suggests retain, where an engine on glibc's own heap makes rows of
    logits past glibc's mmap ceiling (mapped and faulted in afresh every step); else None."""
    block = max_num_seqs * vocab_size * 4
    if _kept or _glibc() is None or block <= MMAP_CEILING:
        return None
    return (f"a step's [{max_num_seqs}, {vocab_size}] float32 rows are {block >> 20} MiB, past glibc's "
            f"{MMAP_CEILING >> 20} MiB mmap ceiling: glibc maps and faults them in again every step; "
            f"{ENV}=retain keeps them (jaxserve/host_heap.py)")


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (after a model load's host copies, or a
    dropped model): with blocks kept, nothing else does."""
    if _kept:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
