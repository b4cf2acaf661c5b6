"""The registry of samplers a request can name (`SamplingParams(sampler=...)`), free of JAX.

Names are known without importing JAX, so that `SamplingParams` (plain data) can check them; the
built-ins' functions (`builtins.py`, JAX) are imported the first time someone asks for the
samplers themselves (`snapshot`, `get`), which is a runner compiling a step. Registering a user
sampler traces it once on a tiny batch, so that needs JAX, and imports it then.

A `Sampler` carries its own parameters: `params(SamplingParams)` gives the floats it reads, packed
into its rows of `SamplingTensors.sampler_params` (`neutral` fills the other rows, which it also
runs over but whose answers are thrown away), and `init_state(SamplingParams)` its row state
before the first token.

Registering bumps the registry's version: a runner compiles the new samplers into a sampler
graph on the first step that needs them (once per batch size), while steps in which every row
uses the default sampler keep their warm-up graphs.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

DEFAULT_SAMPLER = "default"
# Floats of per-row state a pluggable sampler may keep between steps (mirostat uses one: mu), and
# of its own parameters. Fixed, so that registering a sampler never changes a step's input shapes.
SAMPLER_STATE_WIDTH = 4
SAMPLER_PARAMS_WIDTH = 4


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: a jit static argument
class Sampler:
    name: str
    fn: Callable
    state_size: int = 0  # leading floats of the row state it uses
    init_state: Callable | None = None  # SamplingParams -> the state before the first token
    params: Callable | None = None  # SamplingParams -> its parameters (at most SAMPLER_PARAMS_WIDTH floats)
    neutral: tuple[float, ...] = ()  # its parameters in the rows of other samplers (zeros beyond)
    builtin: bool = False


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The registry at one version: `samplers[0]` is the default, a row's sampler id is its index."""
    version: int
    samplers: tuple[Sampler, ...]

    @property
    def pluggable(self) -> tuple[Sampler, ...]:
        return self.samplers[1:]


# The built-ins, by name, in registry order; their Sampler objects come from builtins.py.
BUILTIN_NAMES = (DEFAULT_SAMPLER, "typical", "tfs", "mirostat", "mirostat2")

_lock = threading.Lock()  # the engine thread snapshots while a notebook or server thread registers
_user: dict[str, Sampler] = {}
_builtins: dict[str, Sampler] | None = None
_current: Snapshot | None = None
_version = 0


def register(name: str, fn: Callable, *, state_size: int = 0, init_state: Callable | None = None,
             params: Callable | None = None, neutral: Sequence[float] = ()) -> Sampler:
    """Add (or, for a user sampler, replace) the sampler `name`. `state_size` floats of per-row
    state (at most SAMPLER_STATE_WIDTH) start as `init_state(params)` (zeros if None); `params`
    maps a request's SamplingParams to the floats it reads from `t.sampler_params[:, :k]`.

    The function is traced once on a tiny batch here, so a wrong signature fails now rather
    than in the middle of serving.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"sampler name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"sampler {name!r}: fn must be callable, got {type(fn).__name__}")
    if not 0 <= state_size <= SAMPLER_STATE_WIDTH:
        raise ValueError(f"sampler {name!r}: state_size must be in [0, {SAMPLER_STATE_WIDTH}], got {state_size}")
    if params is not None and not callable(params):
        raise ValueError(f"sampler {name!r}: params must be callable (SamplingParams -> floats), "
                         f"got {type(params).__name__}")
    if len(neutral) > SAMPLER_PARAMS_WIDTH:
        raise ValueError(f"sampler {name!r}: at most {SAMPLER_PARAMS_WIDTH} neutral parameters, got {len(neutral)}")
    if name in BUILTIN_NAMES:
        raise ValueError(f"sampler {name!r} is built in and cannot be replaced")
    from jaxserve.sampling.core import check_sampler  # JAX: a user sampler is traced once here

    check_sampler(name, fn)
    sampler = Sampler(name, fn, state_size, init_state, params, tuple(float(v) for v in neutral))
    with _lock:
        _user[name] = sampler
        _publish()
    return sampler


def unregister(name: str) -> None:
    """Remove a user sampler (no running request may still name it)."""
    with _lock:
        if name in BUILTIN_NAMES:
            raise ValueError(f"sampler {name!r} is built in and cannot be removed")
        if name not in _user:
            raise ValueError(f"sampler {name!r} is not registered (registered: {names()})")
        del _user[name]
        _publish()


def names() -> list[str]:
    """Every registered sampler's name, the built-ins first (no JAX import)."""
    return list(BUILTIN_NAMES) + [n for n in _user if n not in BUILTIN_NAMES]


def get(name: str) -> Sampler:
    return {s.name: s for s in snapshot().samplers}[name]


def snapshot() -> Snapshot:
    """The current registry, immutable: what one step packs its rows and compiles against."""
    with _lock:
        if _current is None:
            _publish()
        return _current


def _publish() -> None:
    """A new Snapshot of the built-ins and user samplers (the caller holds _lock)."""
    global _builtins, _current, _version
    if _builtins is None:
        from jaxserve.sampling.builtins import BUILTINS  # JAX: the first step that needs the samplers

        _builtins = {s.name: s for s in BUILTINS}
        assert tuple(_builtins) == BUILTIN_NAMES, "builtins.BUILTINS must follow BUILTIN_NAMES"
    _version += 1
    _current = Snapshot(_version, tuple(_builtins.values()) + tuple(_user.values()))
