"""Exported step graphs kept on disk, so that a warm start skips tracing and lowering the model.

JAX's persistent compilation cache (``<cache root>/xla``) already turns a lowered module into an
executable without compiling, but each start still traces and lowers every step graph first
(0.3-0.5 s each for SmolLM2 on 2 vCPUs, the larger part of loading one). This store keeps each
warm-up graph as a ``jax.export.Exported`` (its StableHLO module), so a later start reads it back,
wraps it in a jit (tracing one call, lowering one inlined module) and gets its executable from the
persistent cache as before: the compiled code is the same, only the Python work is skipped.

An exported graph is only as right as the code and settings it was traced under, so its key
names all of them: every source file of jaxserve (models and kernels included), the JAX and
jaxlib versions, the platform, the CPU's flags, ``XLA_FLAGS``, JAX's configuration, the mesh,
the model class and config, the attention function and every argument's shape, dtype and
sharding. Editing any jaxserve file therefore re-exports every graph once (the persistent cache
still compiles nothing that it already has). (Serialising executables themselves was tried
first: jaxlib 0.10.2 writes a broken one, "Function ... not found" when it runs, for an
executable that itself came from the persistent cache.)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import logging
import os
import pickle
import tempfile
from typing import Any, Callable

import jax

logger = logging.getLogger(__name__)

_FORMAT = 1
# The packages whose code ends up inside a step graph.
_TRACED_PACKAGES = ("jaxserve", "jaxserve.models", "jaxserve.pallas_kernels")
# jax.config entries that decide where and whether things are cached or logged, not what a graph is.
_CONFIG_NOT_IN_GRAPH = ("cache", "log", "profil", "explain")


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 over every .py file of the packages traced into a step, their subpackages included
    (jaxserve/sampling/ holds the sampler), a few ms."""
    digest = hashlib.sha256()
    for package in _TRACED_PACKAGES:
        root = os.path.dirname(importlib.import_module(package).__file__)
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), "rb") as f:
                        relative = os.path.relpath(os.path.join(folder, name), root)
                        digest.update(f"{package}/{relative}\0".encode() + f.read() + b"\0")
    return digest.hexdigest()


def platform_fingerprint(devices: list[Any]) -> str:
    """What the exported module depends on beyond our code: JAX, the devices and the flags."""
    import jaxlib

    from jaxserve.precision import read_cpu_flags
    config = sorted((k, repr(v)) for k, v in jax.config.values.items()
                    if not any(word in k for word in _CONFIG_NOT_IN_GRAPH))
    cpu = sorted(read_cpu_flags()) if devices[0].platform == "cpu" else []
    parts = [jax.__version__, jaxlib.__version__, devices[0].client.platform_version,
             [(d.id, d.platform, d.device_kind) for d in devices], cpu, os.environ.get("XLA_FLAGS", ""),
             os.environ.get("LIBTPU_INIT_ARGS", ""), config]
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def describe_callable(fn: Callable) -> str | None:
    """A stable name for a function traced into the graph, or None when it is not jaxserve's own
    (its code is not in the source fingerprint, so a graph using it cannot be keyed safely)."""
    args: tuple = ()
    keywords: dict = {}
    if isinstance(fn, functools.partial):
        fn, args, keywords = fn.func, fn.args, fn.keywords
    module = getattr(fn, "__module__", "") or ""
    if not module.startswith("jaxserve.") or not hasattr(fn, "__qualname__"):
        return None
    return f"{module}.{fn.__qualname__}{args!r}{sorted(keywords.items())!r}"


def describe_arguments(*args) -> str:
    """The tree structure and each leaf's shape, dtype and sharding (what the export specialises on)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    described = [(tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    return f"{tree}{described}"


class ExportedGraphStore:
    """One file per graph under `folder`, named by the hash of everything the graph depends on."""

    def __init__(self, folder: str, identity: str):
        self.folder = folder
        self._identity = identity  # model, mesh, attention, platform and source: shared by all buckets

    def key(self, graph: str) -> str:
        parts = f"{_FORMAT}\0{source_fingerprint()}\0{self._identity}\0{graph}"
        return hashlib.sha256(parts.encode()).hexdigest()[:40]

    def load(self, key: str) -> jax.export.Exported | None:
        path = os.path.join(self.folder, key + ".exported")
        try:
            with open(path, "rb") as f:
                exported = pickle.load(f)
            if not isinstance(exported, jax.export.Exported):
                raise TypeError(f"holds a {type(exported).__name__}")
            return exported
        except FileNotFoundError:
            return None
        except Exception as error:  # a damaged or foreign file: rebuild it
            logger.warning("ignoring the damaged exported graph %s (%s); re-exporting it", path, error)
            _remove(path)
            return None

    def save(self, key: str, exported: jax.export.Exported) -> None:
        """Best effort: a store that cannot be written costs the next start a trace, nothing more."""
        # Exported carries a closure for differentiating it, which pickle cannot write and a step
        # graph never needs. (Exported.serialize, the stable format, needs the flatbuffers package.)
        exported = dataclasses.replace(exported, _get_vjp=None)
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, staging = tempfile.mkstemp(prefix=".staging-", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    pickle.dump(exported, f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(staging, os.path.join(self.folder, key + ".exported"))
            finally:
                _remove(staging)
        except (OSError, pickle.PicklingError, TypeError, AttributeError) as error:
            logger.warning("cannot keep the exported step graph in %s: %s", self.folder, error)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
