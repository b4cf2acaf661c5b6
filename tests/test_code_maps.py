"""A dropped engine's compiled graphs leave the process's memory mappings (Linux caps them at
vm.max_map_count; past it the next executable's load crashes): the full garbage collection that
frees them runs when the mappings crowd the cap, before an engine compiles."""
from __future__ import annotations

import gc
import weakref

from jaxserve import LLM, code_maps

TINY = dict(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16)


def test_a_dropped_engine_unmaps_its_graphs_only_at_a_full_collection(tiny_checkpoint):
    folder, _ = tiny_checkpoint("llama")
    gc.collect()
    before = code_maps.mapping_count()
    gc.disable()
    try:
        llm = LLM(folder, **TINY)
        loaded = code_maps.mapping_count()
        runner = weakref.ref(llm.engine.runner)
        del llm
        assert code_maps.mapping_count() >= loaded - 50  # JAX's executables are in cycles: still mapped
        assert code_maps.release_dropped_graphs(force=True)
        assert runner() is None
        assert code_maps.mapping_count() < before + 0.2 * (loaded - before), (before, loaded)
    finally:
        gc.enable()


def test_an_engine_collects_the_dropped_ones_first_when_the_mappings_crowd_the_cap(tiny_checkpoint, monkeypatch):
    folder, _ = tiny_checkpoint("llama")
    gc.disable()
    try:
        first = LLM(folder, **TINY)
        runner = weakref.ref(first.engine.runner)
        del first
        monkeypatch.setattr(code_maps, "_crowded_after_collection", 0)  # no earlier collection counts
        monkeypatch.setattr(code_maps, "mapping_limit", lambda: 2 * code_maps.mapping_count())  # 50% > 40%
        assert runner() is not None  # nothing has collected it yet
        second = LLM(folder, **TINY)  # its warm-up collects before mapping its own code
        assert runner() is None
        monkeypatch.setattr(code_maps, "mapping_limit", lambda: 10 * code_maps.mapping_count())
        first_again = weakref.ref(second.engine.runner)
        del second
        assert not code_maps.release_dropped_graphs()  # far from the cap: no collection
        assert first_again() is not None
    finally:
        gc.enable()
        gc.collect()


def test_after_a_collection_that_left_the_mappings_crowded_the_next_waits_for_them_to_grow(monkeypatch):
    """Engines in use keep their mappings through a collection; collecting again at every check
    would cost seconds each in a big process, so the next waits for a tenth of the limit more."""
    mapped, collections = [0], []
    monkeypatch.setattr(code_maps, "mapping_limit", lambda: 1000)
    monkeypatch.setattr(code_maps, "mapping_count", lambda: mapped[0])
    monkeypatch.setattr(code_maps, "_crowded_after_collection", 0)
    monkeypatch.setattr(code_maps.gc, "collect", lambda: collections.append(mapped[0]))
    for mapped[0] in (399, 500, 550, 599, 600, 650, 300, 450, 701):
        code_maps.release_dropped_graphs()
    assert collections == [500, 600, 701]  # 40% of the limit, then 100 more than the last one left
    assert code_maps.release_dropped_graphs(force=True) and collections[-1] == 701
