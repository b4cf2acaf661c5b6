"""The process's memory mappings against Linux's per-process cap, and the garbage collection that
gives back the compiled code of engines already dropped.

XLA:CPU loads each compiled kernel's code and data into memory regions of their own (a tiny
model's warm-up graphs take about 2,600 of them), and Linux caps a process at
vm.max_map_count regions (65,530 by default): past it, loading the next executable crashes the
process inside LLVM's linker (a segmentation fault or an abort, no Python error). JAX's compiled
executables sit in reference cycles, so a dropped engine's regions (and its weights) go only at a
full garbage collection, which a long-lived process that allocates little may not run for hours.
An engine about to compile, and the server after unloading a model, make room here first.
"""
from __future__ import annotations

import gc
import logging

from jaxserve import host_heap

logger = logging.getLogger(__name__)

_DEFAULT_MAP_LIMIT = 65530
# Collect once the process holds this share of its limit: the rest leaves room for one more
# large engine (SmolLM2's full warm-up is about 9,000 regions) between two checks.
_CROWDED_SHARE = 0.4
_REGROWTH_SHARE = 0.1
# Mappings left by the last collection (the ones engines in use hold).
_crowded_after_collection = 0


def mapping_count() -> int | None:
    """Memory regions this process has mapped now (None where /proc is not there)."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return sum(1 for _ in maps)
    except OSError:
        return None


def mapping_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _DEFAULT_MAP_LIMIT


def release_dropped_graphs(force: bool = False) -> bool:
    """Run a full garbage collection when forced or when the process's mappings crowd its limit,
    so that the compiled graphs of engines nobody holds any more unmap. Says whether it ran.

    A collection costs 0.1-0.2 s in a server and seconds in a process holding millions of objects
    (a test suite), so after one that leaves the mappings crowded (engines still in use hold them)
    the next waits until another _REGROWTH_SHARE of the limit has been mapped."""
    global _crowded_after_collection
    count = mapping_count()
    if not force:
        if count is None:
            return False
        limit = mapping_limit()
        if count < max(_CROWDED_SHARE * limit, _crowded_after_collection + _REGROWTH_SHARE * limit):
            return False
    gc.collect()
    host_heap.give_back_free_memory()  # the dropped engines' buffers, which the heap would keep
    after = mapping_count()
    _crowded_after_collection = after or 0
    if count is not None:
        logger.debug("garbage collected: %d -> %s memory mappings", count, after)
    return True
