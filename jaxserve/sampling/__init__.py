"""Sampling: the registry of samplers a request can name, the core sampler, and the built-ins.

- `registry.py` (no JAX): which samplers exist, `register` / `unregister` / `names` / `snapshot`.
- `core.py` (JAX): `SamplingTensors` packed from the step's rows, penalties, the default path
  (temperature, top-k / top-p / min-p, one draw) and the public primitives samplers build on.
- `builtins.py` (JAX): Ollama's typical, tail-free and Mirostat 1/2 samplers.

`SamplingParams` (`jaxserve/sampling_params.py`) is plain data and checks sampler names against
the registry without importing JAX; importing this package does not import JAX either, until one
of core's names below is asked for.

A sampler is a pure JAX function over the batch,
``fn(logits [B, V] f32, params: SamplingTensors, state [B, SAMPLER_STATE_WIDTH] f32, keys [B])
-> tokens [B] | (tokens [B], new_state)``: logits after penalties and banned ids, each row's
parameters (its own in ``params.sampler_params``, as its ``params`` callable packed them), its
state after its previous token, and its PRNG key, fold_in(key(seed), step) (`uniforms(keys)` is
the draw the built-ins use). It runs for the whole batch, only on steps where some row names it,
and only those rows take its answer; it must treat rows independently so that a seeded request
gives the same tokens in any batch.

On XLA:CPU, read `lax.top_k` results with gathers (`jnp.take_along_axis`), never static slices
(`[:, 1]`): a slice makes XLA sort the whole row instead (~0.5 s at B=64, V=49152, not ~3 ms).

    import jax, jax.numpy as jnp
    from jaxserve import sampling

    def second_best(logits, params, state, keys):
        ids = jax.lax.top_k(logits, 2)[1]  # [B, 2]
        return jnp.take_along_axis(ids, jnp.ones_like(ids[:, :1]), -1)[:, 0]

    sampling.register("second_best", second_best)
    llm.generate(prompts, SamplingParams(sampler="second_best"))
"""
from __future__ import annotations

from jaxserve.sampling.registry import (BUILTIN_NAMES, DEFAULT_SAMPLER, SAMPLER_PARAMS_WIDTH, SAMPLER_STATE_WIDTH,
                                        Sampler, Snapshot, get, names, register, snapshot, unregister)

# core's names, imported (with JAX) on first use.
_CORE = ("SamplingTensors", "SamplingRow", "row_keys", "uniforms", "argmax", "inverse_cdf", "top_k_top_p_cutoff",
         "ordered_key", "from_ordered_key", "bisect")

__all__ = ["BUILTIN_NAMES", "DEFAULT_SAMPLER", "SAMPLER_PARAMS_WIDTH", "SAMPLER_STATE_WIDTH", "Sampler", "Snapshot",
           "get", "names", "register", "snapshot", "unregister", *_CORE]


def __getattr__(name):
    if name in _CORE:
        from jaxserve.sampling import core
        return getattr(core, name)
    raise AttributeError(f"module 'jaxserve.sampling' has no attribute {name!r}")
