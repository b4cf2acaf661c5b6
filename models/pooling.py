"""Pooling: how a model's token states become one embedding per text. `PoolerConfig` says which
pooling, whether vectors are normalised, the model's input limit and whether it may be truncated
to fewer dimensions; `pooler_config` reads it from a model folder (sentence-transformers files,
config.json); `pool` runs it over a ragged batch on the device.

sentence-transformers folders name their pipeline in modules.json (Transformer -> Pooling ->
Normalize); 1_Pooling/config.json picks the pooling and sentence_bert_config.json the
`max_seq_length`. Without them, as vLLM: encoders pool [CLS], decoders their last token, and both
normalise.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

POOLING_TYPES = ("last", "mean", "cls")
# sentence-transformers' pooling modes (pooling_mode_<name> flags, or the newer pooling_mode
# field) -> our pooling type. The others (max, weighted and sqrt-length means, several at once)
# are refused: rare, and not implemented.
_ST_MODES = {"cls_token": "cls", "cls": "cls", "mean_tokens": "mean", "mean": "mean", "lasttoken": "last"}
_ST_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclasses.dataclass(frozen=True, slots=True)
class PoolerConfig:
    pooling_type: str                # "mean", "cls" or "last": how token states become one vector
    normalize: bool                  # scale every embedding to unit L2 norm (cosine = dot product)
    max_seq_length: int | None = None  # sentence-transformers' input limit in tokens, if it names one
    # Matryoshka models are trained so that a prefix of the embedding is an embedding: only they
    # take a request's `dimensions`. matryoshka_dimensions lists the sizes allowed (empty: any).
    matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()

    def __post_init__(self):
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")
        if self.max_seq_length is not None and (not isinstance(self.max_seq_length, int) or self.max_seq_length < 1):
            raise ValueError(f"max_seq_length must be a positive int, got {self.max_seq_length!r}")

    def check_dimensions(self, dimensions: int, hidden_size: int) -> None:
        """A ValueError naming `dimensions` unless the model may be truncated to it."""
        if not self.matryoshka:
            raise ValueError("dimensions is only supported by Matryoshka models (config.json is_matryoshka or "
                             "matryoshka_dimensions); this model's embeddings cannot be truncated")
        if self.matryoshka_dimensions and dimensions not in self.matryoshka_dimensions:
            raise ValueError(f"dimensions must be one of {list(self.matryoshka_dimensions)} for this model, "
                             f"got {dimensions}")
        if not 1 <= dimensions <= hidden_size:
            raise ValueError(f"dimensions must be in [1, {hidden_size}], got {dimensions}")


def _read_json(path: str) -> dict | list | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _sentence_transformers(folder: str) -> tuple[str | None, bool | None, int | None]:
    """(pooling type, normalize, max_seq_length) a sentence-transformers folder names; Nones
    where it has no such files."""
    modules = _read_json(os.path.join(folder, "modules.json"))
    settings = _read_json(os.path.join(folder, "sentence_bert_config.json")) or {}
    max_len = settings.get("max_seq_length")
    if not modules:
        return None, None, max_len
    kinds = {m["type"].rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    unknown = sorted(set(kinds) - set(_ST_MODULES))
    if unknown:  # a Dense or other head changes the embedding: ignoring it would be silently wrong
        raise ValueError(f"{folder}: sentence-transformers module(s) {', '.join(unknown)} are not supported "
                         f"(supported: {', '.join(_ST_MODULES)})")
    pooling = None
    if "Pooling" in kinds:
        config = _read_json(os.path.join(folder, kinds["Pooling"], "config.json")) or {}
        if isinstance(config.get("pooling_mode"), str):  # the newer one-field form
            modes = [config["pooling_mode"]]
        else:
            modes = [name[len("pooling_mode_"):] for name, on in config.items()
                     if name.startswith("pooling_mode_") and on is True]
        if len(modes) != 1 or modes[0] not in _ST_MODES:
            raise ValueError(f"{folder}: sentence-transformers pooling {' + '.join(modes) or 'none'} is not "
                             f"supported (one of: cls_token, mean_tokens, lasttoken)")
        pooling = _ST_MODES[modes[0]]
    return pooling, "Normalize" in kinds, max_len


def pooler_config(folder: str | None, *, encoder: bool, pooling_type: str = "auto") -> PoolerConfig:
    """The pooling of a model: `pooling_type` when not "auto", else what its folder's
    sentence-transformers files say, else [CLS] for encoders and the last token for decoders;
    normalised unless sentence-transformers files leave Normalize out. folder None: a GGUF file."""
    st_pooling, st_normalize, max_len = _sentence_transformers(folder) if folder else (None, None, None)
    hf = (_read_json(os.path.join(folder, "config.json")) if folder else None) or {}
    dims = tuple(int(d) for d in hf.get("matryoshka_dimensions") or ())
    if pooling_type == "auto":
        pooling_type = st_pooling or ("cls" if encoder else "last")
    return PoolerConfig(pooling_type=pooling_type, normalize=st_normalize if st_normalize is not None else True,
                        max_seq_length=max_len, matryoshka=bool(hf.get("is_matryoshka") or dims),
                        matryoshka_dimensions=dims)


def pool(hidden: jax.Array, segment_ids: jax.Array, starts: jax.Array, lengths: jax.Array,
         pooling_type: str) -> jax.Array:
    """One float32 vector per text of a ragged batch.

    hidden [T, D]; segment_ids [T] (padding tokens hold an id >= B, which the sums drop);
    starts, lengths [B] (padding slots have length 0) -> [B, D].
    """
    hidden = hidden.astype(jnp.float32)
    if pooling_type == "cls":
        return hidden[starts]
    if pooling_type == "last":
        return hidden[starts + jnp.maximum(lengths - 1, 0)]
    sums = jax.ops.segment_sum(hidden, segment_ids, num_segments=starts.shape[0])  # [B, D]
    return sums / jnp.maximum(lengths, 1).astype(jnp.float32)[:, None]
