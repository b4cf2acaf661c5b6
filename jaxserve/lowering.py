"""`jaxserve lower`: every step graph of an engine configuration lowered for another platform.

It checks a deployment before renting the hardware. The model is read for its config only (no
weights: the params are shapes, `jax.eval_shape` of the family's init), the engine flags give the
buckets, mesh and page size as `serve` would build them, and each warm-up graph is exported with
`jax.export` for the target platform, under `precision.targeting` so the dtypes and the attention
backend are the target's (bf16 stays bf16 instead of CPU's packed form; "auto" attention is the
GPU kernel). Export runs the whole lowering, Pallas -> Triton included, without a device: what
it catches is what fails before any compile (block shapes, shared memory, unsupported ops, a
kernel that does not partition). Compiling and running need the device itself.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # the CLI reads PLATFORMS before anything imports JAX
    from jaxserve.engine_args import EngineArgs
    from jaxserve.runner import GraphKey

PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
# A cache of thousands of pages, the size a GPU's memory gives a small model: the page count is
# only a shape here, and kernels that map whole page arrays (instead of gathering the pages they
# own) fail to lower at this size where they would pass at a test's dozens.
DEFAULT_NUM_PAGES = 4096
# Custom-call target of Pallas TPU kernels (the GPU kernel's are TRITON_CALL_TARGETS).
_TPU_KERNEL_CALL = "tpu_custom_call"


@dataclasses.dataclass(frozen=True)
class LoweringPlan:
    """What the graphs are lowered for (printed before them)."""
    model: str
    platform: str
    dtype: str
    kv_cache_dtype: str
    attention: str
    num_pages: int
    block_size: int
    mesh: dict[str, int]
    num_graphs: int


@dataclasses.dataclass(frozen=True)
class LoweredGraph:
    key: GraphKey
    seconds: float
    module: str = ""           # the StableHLO text
    kernel_calls: int = 0      # attention-kernel custom calls in it
    error: str | None = None

    def describe(self) -> str:
        T, B = self.key.shape if isinstance(self.key.shape, tuple) else (None, self.key.shape)
        shape = f"T={T:<5} B={B:<4}" if T is not None else f"{'':7} B={B:<4}" if B is not None else f"{'':13}"
        if self.error is not None:
            return f"FAIL {self.key.kind:<13} {shape} {self.seconds:6.2f}s  {self.error}"
        kernel = f"{self.kernel_calls} kernel call(s)" if self.kernel_calls else "no kernel call"
        return (f"ok   {self.key.kind:<13} {shape} {self.seconds:6.2f}s  {len(self.module) / 1e3:8.1f} kB"
                f"  {kernel}")


def lower_step_graphs(args: EngineArgs, platform: str, *, num_pages: int | None = None,
                      ) -> tuple[LoweringPlan, Iterator[LoweredGraph]]:
    """The plan, and each warm-up graph lowered for `platform` (lazily: print as they come).
    A graph that fails to lower is reported with its error; the others still lower."""
    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {', '.join(PLATFORMS)}")
    import jax

    from jaxserve.kv_cache_dtype import kv_cache_dtype
    from jaxserve.models import load_model_config, model_class, resolve_dtype
    from jaxserve.models.quantization import quantize_params
    from jaxserve.pallas_kernels import attention_backend
    from jaxserve.pallas_kernels.ragged_paged_attention_gpu import TRITON_CALL_TARGETS
    from jaxserve.parallel import build_mesh, check_divisible, replica_meshes
    from jaxserve.precision import targeting
    from jaxserve.runner import ModelRunner
    from jaxserve.speculative import DraftModelSpeculator

    from jaxserve.llm import resolve_runner

    config, path = load_model_config(args.model)
    if resolve_runner(args.runner, config.architecture) != "generate":  # the pooling runner's graphs: not yet
        raise ValueError(f"jaxserve lower lowers the generation graphs; runner 'pooling' ({config.architecture}) "
                         f"is not supported yet")
    limit = config.max_position_embeddings
    if args.max_model_len is not None and args.max_model_len > limit:
        raise ValueError(f"max_model_len ({args.max_model_len}) exceeds the model's context length ({limit})")
    parallel = args.parallel_config()
    check_divisible(config, parallel.tensor_parallel_size)
    mesh = replica_meshes(build_mesh(parallel))[0]  # data-parallel replicas run the same graphs
    scheduler = args.scheduler_config(args.max_model_len or limit)
    config = config.for_max_model_len(scheduler.max_model_len)
    with targeting(platform):
        dtype = resolve_dtype(args.dtype)
        kv_dtype = kv_cache_dtype(args.kv_cache_dtype, dtype)
        attention_fn = attention_backend(args.attention_backend)
        family = model_class(config.architecture)(config)
        params = jax.eval_shape(lambda key: quantize_params(family.init_params(key, dtype), args.quantization),
                                jax.random.key(0))
        pages = num_pages if num_pages is not None else _pages_for(args, config, kv_dtype)
        speculative = args.speculative_config()
        shape = dict(num_pages=pages, block_size=args.block_size, max_model_len=scheduler.max_model_len,
                     max_num_seqs=scheduler.max_num_seqs, max_num_batched_tokens=scheduler.max_num_batched_tokens,
                     attention_fn=attention_fn, mesh=mesh, abstract=True)
        runner = ModelRunner(family, params, **shape, lora=args.lora_config(), kv_cache_dtype=kv_dtype,
                             num_speculative_tokens=speculative.num_speculative_tokens if speculative else 0)
        exporters = [(key, runner) for key in runner.warmup_keys]
        if speculative is not None and speculative.draft_model is not None:  # its mirror and propose graphs
            draft_config = load_model_config(speculative.draft_model)[0].for_max_model_len(scheduler.max_model_len)
            check_divisible(draft_config, parallel.tensor_parallel_size)
            draft_family = model_class(draft_config.architecture)(draft_config)
            draft_params = jax.eval_shape(lambda key: draft_family.init_params(key, dtype), jax.random.key(0))
            draft_runner = ModelRunner(draft_family, draft_params, **shape, kv_cache_dtype=kv_dtype)
            drafter = DraftModelSpeculator(speculative, scheduler.max_model_len, draft_runner)
            exporters += [(key, drafter) for key in drafter.warmup_keys]
    plan = LoweringPlan(model=path, platform=platform, dtype=dtype.name, kv_cache_dtype=kv_dtype.name,
                        attention=_name(attention_fn),
                        num_pages=pages, block_size=args.block_size, mesh=dict(mesh.shape),
                        num_graphs=len(exporters))

    def graphs() -> Iterator[LoweredGraph]:
        for key, exporter in exporters:
            start = time.perf_counter()
            try:
                with targeting(platform):
                    module = exporter.export(key, (platform,)).mlir_module()
            except Exception as error:  # reported per graph: the point is to see every failure
                message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                yield LoweredGraph(key, time.perf_counter() - start, error=message)
                continue
            calls = sum(module.count(f"custom_call @{target}(") for target in (*TRITON_CALL_TARGETS, _TPU_KERNEL_CALL))
            yield LoweredGraph(key, time.perf_counter() - start, module=module, kernel_calls=calls)

    return plan, graphs()


def _pages_for(args: EngineArgs, config, kv_dtype) -> int:
    """--kv-cache-memory's pages where given (as serve sizes them), else DEFAULT_NUM_PAGES."""
    if args.kv_cache_memory is None:
        return DEFAULT_NUM_PAGES
    from jaxserve.engine import kv_page_bytes
    return max(2, args.kv_cache_memory // kv_page_bytes(config, args.block_size, kv_dtype) + 1)


def _name(fn) -> str:
    base = getattr(fn, "func", fn)
    keywords = getattr(fn, "keywords", {})
    return base.__name__ + (f"({', '.join(f'{k}={v}' for k, v in keywords.items())})" if keywords else "")
