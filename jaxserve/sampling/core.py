"""The on-device sampler: logits of one step -> next tokens and their logprobs, for every row.

Vectorised over the batch with per-row parameters, so requests with different sampling settings
share one compiled graph; traceable with no host sync. Order as in vLLM: penalties, banned ids
(`penalise`), then temperature, top-k / top-p / min-p and one draw (`sample_penalised`); the
engine compiles the two stages as graphs of their own and runs the first only on steps where
some row has a penalty. Rows may instead name a pluggable sampler (`registry.py`): the second
stage then also runs each such sampler on the penalised logits, only when some row uses it, and
takes its tokens there. The public primitives here (`argmax`, `inverse_cdf`, `top_k_top_p_cutoff`,
`ordered_key` / `from_ordered_key`, `bisect`, `uniforms`) are what the built-in samplers build on.

Cost notes (2-core CPU, B=64, V=49152): a full `lax.sort` of the logits takes ~0.9 s, so top-k
(with top-p on its top-k set) reads one `lax.top_k` prefix instead (NARROW_TOP_K values where
every row's top_k fits, else TOP_K_CAP), and falls back to an exact bisection over the whole
row only for the rows the prefix cannot settle.
Top-p alone needs no threshold at all: a row draws, and draws again above its token while that
token lies outside the nucleus (`_draw_in_nuclei`). Sampling draws one uniform per row and
inverts the CDF (two-level, by chunks) instead of drawing V Gumbel values.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxserve.sampling.registry import DEFAULT_SAMPLER, SAMPLER_PARAMS_WIDTH, SAMPLER_STATE_WIDTH, Sampler
from jaxserve.sampling_params import MAX_LOGPROBS, SamplingParams

_INT32_MAX = np.iinfo(np.int32).max
# Width of the sorted prefix that top-k rows read (lax.top_k: ~18 ms at B=64, V=49152). Rows
# whose top_k exceeds it, or whose top-p within the top-k set is wider, take the bisection
# fallback: exact, but ~30 passes over their row (~0.8 ms a row). So does `filtered_weights`
# for top-p alone, which speculative verification reads whole.
TOP_K_CAP = 256
# Top-k rows whose top_k is at most this read a prefix this wide (lax.top_k: 24 against 44 ms
# for TOP_K_CAP at B=256, V=49152); Ollama's default top_k is 40.
NARROW_TOP_K = 64
# Chunk width of the inverse-CDF search: one pass finds the chunk, one small cumsum the token.
_CHUNK = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    """Per-row sampling parameters of one step, one row per sequence slot (B = batch bucket).

    Padding rows are greedy with no penalties, so they cost nothing and change nothing.
    """

    temperature: jax.Array         # [B] f32, 0 = greedy (argmax of the penalised logits)
    top_p: jax.Array               # [B] f32, 1 = off
    top_k: jax.Array               # [B] i32, 0 = off
    min_p: jax.Array               # [B] f32, 0 = off
    presence_penalty: jax.Array    # [B] f32, 0 = off
    frequency_penalty: jax.Array   # [B] f32, 0 = off
    repetition_penalty: jax.Array  # [B] f32, 1 = off
    seeds: jax.Array               # [B] uint32, the request's seed
    steps: jax.Array               # [B] i32, output tokens so far; row key = fold_in(key(seed), step)
    token_history: jax.Array       # [B, W_h] i32, prompt then output ids, -1 padded (rows without penalties: all -1)
    prompt_lens: jax.Array         # [B] i32, history entries at index >= prompt_len are output tokens
    banned_token_ids: jax.Array    # [B, E] i32, ids forced to -inf this step (min_tokens), -1 padded
    # Pluggable samplers (read only when some row names one; 0 = the default path).
    sampler_ids: jax.Array         # [B] i32, index of the row's sampler in the registry snapshot
    # [B, SAMPLER_PARAMS_WIDTH] f32, the row's sampler's own parameters (Sampler.params); each
    # sampler sees its `neutral` values in the rows of the others.
    sampler_params: jax.Array
    sampler_state: jax.Array       # [B, SAMPLER_STATE_WIDTH] f32, the row's state after its last token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerOutput:
    """What the sampler returns for each row (padding rows included; the host ignores them)."""

    tokens: jax.Array        # [B] i32, the chosen token
    logprobs: jax.Array      # [B] f32, its log-prob under the raw (unprocessed) model distribution
    top_ids: jax.Array       # [B, num_top_logprobs] i32, most likely raw tokens, best first
    top_logprobs: jax.Array  # [B, num_top_logprobs] f32, their raw log-probs
    sampler_state: jax.Array  # [B, SAMPLER_STATE_WIDTH] f32, each row's state after this token


@dataclasses.dataclass(slots=True)
class SamplingRow:
    """One running sequence as the sampler needs to see it this step (host side)."""

    params: SamplingParams
    seed: int                   # the request's seed (the engine draws one when params.seed is None)
    step: int                   # number of output tokens generated so far
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    banned_ids: Sequence[int]   # ids to forbid this step (EOS + stop_token_ids while under min_tokens)
    sampler_state: Sequence[float] | None = None  # the pluggable sampler's state; None before the first token
    # row_values(params) and params.selected_sampler, when the caller keeps them per request
    # (they cost a few attribute reads each, every step, for every row).
    values: tuple | None = None
    sampler: str | None = None
    device_seed: int = dataclasses.field(init=False, default=0)  # fold_seed(seed), packed every step

    def __post_init__(self):
        self.device_seed = fold_seed(self.seed)


# A padding row's temperature, top_p, top_k, min_p, presence, frequency and repetition penalty
# (row_values' order): greedy, nothing filtered, no penalty.
_PADDING = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
_NO_PENALTY = _PADDING[4:]


def row_values(p: SamplingParams) -> tuple:
    """A row's temperature, top_p, top_k, min_p and penalties as the device reads them. Greedy rows
    keep the padding values of the filters (no filtering, so they never trigger the sort); any
    k >= V is off on the device, so top_k is clipped to int32; penalties need repeat_last_n != 0."""
    filters = _PADDING[:4] if p.greedy else (p.temperature, p.top_p, min(max(p.top_k, 0), _INT32_MAX), p.min_p)
    penalised = (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0) and p.repeat_last_n
    return filters + ((p.presence_penalty, p.frequency_penalty, p.repetition_penalty) if penalised else _NO_PENALTY)


def fold_seed(seed: int) -> int:
    """A seed as the device keeps it (uint32): 64 bits xor-folded, so large seeds stay distinct."""
    s = seed & 0xFFFF_FFFF_FFFF_FFFF
    return (s ^ (s >> 32)) & 0xFFFF_FFFF


class PackedValues:
    """The last step's rows and what of them never changes, packed: their [B, 7] filter and
    penalty values (row_values), seeds and prompt lengths, and what follows from those alone (the
    device's typed columns, the rows with a penalty, whether any row names a pluggable sampler).
    A step with the very same row objects, as most decode steps are, reuses them (a row's request
    has fixed parameters and prompt), so its packing reads only the step counts; numpy reading 256
    tuples was most of the work."""

    _COLUMN_TYPES = (("temperature", np.float32), ("top_p", np.float32), ("top_k", np.int32),
                     ("min_p", np.float32), ("presence_penalty", np.float32),
                     ("frequency_penalty", np.float32), ("repetition_penalty", np.float32))

    def __init__(self):
        self.rows: list[SamplingRow] = []
        self.arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.columns: dict[str, np.ndarray] = {}  # SamplingTensors' value fields, typed
        self.penalised: np.ndarray = np.zeros(0, np.intp)  # rows with a penalty
        self.pluggable = False  # some row names a sampler other than the default

    def pack(self, rows: list[SamplingRow], B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values [B, 7] float64, seeds [B] uint32, prompt_lens [B] int32), read-only; the
        derived fields follow them."""
        if (self.arrays is not None and len(self.arrays[0]) == B and len(rows) == len(self.rows)
                and all(map(operator.is_, rows, self.rows))):
            return self.arrays
        n = len(rows)
        values = np.tile(np.asarray(_PADDING), (B, 1))
        if n:  # numpy reads a flat iterator about twice as fast as a list of tuples
            values[:n] = np.fromiter(itertools.chain.from_iterable(
                [row.values if row.values is not None else row_values(row.params) for row in rows]),
                np.float64, n * len(_PADDING)).reshape(n, len(_PADDING))
        seeds = np.zeros(B, np.uint32)
        seeds[:n] = [row.device_seed for row in rows]
        prompt_lens = np.zeros(B, np.int32)
        prompt_lens[:n] = [len(row.prompt_ids) for row in rows]
        self.columns = {name: column.astype(dtype) for (name, dtype), column in zip(self._COLUMN_TYPES, values.T)}
        self.penalised = np.flatnonzero(np.any(values[:n, 4:] != _NO_PENALTY, axis=1))
        self.pluggable = any([(row.sampler if row.sampler is not None else row.params.selected_sampler)
                              != DEFAULT_SAMPLER for row in rows])
        for array in (values, seeds, prompt_lens, *self.columns.values()):
            array.flags.writeable = False  # shared with the next step's tensors
        self.rows, self.arrays = list(rows), (values, seeds, prompt_lens)
        return self.arrays


def build_sampling_tensors(rows: list[SamplingRow], batch_size: int, history_width: int,
                           banned_width: int = 16, samplers: Sequence | None = None,
                           packed: PackedValues | None = None) -> SamplingTensors:
    """Pack the rows of one step into numpy arrays padded to `batch_size` rows.

    Column by column, not row by row: a step of 256 rows costs tens of microseconds, not
    milliseconds. Only rows with a penalty, a banned id or a pluggable sampler take a Python
    pass of their own. Token history is only written for rows with a penalty (its only readers),
    and is [B, history_width] only when the penalties stage runs (some row has a penalty or a
    banned id), else [B, 1]: nothing reads it then, and the whole context's width would be
    megabytes to fill and send every step. `samplers` is the
    registry snapshot the step compiles (`jaxserve.sampling.snapshot().samplers`, default first);
    only needed when a row names a sampler other than the default. `packed`: the caller's
    PackedValues, kept from step to step (the runner's).
    """
    n, B = len(rows), batch_size
    if n > B:
        raise ValueError(f"{n} rows do not fit in a batch of {B}")
    packed = packed or PackedValues()
    _, seeds, prompt_lens = packed.pack(rows, B)
    steps = np.zeros(B, np.int32)
    steps[:n] = [row.step for row in rows]
    banned = np.full((B, banned_width), -1, np.int32)
    bans = False
    for i in _nonzero([len(row.banned_ids) for row in rows]):
        row = rows[i]
        if len(row.banned_ids) > banned_width:
            raise ValueError(f"row {i} bans {len(row.banned_ids)} token ids, more than the "
                             f"banned width {banned_width}")
        banned[i, :len(row.banned_ids)] = row.banned_ids
        bans = True
    # Full width whenever the penalties graph runs (needs_penalties), so it has one input shape.
    penalised = packed.penalised
    history = np.full((B, history_width if len(penalised) or bans else 1), -1, np.int32)
    if len(penalised):
        prompt_lens = prompt_lens.copy()  # the packed one is shared
    for i in penalised:
        prompt_lens[i] = _write_history(history, i, rows[i])
    pluggable = _pack_pluggable_samplers(rows, B, samplers) if packed.pluggable else _no_pluggable_samplers(B)
    return SamplingTensors(**packed.columns, seeds=seeds, steps=steps, token_history=history,
                           prompt_lens=prompt_lens, banned_token_ids=banned, **pluggable)


@functools.lru_cache(maxsize=8)
def _no_pluggable_samplers(B: int) -> dict[str, np.ndarray]:
    """_pack_pluggable_samplers of B rows that all take the default path: zeros, read-only
    (shared by every such step of that batch size)."""
    arrays = dict(sampler_ids=np.zeros(B, np.int32), sampler_params=np.zeros((B, SAMPLER_PARAMS_WIDTH), np.float32),
                  sampler_state=np.zeros((B, SAMPLER_STATE_WIDTH), np.float32))
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def _nonzero(counts: list[int]) -> Sequence[int]:
    """Indices of the non-zero counts: none without a pass in Python when all are zero."""
    return [i for i, c in enumerate(counts) if c] if any(counts) else ()


def _write_history(history: np.ndarray, i: int, row: SamplingRow) -> int:
    """Row i's prompt then output ids (the last repeat_last_n of them where set) -> its prompt length."""
    p, prompt_ids, output_ids = row.params, row.prompt_ids, row.output_ids
    if p.repeat_last_n > 0:  # only the latest tokens: the window is a host-side slice
        num_out = min(len(output_ids), p.repeat_last_n)
        num_prompt = min(len(prompt_ids), p.repeat_last_n - num_out)
        output_ids = output_ids[len(output_ids) - num_out:]
        prompt_ids = prompt_ids[len(prompt_ids) - num_prompt:]
    num_prompt, num_out = len(prompt_ids), len(output_ids)
    if num_prompt + num_out > history.shape[1]:
        raise ValueError(f"row {i} has {num_prompt + num_out} tokens, more than the "
                         f"history width {history.shape[1]}")
    history[i, :num_prompt] = prompt_ids
    history[i, num_prompt:num_prompt + num_out] = output_ids
    return num_prompt


def _pack_pluggable_samplers(rows: list[SamplingRow], B: int, samplers: Sequence | None) -> dict[str, np.ndarray]:
    """The pluggable samplers' fields of SamplingTensors: registry index, their own parameters, state."""
    sampler_ids = np.zeros(B, np.int32)
    params = np.zeros((B, SAMPLER_PARAMS_WIDTH), np.float32)
    state = np.zeros((B, SAMPLER_STATE_WIDTH), np.float32)
    index = {s.name: i for i, s in enumerate(samplers or ())}
    names = [row.sampler if row.sampler is not None else row.params.selected_sampler for row in rows]
    for i in _nonzero([name != DEFAULT_SAMPLER for name in names]):
        name, row = names[i], rows[i]
        if name not in index:
            raise ValueError(f"sampler {name!r} is not registered (registered: {sorted(index)})")
        p, sampler = row.params, samplers[index[name]]
        sampler_ids[i] = index[name]
        if sampler.params is not None:
            values = tuple(sampler.params(p))
            if len(values) > SAMPLER_PARAMS_WIDTH:
                raise ValueError(f"sampler {name!r} gave {len(values)} parameters, more than "
                                 f"SAMPLER_PARAMS_WIDTH ({SAMPLER_PARAMS_WIDTH})")
            params[i, :len(values)] = values
        row_state = row.sampler_state
        if row_state is None and sampler.init_state is not None:
            row_state = sampler.init_state(p)
        if row_state is not None:
            state[i, :len(row_state)] = row_state
    return dict(sampler_ids=sampler_ids, sampler_params=params, sampler_state=state)


# ----------------------------------------------------------------------------------------------
# Device side. Every function below is per-row: a row's result depends only on its own logits,
# parameters and key, never on the other rows, so a seeded request reproduces in any batch.


def sample(logits: jax.Array, t: SamplingTensors, *, num_top_logprobs: int = MAX_LOGPROBS,
           samplers: tuple = ()) -> SamplerOutput:
    """Choose one token per row from `logits` [B, V]; see the module docstring for the order.

    The whole pipeline in one call: `penalise`, then `sample_penalised`. The engine runs the two
    as separate graphs and skips the first on steps where `needs_penalties` says no row asks.
    """
    return sample_penalised(logits, penalise(logits, t), t, num_top_logprobs=num_top_logprobs,
                            samplers=samplers)


def needs_penalties(t: SamplingTensors) -> bool:
    """Host side (numpy tensors): does any row of the step have a penalty or a banned id?"""
    return bool(np.any(np.asarray(t.repetition_penalty) != 1.0) or np.any(np.asarray(t.frequency_penalty) != 0.0)
                or np.any(np.asarray(t.presence_penalty) != 0.0) or np.any(np.asarray(t.banned_token_ids) >= 0))


def penalise(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """[B, V] logits with the repetition, frequency and presence penalties and the banned ids
    applied; rows with none come out bit-identical."""
    return _ban(_apply_penalties(logits.astype(jnp.float32), t), t.banned_token_ids)


def apply_token_bitmask(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """[B, V] logits with the tokens a packed bitmask [B, ceil(V / 32)] int32 does not allow set to
    -inf (bit i of word w allows token 32 w + i; structured output's grammars fill it)."""
    B, V = logits.shape
    bits = jnp.right_shift(allowed[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1  # [B, W, 32]
    return jnp.where(bits.reshape(B, -1)[:, :V] != 0, logits, -jnp.inf)


def sample_penalised(raw: jax.Array, penalised: jax.Array, t: SamplingTensors, *,
                     num_top_logprobs: int = MAX_LOGPROBS, samplers: tuple = (),
                     allowed: jax.Array | None = None) -> SamplerOutput:
    """Tokens chosen from the `penalised` logits [B, V] (or `raw` itself, where no row has a
    penalty), their logprobs from the `raw` ones.

    `num_top_logprobs` is static (a different value compiles a different graph); pass 0 when
    no request in the step asked for top logprobs, it saves a top-k over the vocabulary.
    `samplers` (static) are the pluggable samplers rows may name, `t.sampler_ids` 1, 2, ...;
    with none, this is the default path alone and the sampler ids and state are passed through.
    `allowed` ([B, ceil(V / 32)] int32, or None) is a step's structured-output bitmask.
    """
    raw = raw.astype(jnp.float32)  # [B, V]
    x = penalised.astype(jnp.float32)
    if allowed is not None:  # structured output: before any other filter, every sampler sees it
        x = apply_token_bitmask(x, allowed)
    default_t = t
    if samplers:
        # Rows of other samplers look greedy to the default path: it never filters or draws for them.
        default_t = dataclasses.replace(t, temperature=jnp.where(t.sampler_ids == 0, t.temperature, 0.0))
    greedy = default_t.temperature <= 0.0
    # No sort or RNG when all rows are greedy. Only [B] tokens leave the branch: on XLA:CPU a cond
    # that hands [B, V] logits on to the next stage cost 15-25 ms per step at B=64, V=49152.
    tokens = lax.cond(jnp.all(greedy), lambda: argmax(x), lambda: _sample_rows(x, default_t, greedy))
    state = t.sampler_state
    if samplers:
        keys = row_keys(t.seeds, t.steps)
        for index, sampler in enumerate(samplers, start=1):
            uses = t.sampler_ids == index  # [B]
            # Its own parameters in its rows, its neutral ones elsewhere (it runs over every row).
            own = dataclasses.replace(t, sampler_params=jnp.where(uses[:, None], t.sampler_params,
                                                                  neutral_params(sampler)))
            # Skipped entirely unless some row names it; only [B] tokens and [B, S] state leave the branch.
            sampled, new_state = lax.cond(jnp.any(uses), lambda fn=sampler.fn, own=own: call_sampler(fn, x, own, state, keys),
                                          lambda: (tokens, state))
            tokens = jnp.where(uses, sampled, tokens)
            state = jnp.where(uses[:, None], new_state, state)

    # Logprobs of the raw distribution, as vLLM V1 returns by default.
    token_logprobs, top_ids, top_logprobs = compute_logprobs(
        raw, tokens, num_top_logprobs=num_top_logprobs)
    return SamplerOutput(tokens=tokens, logprobs=token_logprobs, top_ids=top_ids,
                         top_logprobs=top_logprobs, sampler_state=state)


def neutral_params(sampler: Sampler) -> np.ndarray:
    """[SAMPLER_PARAMS_WIDTH] f32: the sampler's parameters in rows that do not use it."""
    values = np.zeros(SAMPLER_PARAMS_WIDTH, np.float32)
    values[:len(sampler.neutral)] = sampler.neutral
    return values


def check_sampler(name: str, fn) -> None:
    """Trace a sampler once on a tiny batch: a wrong signature fails at registration, not mid-serving."""
    B, V = 2, 8
    t = build_sampling_tensors([], B, history_width=1, banned_width=1)
    state = np.zeros((B, SAMPLER_STATE_WIDTH), np.float32)
    try:
        tokens, new_state = jax.eval_shape(functools.partial(call_sampler, fn), np.zeros((B, V), np.float32),
                                           t, state, row_keys(t.seeds, t.steps))
    except Exception as err:
        raise ValueError(f"sampler {name!r} failed on a [{B}, {V}] batch: {type(err).__name__}: {err}") from err
    if tokens.shape != (B,) or new_state.shape != (B, SAMPLER_STATE_WIDTH):
        raise ValueError(f"sampler {name!r} must return tokens [B] (and state [B, {SAMPLER_STATE_WIDTH}]); "
                         f"on a batch of {B} it returned {tokens.shape} and {new_state.shape}")


def call_sampler(fn, logits, t, state, keys):
    out = fn(logits, t, state, keys)
    tokens, new_state = out if isinstance(out, tuple) else (out, state)  # stateless samplers may return tokens only
    # A buggy sampler's out-of-range id would reach the detokenizer and stop the engine loop.
    tokens = jnp.clip(jnp.asarray(tokens).astype(jnp.int32), 0, logits.shape[-1] - 1)
    return tokens, jnp.asarray(new_state).astype(jnp.float32)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """[B] PRNG keys, fold_in(key(seed), step): a row's randomness depends on nothing else."""
    return jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(seeds, steps)


def uniforms(keys: jax.Array) -> jax.Array:
    """[B] f32 in [0, 1), the one draw per row every built-in sampler inverts its CDF with."""
    return jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)


def default_sampler(logits: jax.Array, t: SamplingTensors, state: jax.Array, keys: jax.Array):
    """The default path as a pluggable sampler (the step runs it fused instead, see `sample`)."""
    return _sample_rows(logits, t, t.temperature <= 0.0, uniforms(keys)), state


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, *, num_top_logprobs: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probs of `token_ids` [T] under `logits` [T, V], and the `num_top_logprobs` (static)
    most likely ids with theirs: (logprobs [T], top_ids [T, k], top_logprobs [T, k]).

    Also what prompt_logprobs needs (logits of position i scored against token i + 1).
    """
    logits = logits.astype(jnp.float32)
    T, V = logits.shape
    lse = jax.nn.logsumexp(logits, axis=-1)  # [T]; x - lse avoids a [T, V] log_softmax copy
    logprobs = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0] - lse
    k = min(num_top_logprobs, V)
    if k == 0:
        return logprobs, jnp.zeros((T, 0), jnp.int32), jnp.zeros((T, 0), jnp.float32)
    top_vals, top_ids = lax.top_k(logits, k)  # [T, k]
    return logprobs, top_ids.astype(jnp.int32), top_vals - lse[:, None]


def argmax(x: jax.Array) -> jax.Array:
    """First index of the row maximum, by chunks: XLA's CPU argmax over V is ~3x slower."""
    B, V = x.shape
    chunks = _chunked(x, -jnp.inf)  # [B, C, CHUNK]
    j = jnp.argmax(chunks.max(-1), axis=-1)  # [B], first chunk holding the maximum
    within = jnp.take_along_axis(chunks, j[:, None, None], axis=1)[:, 0]  # [B, CHUNK]
    return (j * _CHUNK + jnp.argmax(within, axis=-1)).astype(jnp.int32)


def _chunked(x: jax.Array, fill) -> jax.Array:
    B, V = x.shape
    pad = -V % _CHUNK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return x.reshape(B, -1, _CHUNK)  # [B, C, CHUNK]


def _apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """Repetition (prompt + output), frequency and presence (output only) penalties, as vLLM."""
    B, V = logits.shape
    W = t.token_history.shape[1]
    hist = t.token_history  # [B, W_h]
    valid = (hist >= 0) & (hist < V)
    # Index V is out of bounds and dropped; -1 would wrap to the last token instead.
    ids = jnp.where(valid, hist, V)
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, W))  # [B, W_h]
    is_output = valid & (jnp.arange(W)[None, :] >= t.prompt_lens[:, None])
    output_counts = jnp.zeros((B, V), jnp.float32).at[rows, ids].add(
        is_output.astype(jnp.float32), mode="drop")  # [B, V]
    seen = jnp.zeros((B, V), jnp.bool_).at[rows, ids].set(True, mode="drop")  # [B, V]

    rep = t.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    # Rows without penalties subtract exactly 0, so their logits stay bit-identical.
    logits = logits - t.frequency_penalty[:, None] * output_counts
    return logits - t.presence_penalty[:, None] * (output_counts > 0)


def _ban(logits: jax.Array, banned: jax.Array) -> jax.Array:
    B, V = logits.shape
    ids = jnp.where((banned >= 0) & (banned < V), banned, V)  # [B, E], V = dropped
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return logits.at[rows, ids].set(-jnp.inf, mode="drop")


def _sample_rows(logits: jax.Array, t: SamplingTensors, greedy: jax.Array, u: jax.Array | None = None) -> jax.Array:
    """Temperature, top-k/top-p/min-p filtering and one draw per row; greedy rows take argmax.

    Rows with a top_k get their exact threshold from the sorted prefix (top_p then applies
    within their top-k set). Rows with top_p alone are never given a threshold: they draw from
    their whole (min-p filtered) distribution and keep the token when it lies in the nucleus,
    else draw again above it (`_draw_in_nuclei`). That is exactly the nucleus distribution, and
    it needs neither the prefix's `lax.top_k` (~50 ms at B=256, V=49152 on the 2-core CPU) nor,
    for nuclei wider than the prefix (near-flat logits under top_p 0.9-0.95), the ~30-pass
    bisection (~0.8 ms a row)."""
    V = logits.shape[1]
    keys = row_keys(t.seeds, t.steps)
    u = uniforms(keys) if u is None else u  # [B]
    x, weights, best, row_max, top_k, top_p, floor = _scaled_logits(logits, t, greedy)
    k_rows = top_k > 0
    cutoff = lax.cond(jnp.any(k_rows), _top_k_rows_cutoff, lambda *_: jnp.full(x.shape[:1], -jnp.inf),
                      x, weights, row_max, top_k, jnp.where(k_rows, top_p, 1.0))
    cutoff = jnp.maximum(cutoff, floor)
    drawn = inverse_cdf(jnp.where(x >= cutoff[:, None], weights, 0.0), u)
    nucleus_rows = ~k_rows & (top_p < 1.0)
    # The branch recomputes x and weights from the logits: handed the [B, V] arrays, the cond
    # made XLA materialise both on every step, nucleus rows or not (+15 ms at B=256, V=49152).
    # The bound is bound here, not read inside: lax.cond keeps a module function's trace.
    scale = jnp.where(greedy, 1.0, t.temperature)
    drawn = lax.cond(jnp.any(nucleus_rows), functools.partial(_draw_in_nuclei, max_redraws=_MAX_REDRAWS),
                     lambda *_: drawn, logits, scale, row_max, drawn, nucleus_rows, top_p, floor, keys)
    # The clamp only matters for rows with no finite logit at all (NaN model output).
    return jnp.minimum(jnp.where(greedy, best, drawn), V - 1).astype(jnp.int32)


def _top_k_rows_cutoff(x, weights, row_max, top_k, top_p):
    """`top_k_top_p_cutoff` of the rows with a top_k, the rows whose top_k fits NARROW_TOP_K
    reading only that much of the sorted prefix: a step of only such rows sorts no further. Each
    row reads the same width whatever its companions, so its threshold never depends on them."""
    V = x.shape[1]
    cap, width = min(TOP_K_CAP, V), min(NARROW_TOP_K, V)
    if width >= cap:
        return top_k_top_p_cutoff(x, weights, row_max, top_k, top_p)
    narrow = top_k <= width  # top_k 0: no filter, the same either way

    def narrow_rows(prefix):
        # The other rows pass as unfiltered, so they never take the bisection here.
        return top_k_top_p_cutoff(x, weights, row_max, jnp.where(narrow, top_k, 0), jnp.where(narrow, top_p, 1.0),
                                  prefix=prefix[:, :width])

    def mixed():
        prefix = lax.top_k(x, cap)[0]
        return jnp.where(narrow, narrow_rows(prefix), top_k_top_p_cutoff(x, weights, row_max, top_k, top_p,
                                                                          prefix=prefix))
    return lax.cond(jnp.all(narrow), lambda: narrow_rows(lax.top_k(x, width)[0]), mixed)


def _scaled_logits(logits: jax.Array, t: SamplingTensors, greedy: jax.Array):
    """Temperature-scaled logits x [B, V], their unnormalised probabilities exp(x - max) [B, V],
    the argmax [B] (greedy rows' token), the row maximum, the effective top_k and top_p [B], and
    min-p's threshold [B]; greedy rows get no filter."""
    V = logits.shape[1]
    x = logits / jnp.where(greedy, 1.0, t.temperature)[:, None]  # [B, V]
    top_k = jnp.where(greedy | (t.top_k >= V), 0, t.top_k)
    top_p = jnp.where(greedy, 1.0, t.top_p)
    best = argmax(x)  # [B]; also the greedy rows' answer (their x is the logits)
    row_max = jnp.take_along_axis(x, best[:, None], axis=-1)[:, 0]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row of -inf must not give NaN
    weights = jnp.exp(x - row_max[:, None])  # [B, V], unnormalised probabilities; one exp pass
    # Every filter is a threshold on x: keep x >= cutoff (ties kept, as vLLM's top-k).
    # min_p: p >= min_p * p_max  <=>  x >= max + log(min_p).
    floor = row_max + jnp.log(jnp.where(greedy, 0.0, t.min_p))
    return x, weights, best, row_max, top_k, top_p, floor


def filtered_weights(logits: jax.Array, t: SamplingTensors, greedy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The distribution each row draws from, unnormalised: (weights [B, V], 0 where temperature,
    top-k, top-p or min-p filter a token out; the argmax [B], greedy rows' token). Speculative
    verification (sampling/rejection.py) reads it whole, so here every row gets its exact
    threshold, nuclei wider than the prefix included (the sampler draws those without one)."""
    B, V = logits.shape
    x, weights, best, row_max, top_k, top_p, floor = _scaled_logits(logits, t, greedy)
    cutoff = lax.cond(jnp.any((top_k > 0) | (top_p < 1.0)), top_k_top_p_cutoff,
                      lambda *_: jnp.full((B,), -jnp.inf), x, weights, row_max, top_k, top_p)
    cutoff = jnp.maximum(cutoff, floor)
    return jnp.where(x >= cutoff[:, None], weights, 0.0), best


# Rows whose draw fell outside their nucleus redraw in groups of this many, gathered: a round
# then costs a group's passes over V, not the whole batch's.
_REDRAW_GROUP = 16
# Each redraw keeps its token with probability >= top_p and otherwise shrinks the candidates
# like a quickselect pivot, so real rows settle within a few rounds; past this bound (NaN rows)
# a row takes the exact threshold's draw instead.
_MAX_REDRAWS = 32


def _draw_in_nuclei(logits, scale, row_max, drawn, rows, top_p, floor, keys, *, max_redraws: int):
    """`drawn` [B] with each of `rows`' tokens replaced by one drawn within its nucleus.

    A token lies in the nucleus exactly when the mass strictly above it is < top_p (the
    threshold's ties are kept). A row whose draw lies outside redraws from the tokens above the
    rejected one, a set that still holds the whole nucleus; conditioned on landing in the
    nucleus every draw has the nucleus distribution, so the kept token has it too. The rows
    have no top_k, so the mass is over the whole row. `logits / scale` are the rows' x, as
    `_scaled_logits` made them, and `floor` their min-p threshold.
    """
    x = logits / scale[:, None]
    weights = jnp.exp(x - row_max[:, None])
    B = x.shape[0]
    G = min(_REDRAW_GROUP, B)
    total = jnp.sum(weights, axis=-1)  # [B]
    x_drawn = jnp.take_along_axis(x, drawn[:, None], axis=-1)[:, 0]
    rejected = rows & ~(_mass_above(x, weights, x_drawn) < top_p * total)
    num_rejected = jnp.sum(rejected)
    order = jnp.argsort(~rejected)  # rejected rows first
    order = jnp.concatenate([order, jnp.zeros(-B % G, order.dtype)])

    def group(g, tokens):
        slot = g * G + jnp.arange(G)
        idx = lax.dynamic_slice(order, (g * G,), (G,))
        valid = slot < num_rejected
        new = _redraw(x[idx], weights[idx], row_max[idx], total[idx], x_drawn[idx], tokens[idx], valid,
                      top_p[idx], floor[idx], keys[idx], max_redraws)
        return tokens.at[jnp.where(valid, idx, B)].set(new, mode="drop")
    return lax.fori_loop(0, (num_rejected + G - 1) // G, group, drawn)


def _mass_above(x: jax.Array, weights: jax.Array, value: jax.Array) -> jax.Array:
    """[B] the weight of each row's tokens strictly above `value` [B]."""
    return jnp.sum(jnp.where(x > value[:, None], weights, 0.0), axis=-1)


def _redraw(x, weights, row_max, total, pivot, tokens, valid, top_p, floor, keys, max_redraws):
    """A group's rows [G, V] redrawn above their rejected value `pivot` until each lands in its
    nucleus (invalid rows: padding, left as they are)."""
    def body(carry):
        pivot, tokens, inside, round_ = carry
        u = uniforms(jax.vmap(jax.random.fold_in, (0, None))(keys, round_))
        candidates = (x > pivot[:, None]) & (x >= floor[:, None])
        token = inverse_cdf(jnp.where(candidates, weights, 0.0), u)
        value = jnp.take_along_axis(x, token[:, None], axis=-1)[:, 0]
        now_inside = _mass_above(x, weights, value) < top_p * total
        return (jnp.where(inside, pivot, value), jnp.where(inside, tokens, token), inside | now_inside,
                round_ + 1)

    _, tokens, inside, _ = lax.while_loop(lambda c: ~jnp.all(c[2]) & (c[3] <= max_redraws), body,
                                          (pivot, tokens, ~valid, jnp.int32(1)))

    def exact():
        G = x.shape[0]
        cutoff = jnp.maximum(top_k_top_p_cutoff(x, weights, row_max, jnp.zeros(G, jnp.int32), top_p), floor)
        u = uniforms(jax.vmap(jax.random.fold_in, (0, None))(keys, 0))  # redraws fold in 1, 2, ...
        return jnp.where(inside, tokens, inverse_cdf(jnp.where(x >= cutoff[:, None], weights, 0.0), u))
    return lax.cond(jnp.all(inside), lambda: tokens, exact)


def inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Token whose cumulative weight first exceeds u * total, searched by chunks.

    Filtered tokens (weight 0) can never be chosen: each search step is clamped to the last
    position with positive weight, which absorbs float rounding.
    """
    e = _chunked(weights, 0.0)  # [B, C, CHUNK]
    chunk_mass = e.sum(-1)  # [B, C]
    cum = jnp.cumsum(chunk_mass, axis=-1)  # [B, C]
    target = u * cum[:, -1]
    j = _first_above(cum, target, chunk_mass > 0)
    before = jnp.where(j > 0, jnp.take_along_axis(cum, jnp.maximum(j - 1, 0)[:, None], -1)[:, 0], 0.0)
    within = jnp.take_along_axis(e, j[:, None, None], axis=1)[:, 0]  # [B, CHUNK]
    i = _first_above(jnp.cumsum(within, axis=-1), target - before, within > 0)
    return j * _CHUNK + i


def _first_above(cum: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """Index of the first entry of `cum` [B, N] above `target` [B], clamped to the last positive."""
    n = cum.shape[-1]
    idx = jnp.sum(cum <= target[:, None], axis=-1)
    last_positive = n - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.minimum(idx, last_positive).astype(jnp.int32)


def top_k_top_p_cutoff(x: jax.Array, weights: jax.Array, row_max: jax.Array, top_k: jax.Array,
                        top_p: jax.Array, prefix: jax.Array | None = None) -> jax.Array:
    """Per-row value threshold implementing top-k then top-p (on the top-k renormalised probs).

    `weights` [B, V] = exp(x - row_max), already computed for the draw; `prefix` the caller's
    `lax.top_k(x, min(TOP_K_CAP, V))` values if it has them.
    """
    B, V = x.shape
    cap = min(TOP_K_CAP, V)
    prefix = lax.top_k(x, cap)[0] if prefix is None else prefix  # [B, cap], descending
    lse = row_max + jnp.log(jnp.sum(weights, axis=-1))
    cutoff, kth, k_settled, settled = _cutoff_from_prefix(prefix, lse, top_k, top_p, V)
    if cap == V:
        return cutoff
    # Rows the prefix settled keep its answer in both branches, so a row's tokens never
    # depend on whether a companion row forced the fallback.
    return lax.cond(
        jnp.all(settled), lambda: cutoff,
        lambda: jnp.where(settled, cutoff,
                          _cutoffs_by_bisection(x, prefix, kth, k_settled, top_k, top_p, settled)))


def _cutoff_from_prefix(s, lse, top_k, top_p, V):
    """Thresholds from the descending prefix `s` [B, C]; `settled` says where they are exact."""
    C = s.shape[1]
    k_on = top_k > 0
    kth = jnp.where(k_on, jnp.take_along_axis(s, jnp.clip(top_k - 1, 0, C - 1)[:, None], -1)[:, 0],
                    -jnp.inf)
    k_settled = ~k_on | (top_k <= C)
    in_k = s >= kth[:, None]  # [B, C]
    lse_k = jnp.where(k_on, jax.nn.logsumexp(jnp.where(in_k, s, -jnp.inf), axis=-1), lse)
    probs = jnp.where(in_k, jnp.exp(s - lse_k[:, None]), 0.0)  # [B, C]
    cum = jnp.cumsum(probs, axis=-1)
    before = jnp.concatenate([jnp.zeros((s.shape[0], 1), cum.dtype), cum[:, :-1]], axis=-1)
    # vLLM keeps a token while the mass of the tokens above it is < top_p (the top one always).
    num_kept = jnp.sum(in_k & (before < top_p[:, None]), axis=-1)  # >= 1
    p_on = top_p < 1.0
    pth = jnp.take_along_axis(s, (num_kept - 1)[:, None], -1)[:, 0]
    cutoff = jnp.maximum(kth, jnp.where(p_on, pth, -jnp.inf))
    p_settled = ~p_on | (num_kept < C) | (k_on & k_settled) | (C == V)
    return cutoff, kth, k_settled, k_settled & p_settled


def ordered_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order, so bisection over keys is exact in 32 steps."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x8000_0000))


def from_ordered_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFF_FFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def bisect(pred, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Largest key t in [lo, hi] (per row) with pred(t), for pred monotone non-increasing; lo if none."""
    def body(carry):
        lo, hi = carry
        active = lo < hi
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)  # ceil midpoint without uint32 overflow
        ok = pred(mid)
        return jnp.where(active & ok, mid, lo), jnp.where(active & ~ok, mid - 1, hi)

    lo, _ = lax.while_loop(lambda c: jnp.any(c[0] < c[1]), body, (lo, hi))
    return lo


def _cutoffs_by_bisection(x, prefix, kth, k_settled, top_k, top_p, settled):
    """Exact thresholds over the whole row for the rows the prefix could not settle.

    One row at a time: typically only a few rows (wide nuclei, large top_k) land here, and a
    row's passes over V cost 1/B of a batched pass (~2-4 ms a row on the 2-core CPU for V=49152).
    """
    order = jnp.argsort(settled)  # unsettled rows first
    def one_row(j, cutoffs):
        r = order[j]
        return cutoffs.at[r].set(_row_cutoff(x[r], prefix[r, 0], kth[r], k_settled[r],
                                             top_k[r], top_p[r]))
    return lax.fori_loop(0, jnp.sum(~settled), one_row, jnp.full(x.shape[:1], -jnp.inf))


def _row_cutoff(x, row_max, kth_prefix, k_settled, top_k, top_p):
    """Top-k then top-p threshold of one row x [V], by bisection over the ordered keys."""
    keys = ordered_key(x)  # [V]
    lo, hi = jnp.min(keys), ordered_key(row_max)

    def kth_by_count():
        # The k-th largest value is the largest t with count(x >= t) >= k.
        return from_ordered_key(bisect(lambda m: jnp.sum(keys >= m) >= top_k, lo, hi))

    kth = lax.cond(k_settled, lambda: kth_prefix, kth_by_count)
    kth = jnp.where(top_k > 0, kth, -jnp.inf)

    def pth_by_mass():
        # The nucleus threshold is the largest t whose mass at or above it reaches top_p,
        # with probabilities renormalised over the top-k set.
        in_k = x >= kth
        probs = jnp.where(in_k, jnp.exp(x - jax.nn.logsumexp(jnp.where(in_k, x, -jnp.inf))), 0.0)
        mass_reaches_p = lambda m: jnp.sum(jnp.where(keys >= m, probs, 0.0)) >= top_p
        return from_ordered_key(bisect(mass_reaches_p, jnp.maximum(lo, ordered_key(kth)), hi))

    pth = lax.cond(top_p < 1.0, pth_by_mass, lambda: jnp.float32(-jnp.inf))
    return jnp.maximum(kth, pth)
