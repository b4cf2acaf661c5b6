"""Pluggable sampling: the registry of samplers a request can name (`SamplingParams(sampler=...)`).

A sampler is a pure JAX function over the batch,
``fn(logits [B, V] f32, params: SamplingTensors, state [B, SAMPLER_STATE_WIDTH] f32, keys [B])
-> tokens [B] | (tokens [B], new_state)``: logits after penalties and banned ids, each row's
parameters, its state after its previous token, and its PRNG key, fold_in(key(seed), step)
(`uniforms(keys)` is the draw the built-ins use). It runs for the whole batch, only on steps
where some row names it, and only those rows take its answer; it must treat rows
independently so that a seeded request gives the same tokens in any batch.

On XLA:CPU, read `lax.top_k` results with gathers (`jnp.take_along_axis`), never static slices
(`[:, 1]`): a slice makes XLA sort the whole row instead (~0.5 s at B=64, V=49152, not ~3 ms).

Registering bumps the registry's version: a runner compiles the new samplers into a sampler
graph on the first step that needs them (once per batch size), while steps in which every row
uses the default sampler keep their warm-up graphs.

    import jax, jax.numpy as jnp
    from jaxserve import sampling

    def second_best(logits, params, state, keys):
        ids = jax.lax.top_k(logits, 2)[1]  # [B, 2]
        return jnp.take_along_axis(ids, jnp.ones_like(ids[:, :1]), -1)[:, 0]

    sampling.register("second_best", second_best)
    llm.generate(prompts, SamplingParams(sampler="second_best"))
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Callable

import jax
import numpy as np

from jaxserve import ollama_samplers
from jaxserve.sampler import (DEFAULT_SAMPLER, SAMPLER_STATE_WIDTH, SamplingTensors, build_sampling_tensors,
                              default_sampler, row_keys, uniforms)

__all__ = ["Sampler", "Snapshot", "SamplingTensors", "SAMPLER_STATE_WIDTH", "register", "unregister", "get",
           "names", "snapshot", "row_keys", "uniforms"]


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: a jit static argument
class Sampler:
    name: str
    fn: Callable
    state_size: int = 0  # leading floats of the row state it uses
    init_state: Callable | None = None  # SamplingParams -> the state before the first token
    builtin: bool = False


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The registry at one version: `samplers[0]` is the default, a row's sampler id is its index."""
    version: int
    samplers: tuple[Sampler, ...]

    @property
    def pluggable(self) -> tuple[Sampler, ...]:
        return self.samplers[1:]


_lock = threading.Lock()  # the engine thread snapshots while a notebook or server thread registers
_samplers: dict[str, Sampler] = {}
_current = Snapshot(0, ())


def register(name: str, fn: Callable, *, state_size: int = 0,
             init_state: Callable | None = None) -> Sampler:
    """Add (or, for a user sampler, replace) the sampler `name`. `state_size` floats of per-row
    state (at most SAMPLER_STATE_WIDTH) start as `init_state(params)` (zeros if None).

    The function is traced once on a tiny batch here, so a wrong signature fails now rather
    than in the middle of serving.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"sampler {name!r}: fn must be callable, got {type(fn).__name__}")
    if not 0 <= state_size <= SAMPLER_STATE_WIDTH:
        raise ValueError(f"sampler {name!r}: state_size must be in [0, {SAMPLER_STATE_WIDTH}], got {state_size}")
    existing = _samplers.get(name)
    if existing is not None and existing.builtin:
        raise ValueError(f"sampler {name!r} is built in and cannot be replaced")
    _check_signature(name, fn)
    return _add(Sampler(name, fn, state_size, init_state))


def unregister(name: str) -> None:
    """Remove a user sampler (no running request may still name it)."""
    with _lock:
        sampler = _samplers.get(name)
        if sampler is None:
            raise ValueError(f"sampler {name!r} is not registered (registered: {list(_samplers)})")
        if sampler.builtin:
            raise ValueError(f"sampler {name!r} is built in and cannot be removed")
        del _samplers[name]
        _publish()


def get(name: str) -> Sampler:
    return _samplers[name]


def names() -> list[str]:
    return list(_samplers)


def snapshot() -> Snapshot:
    """The current registry, immutable: what one step packs its rows and compiles against."""
    return _current


def _add(sampler: Sampler) -> Sampler:
    with _lock:
        _samplers[sampler.name] = sampler
        _publish()
    return sampler


def _publish() -> None:
    global _current
    ordered = [_samplers[DEFAULT_SAMPLER]] + [s for n, s in _samplers.items() if n != DEFAULT_SAMPLER]
    _current = Snapshot(_current.version + 1, tuple(ordered))


def _check_signature(name: str, fn: Callable) -> None:
    from jaxserve.sampler import _call_sampler

    B, V = 2, 8
    t = build_sampling_tensors([], B, history_width=1, banned_width=1)
    state = np.zeros((B, SAMPLER_STATE_WIDTH), np.float32)
    try:
        tokens, new_state = jax.eval_shape(functools.partial(_call_sampler, fn), np.zeros((B, V), np.float32),
                                           t, state, row_keys(t.seeds, t.steps))
    except Exception as err:
        raise ValueError(f"sampler {name!r} failed on a [{B}, {V}] batch: {type(err).__name__}: {err}") from err
    if tokens.shape != (B,) or new_state.shape != (B, SAMPLER_STATE_WIDTH):
        raise ValueError(f"sampler {name!r} must return tokens [B] (and state [B, {SAMPLER_STATE_WIDTH}]); "
                         f"on a batch of {B} it returned {tokens.shape} and {new_state.shape}")


def _register_builtin(name: str, fn: Callable, state_size: int = 0, init_state: Callable | None = None) -> None:
    _add(Sampler(name, fn, state_size, init_state, builtin=True))


_register_builtin(DEFAULT_SAMPLER, default_sampler)
_register_builtin("typical", ollama_samplers.typical)
_register_builtin("tfs", ollama_samplers.tail_free)
_register_builtin("mirostat", ollama_samplers.mirostat, 1, ollama_samplers.mirostat_init_state)
_register_builtin("mirostat2", ollama_samplers.mirostat2, 1, ollama_samplers.mirostat_init_state)
