"""The on-disk cache of converted GGUF weights: the final params arrays (dequantised, q/k rows
un-permuted, layers stacked, cast to the load dtype) and the ModelConfig, so that a later start
memory-maps them instead of reading and dequantising the file again.

One entry is a folder `<cache root>/weights/<key>/` holding `params.bin` (every array's raw bytes,
each at a 64-byte-aligned offset) and `manifest.json` (the config, and each array's path, dtype,
shape and offset), written into a staging folder and renamed into place, so a reader sees a whole
entry or none. The key names the file as it is now (path, size, modification time and a hash of
its first and last MiB), the dtype and LOADER_VERSION. An entry that does not read back whole is
deleted and rebuilt, never trusted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from jaxserve.models.config import ModelConfig, RopeScaling

logger = logging.getLogger(__name__)

# Bump whenever the loader would produce different arrays or config for the same file and dtype
# (a GGUF conversion fix, a new params layout): old entries then miss instead of being served.
LOADER_VERSION = 2  # 2: the registry's families (Gemma norms, experts, Phi-3), new config fields
_FORMAT = 1  # of manifest.json and params.bin
_ALIGN = 64  # bytes: every array starts at a multiple, so numpy views and device copies are aligned

HostParams = dict[tuple[str, ...], np.ndarray]  # flattened params pytree path -> host array


def cache_key(path: str, dtype: Any) -> str:
    """The entry name for `path` loaded as `dtype`: the file's identity (loader_gguf's, shared with
    the tokenizer cache), the dtype and LOADER_VERSION."""
    from jaxserve.models.loader_gguf import gguf_file_identity
    key = f"{gguf_file_identity(path)}\0{np.dtype(dtype).name}\0{LOADER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def entry_dir(root: str, key: str) -> str:
    return os.path.join(root, "weights", key)


def load(root: str, key: str) -> tuple[ModelConfig, HostParams] | None:
    """The cached config and params (read-only arrays over the memory-mapped file), or None when
    there is no whole entry; a damaged one is deleted so the caller rebuilds it."""
    folder = entry_dir(root, key)
    manifest_file = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_file):
        return None
    try:
        with open(manifest_file, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {_FORMAT}")
        config = config_from_dict(manifest["config"])
        with open(os.path.join(folder, "params.bin"), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != manifest["total_bytes"]:
                raise ValueError(f"params.bin has {size} bytes, the manifest says {manifest['total_bytes']}")
            # The mapping outlives the file object; the arrays below keep it alive.
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        params = {}
        for entry in manifest["arrays"]:
            dtype, shape = np.dtype(_dtype(entry["dtype"])), tuple(entry["shape"])
            count = int(np.prod(shape, dtype=np.int64))
            if entry["offset"] + count * dtype.itemsize > size:
                raise ValueError(f"array {entry['path']} runs past the end of params.bin")
            params[tuple(entry["path"])] = np.frombuffer(buffer, dtype, count, entry["offset"]).reshape(shape)
        return config, params
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring the damaged weight cache entry %s (%s); rebuilding it", folder, error)
        discard(root, key)
        return None


def discard(root: str, key: str) -> None:
    shutil.rmtree(entry_dir(root, key), ignore_errors=True)


def save(root: str, key: str, config: ModelConfig, params: HostParams, source: str) -> None:
    """Write an entry for `source` (best effort: a cache that cannot be written costs the next start
    a conversion, nothing more), and drop older entries of the same file and dtype."""
    folder = entry_dir(root, key)
    parent = os.path.dirname(folder)
    arrays, offset = [], 0
    for path, array in params.items():
        arrays.append({"path": list(path), "dtype": array.dtype.name, "shape": list(array.shape),
                       "offset": offset})
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    dtypes = sorted({a["dtype"] for a in arrays})
    manifest = {"format": _FORMAT, "source": os.path.realpath(source), "dtypes": dtypes,
                "config": dataclasses.asdict(config), "arrays": arrays, "total_bytes": offset}
    try:
        os.makedirs(parent, exist_ok=True)
        if shutil.disk_usage(parent).free < 2 * offset:
            logger.info("not caching converted weights in %s: under %d MB free", parent, 2 * offset >> 20)
            return
        staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
        try:
            with open(os.path.join(staging, "params.bin"), "wb") as f:
                for entry, array in zip(arrays, params.values()):
                    f.seek(entry["offset"])
                    f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                f.truncate(offset)
            with open(os.path.join(staging, "manifest.json"), "w", encoding="utf-8") as f:
                json.dump(manifest, f)
            try:
                os.rename(staging, folder)
            except OSError:  # another process wrote the same entry first
                if not os.path.isfile(os.path.join(folder, "manifest.json")):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _drop_older_entries(parent, key, manifest["source"], dtypes)
    except OSError as error:
        logger.warning("cannot cache converted weights in %s: %s", folder, error)


def _drop_older_entries(parent: str, key: str, source: str, dtypes: list[str]) -> None:
    """Entries of an earlier version of the same file in the same dtype are never hit again."""
    for name in os.listdir(parent):
        if name == key or name.startswith("."):
            continue
        try:
            with open(os.path.join(parent, name, "manifest.json"), encoding="utf-8") as f:
                other = json.load(f)
        except (OSError, ValueError):
            continue  # a folder being written right now, or not ours
        if other.get("source") == source and other.get("dtypes") == dtypes:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def config_from_dict(fields: dict[str, Any]) -> ModelConfig:
    """The inverse of dataclasses.asdict for ModelConfig (JSON turns tuples into lists)."""
    def tuples(d: dict) -> dict:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    fields = tuples(fields)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**tuples(fields["rope_scaling"]))
    return ModelConfig(**fields)


def _dtype(name: str) -> Any:
    if name == "bfloat16":  # numpy knows bfloat16 only through ml_dtypes (which JAX depends on)
        import ml_dtypes
        return ml_dtypes.bfloat16
    return name
