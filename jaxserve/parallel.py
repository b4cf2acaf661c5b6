"""Parallelism: one ``jax.sharding.Mesh(("data", "model"))`` and where every array lives on it.

Tensor parallelism is Megatron-style: q/k/v and gate/up are split by output columns (heads, MLP
hidden units), o and down by input rows, so each layer needs one all-reduce after o and one after
down; the embedding and lm_head are split over the vocabulary. The KV cache is split over KV heads,
or replicated when there are fewer KV heads than model shards (each shard then keeps every KV head
and uses the ones its q heads need); the scales of 8-bit pages follow their pages. Attention itself runs per model shard (`shard_attention`, a
shard_map): a Pallas kernel is a custom call the SPMD partitioner cannot split. Data parallelism runs one engine replica per row of the mesh,
each on its own ("model",) slice; requests go to the least busy replica.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.models.quantization import QuantizedWeight

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1   # devices one model is split over (the "model" mesh axis)
    data_parallel_size: int = 1     # engine replicas, each on its own tensor-parallel group

    def __post_init__(self):
        for name in ("tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


def build_mesh(config: ParallelConfig, devices=None) -> Mesh:
    """The (data, model) mesh over the first data * model devices."""
    devices = list(jax.devices() if devices is None else devices)
    need = config.num_devices
    if len(devices) < need:
        hint = (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices)"
                if devices and devices[0].platform == "cpu" else "")
        raise ValueError(f"tensor_parallel_size ({config.tensor_parallel_size}) x data_parallel_size "
                         f"({config.data_parallel_size}) needs {need} devices, but only {len(devices)} "
                         f"are visible{hint}")
    grid = np.array(devices[:need], dtype=object).reshape(config.data_parallel_size, config.tensor_parallel_size)
    return Mesh(grid, (DATA, MODEL))


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One single-row (1, model) mesh per data-parallel replica."""
    return [Mesh(mesh.devices[i:i + 1], (DATA, MODEL)) for i in range(mesh.devices.shape[0])]


def check_divisible(model_config, tensor_parallel_size: int) -> None:
    """Refuse a tensor-parallel size that cannot split the model, naming the numbers."""
    tp = tensor_parallel_size
    if tp == 1:
        return
    c = model_config
    sizes = [("attention heads", c.num_heads), ("vocabulary size", c.vocab_size)]
    if c.num_experts:
        sizes += [("expert intermediate size", c.moe_intermediate_size)]
        if c.shared_expert_intermediate_size:
            sizes += [("shared expert intermediate size", c.shared_expert_intermediate_size)]
    else:
        sizes += [("MLP intermediate size", c.intermediate_size)]
    problems = [f"{what} ({n})" for what, n in sizes if n % tp]
    if c.num_kv_heads % tp and tp % c.num_kv_heads:
        problems.append(f"KV heads ({c.num_kv_heads}: must divide or be a multiple of it)")
    if problems:
        raise ValueError(f"tensor_parallel_size {tp} does not divide the model's " + ", ".join(problems))


def kv_heads_sharded(model_config, tensor_parallel_size: int) -> bool:
    return model_config.num_kv_heads % tensor_parallel_size == 0


# Which axis of each parameter (layers stacked on axis 0) the "model" axis splits; absent: replicated.
# MoE experts [L, E, D, F] / [L, E, F, D] split as the dense MLP does, each expert's hidden units
# over the shards, so routing stays local and a layer still needs one all-reduce; the router is
# replicated.
_COLUMN_AXIS = {"q_proj": 2, "q_bias": 1, "gate_proj": 2, "up_proj": 2, "lm_head": 1,
                "experts_gate": 3, "experts_up": 3}
_ROW_AXIS = {"o_proj": 1, "down_proj": 1, "embed": 0, "experts_down": 2}
_KV_AXIS = {"k_proj": 2, "v_proj": 2, "k_bias": 1, "v_bias": 1}


def param_spec(path: tuple[str, ...], ndim: int, kv_sharded: bool) -> P:
    name = path[-1]
    axis = _COLUMN_AXIS.get(name, _ROW_AXIS.get(name))
    if axis is None and kv_sharded:
        axis = _KV_AXIS.get(name)
    if axis is None:
        return P()
    return P(*(MODEL if i == axis else None for i in range(ndim)))


def param_shardings(params, mesh: Mesh, model_config):
    """A NamedSharding for every leaf of the params pytree. An int8 weight's values split as the
    float weight would; its scales (the weight without its contracted axes) split along the same
    output axis, and are replicated where the weight splits a contracted axis."""
    kv = kv_heads_sharded(model_config, mesh.shape[MODEL])

    def spec(path, leaf):
        names = tuple(getattr(k, "key", str(k)) for k in path)
        if not isinstance(leaf, QuantizedWeight):
            return NamedSharding(mesh, param_spec(names, leaf.ndim, kv))
        weight = param_spec(names, leaf.ndim, kv)
        axes = tuple(weight) or (None,) * leaf.ndim  # P() replicates: no axis split
        splits_contracted = any(axes[i] is not None for i in leaf.contracted)
        scale = P() if splits_contracted else P(*(a for i, a in enumerate(axes) if i not in leaf.contracted))
        return dataclasses.replace(leaf, q=NamedSharding(mesh, weight), scale=NamedSharding(mesh, scale))

    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def kv_cache_sharding(mesh: Mesh, model_config) -> NamedSharding:
    """[L, P, S, K, H]: split over K heads when they divide evenly, else replicated (one head:
    replicated, its pages having no K axis, models.metadata.kv_page_shape)."""
    if model_config.num_kv_heads > 1 and kv_heads_sharded(model_config, mesh.shape[MODEL]):
        return NamedSharding(mesh, P(None, None, None, MODEL, None))
    return NamedSharding(mesh, P())


def kv_scale_sharding(mesh: Mesh, model_config) -> NamedSharding:
    """The scales of 8-bit KV pages, [L, P, S, K]: split over K heads as the pages are."""
    if model_config.num_kv_heads > 1 and kv_heads_sharded(model_config, mesh.shape[MODEL]):
        return NamedSharding(mesh, P(None, None, None, MODEL))
    return NamedSharding(mesh, P())


def shard_attention(attention_fn, mesh: Mesh, model_config):
    """attention_fn run on each model shard's own heads (shard_map), for a mesh with a model axis.

    A Pallas kernel is a custom call the SPMD partitioner cannot split: left to it, every device
    would gather all heads of q and of the cache. Here each shard attends its q heads over its
    KV heads. Where KV heads are replicated (fewer than the shards), a shard's q heads need KV
    heads it has but at other indices: it gathers all q heads (small), attends them all, and
    keeps its own (the cache it reads is the same). The scales of 8-bit pages ([P, S, K]) go
    with their pages."""
    if mesh.shape[MODEL] == 1:
        return attention_fn
    kv_sharded = kv_heads_sharded(model_config, mesh.shape[MODEL])
    heads, metadata = P(None, MODEL, None), P()
    pages, scales = (P(None, None, MODEL, None), P(None, None, MODEL)) if kv_sharded else (P(), P())

    def sharded(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *, k_scales=None, v_scales=None,
                **options):
        page_scales = () if k_scales is None else (k_scales, v_scales)

        def per_shard(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *page_scales):
            kw = dict(options, k_scales=page_scales[0], v_scales=page_scales[1]) if page_scales else options
            if kv_sharded:
                return attention_fn(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, **kw)
            own = q.shape[1]
            every_head = jax.lax.all_gather(q, MODEL, axis=1, tiled=True)
            out = attention_fn(every_head, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, **kw)
            return jax.lax.dynamic_slice_in_dim(out, jax.lax.axis_index(MODEL) * own, own, axis=1)

        return jax.shard_map(per_shard, mesh=mesh,
                             in_specs=(heads, pages, pages) + (metadata,) * 4 + (scales,) * len(page_scales),
                             out_specs=heads, check_vma=False)(
            q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, *page_scales)

    return sharded


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process JAX run (one process per host); arguments left None fall back to JAX's
    own detection (SLURM, TPU pods). The mesh then spans every process's devices. Every process must
    be given the same requests in the same order: each runs the same schedule (SPMD). A second
    call (the CLI joins before it loads the model, LLM joins again) does nothing."""
    if jax.distributed.is_initialized():
        return
    # CPU processes reach each other through gloo (the default CPU client has no collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
