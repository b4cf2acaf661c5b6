"""Multi-step decode (issue 15): k greedy decode steps in one compiled call against one step per call.

For SmolLM2-135M at B = 1 and B = 32 (greedy, 16-token prompts, 128 new tokens) it compares:

- engine: `LLM.generate` (tok/s, prefill included), and the engine's decode step from
  `llm.engine.step_log`, split into the phases StepRecord records (schedule, prepare, device,
  outputs);
- a decode graph built here from the engine's own pieces (its params, `model.forward` with its
  attention function, `model.compute_logits`, the greedy sampler's `argmax`): each step builds its
  AttentionMetadata in the graph (positions, slot mapping, kv_lens from a page table) and takes the
  argmax in the graph; `jax.lax.fori_loop` runs k such steps per call, the KV cache donated. k = 1
  called once per token from Python (the tokens fetched after every call, as the engine must to
  check stops) is the baseline of k = 4, 8, 16 (the tokens fetched once per call). The weights
  are pinned inside the loop (`pin_weights`; `--unpinned` builds the naive graph): left alone,
  XLA hoists the bf16 embedding's convert to float32 out of the loop and every step's logits
  matmul reads a float32 table.

The host is a 2-vCPU VM shared with other work, so a 128-token decode is cut into chunks of 16
steps and the contestants take turns chunk by chunk (the engine stepped by hand, each k-graph on a
KV cache of its own), their order rotating: each chunk compares them at the same positions and
nearly the same moment (the engine's prefill step runs before the first turn, untimed, as the
graphs' prefills do). Per contestant it reports the median wall and process-CPU ms per decode step
over all turns, and its speed-up over the one-step graph and over the engine as medians of the
per-turn ratios. The graphs' prompts are prefilled by the engine's forward graph (the runner's `_forward`,
same bucket), every contestant's 128 greedy tokens are asserted equal to `LLM.generate`'s, and the
graphs' steps use the engine's decode bucket (T tokens, B slots, padding writing to page 0), so
all of them do the same work.

    .venv/bin/python benchmarks/multi_step_decode.py                  # auto (bf16 here) and float32, 3 rounds
    .venv/bin/python benchmarks/multi_step_decode.py --dtype auto --batch 1 --rounds 1
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import LLM, SamplingParams
from jaxserve.models.metadata import AttentionMetadata, KVCache
from jaxserve.precision import auto_dtype
from jaxserve.runner import ModelInputs
from jaxserve.sampling.core import argmax
from jaxserve.sampling_params import RequestOutputKind

PROMPT_LEN = 16  # 32 prompts x 16 tokens fill one 512-token prefill step, as in the engine
KS = (1, 4, 8, 16)
CHUNK = max(KS)  # steps each contestant runs per turn
PHASES = ("schedule", "prepare", "device", "outputs")
# One engine for both batch sizes (B = 1 decodes in the (2, 8) bucket, as it would beside others);
# no prefix caching, so every round prefills its prompts.
ENGINE_ARGS = dict(max_num_batched_tokens=512, max_model_len=512, enable_prefix_caching=False)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def prompts_for(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(100, vocab, size=PROMPT_LEN).tolist() for _ in range(batch)]


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                          output_kind=RequestOutputKind.FINAL_ONLY)


# ---- the k-step decode graph -----------------------------------------------------------------

def decode_steps(params, kv_cache: KVCache, last: jax.Array, pos: jax.Array, page_table: jax.Array,
                 num_seqs: jax.Array, *, model, attention_fn, num_tokens: int, page_size: int, k: int,
                 pin_weights: bool = True):
    """k greedy decode steps of the sequences in the first num_seqs of B slots.

    last [B] int32: each slot's last token; pos [B] int32: its position; page_table [B, W].
    Returns the cache, last and pos after the k steps, and the tokens [k, B]."""
    T, B, S = num_tokens, page_table.shape[0], page_size
    token_slot = jnp.minimum(jnp.arange(T, dtype=jnp.int32), B - 1)  # [T] the slot of each (real) token
    token_live = jnp.arange(T, dtype=jnp.int32) < num_seqs  # [T]
    slot_live = jnp.arange(B, dtype=jnp.int32) < num_seqs   # [B]

    def step(i, carry):
        kv_cache, last, pos, out = carry
        if pin_weights:
            # Tied to the loop counter, the weights look loop-variant to XLA: otherwise its
            # loop-invariant code motion hoists the bf16 -> f32 convert of the [V, D] embedding
            # out of the loop, and every step's logits matmul then reads a float32 table.
            params_i, _ = jax.lax.optimization_barrier((params, i))
        else:
            params_i = params
        positions = jnp.where(token_live, pos[token_slot], 0)  # [T]
        page = page_table[token_slot, positions // S]  # [T]
        attn = AttentionMetadata(
            positions=positions,
            slot_mapping=jnp.where(token_live, page * S + positions % S, 0),  # padding: page 0's slot 0
            cu_q_lens=jnp.minimum(jnp.arange(B + 1, dtype=jnp.int32), num_seqs),
            kv_lens=jnp.where(slot_live, pos + 1, 0), page_table=page_table, num_seqs=num_seqs)
        tokens = jnp.where(token_live, last[token_slot], 0)  # [T]
        hidden, kv_cache = model.forward(params_i, tokens, kv_cache, attn, attention_fn=attention_fn)
        logits_indices = jnp.where(slot_live, jnp.arange(B, dtype=jnp.int32), 0)  # [B]
        nxt = jnp.where(slot_live, argmax(model.compute_logits(params_i, hidden[logits_indices])), 0)  # [B]
        return kv_cache, nxt, jnp.where(slot_live, pos + 1, 0), out.at[i].set(nxt)

    out = jnp.zeros((k, B), jnp.int32)
    return jax.lax.fori_loop(0, k, step, (kv_cache, last, pos, out))


class GraphDecoder:
    """The engine's model and params behind a decode graph of k steps, on a KV cache of its own."""

    def __init__(self, llm: LLM, batch: int, k: int, max_len: int, pin_weights: bool = True):
        runner = llm.engine.runner
        self.runner, self.n, self.k = runner, batch, k
        self.decode_bucket = runner.bucket_for(batch)  # (T, B) of the engine's decode steps
        self.prefill_bucket = runner.bucket_for(batch * PROMPT_LEN)
        S, cfg = runner.block_size, runner.model.config
        # Sequence i owns pages 1 + i*w .. (i+1)*w; page 0 takes the padding's writes and fills
        # the rest of each page-table row, as the engine's NULL_PAGE does.
        w = -(-max_len // S)
        self.pages = 1 + np.arange(batch * w, dtype=np.int32).reshape(batch, w)
        self.kv_cache = self._put(runner.kv_cache_dtype.zeros((cfg.num_layers, 1 + batch * w, S, cfg.num_kv_heads,
                                                               cfg.head_dim)))
        self.graph = jax.jit(functools.partial(decode_steps, model=runner.model, attention_fn=runner._attention,
                                               num_tokens=self.decode_bucket[0], page_size=S, k=k,
                                               pin_weights=pin_weights),
                             donate_argnums=(1,))

    def _put(self, tree):
        return jax.device_put(tree, self.runner._replicated)  # as the engine's step inputs and outputs

    def page_table(self, B: int) -> np.ndarray:
        table = np.zeros((B, self.runner.page_table_width), np.int32)
        table[:self.n, :self.pages.shape[1]] = self.pages
        return table

    def prefill(self, prompts: list[list[int]], forward) -> np.ndarray:
        """The prompts' K/V into the cache by the engine's forward graph; their first tokens [n]."""
        T, B = self.prefill_bucket
        n, L, S = self.n, PROMPT_LEN, self.runner.block_size
        tokens, positions, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
        tokens[:n * L] = np.concatenate(prompts)
        positions[:n * L] = np.tile(np.arange(L, dtype=np.int32), n)
        slots[:n * L] = self.pages[np.repeat(np.arange(n), L), positions[:n * L] // S] * S + positions[:n * L] % S
        cu = (np.minimum(np.arange(B + 1), n) * L).astype(np.int32)
        live = np.arange(B) < n
        attn = AttentionMetadata(positions=positions, slot_mapping=slots, cu_q_lens=cu,
                                 kv_lens=np.where(live, L, 0).astype(np.int32), page_table=self.page_table(B),
                                 num_seqs=np.int32(n))
        inputs = ModelInputs(tokens=tokens, attn=attn, logits_indices=np.where(live, cu[1:] - 1, 0).astype(np.int32))
        self.kv_cache, logits, _ = forward(self.runner.params, self.kv_cache, self._put(inputs), None, None)
        self.first = np.asarray(jax.jit(argmax)(logits))[:n]
        return self.first

    def start(self) -> None:
        """Back to the prompts' end (later steps overwrite the slots the last decode wrote)."""
        T, B = self.decode_bucket
        last = np.zeros(B, np.int32)
        last[:self.n] = self.first
        pos = np.where(np.arange(B) < self.n, PROMPT_LEN, 0).astype(np.int32)
        self.state = self._put((last, pos, self.page_table(B), np.int32(self.n)))
        self.tokens: list[np.ndarray] = []

    def run(self, steps: int) -> int:
        """`steps` more decode steps, k per call, the tokens fetched after each call."""
        last, pos, table, num_seqs = self.state
        for _ in range(steps // self.k):
            self.kv_cache, last, pos, out = self.graph(self.runner.params, self.kv_cache, last, pos, table, num_seqs)
            self.tokens.append(np.asarray(out))  # the call's one device->host transfer
        self.state = (last, pos, table, num_seqs)
        return steps

    def decoded(self) -> np.ndarray:
        return np.concatenate(self.tokens)[:, :self.n].T  # [n, steps]


class EngineDecoder:
    """The engine, stepped by hand so it can take turns with the graphs (what LLM.generate runs)."""

    def __init__(self, llm: LLM):
        self.llm, self.engine = llm, llm.engine

    def start(self, prompts: list[list[int]], new_tokens: int) -> None:
        self.ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt in zip(self.ids, prompts):
            self.engine.add_request(rid, prompt, greedy(new_tokens))
        self.first_step, self.finals = self.engine.stats.steps, {}

    def run(self, steps: int) -> int:
        """Up to `steps` more engine steps (fewer where the requests finish); how many ran."""
        before = self.engine.stats.steps
        for _ in range(steps):
            if not self.engine.has_unfinished_requests():
                break
            for out in self.engine.step():
                if out.finished:
                    self.finals[out.request_id] = out
        return self.engine.stats.steps - before

    def records(self) -> list:
        """The StepRecords of this run's decode steps."""
        return [r for r in self.engine.step_log if r.index > self.first_step and set(r.scheduled.values()) == {1}]

    def decoded(self) -> np.ndarray:
        assert not self.engine.has_unfinished_requests()
        return np.array([self.finals[rid].outputs[0].token_ids for rid in self.ids], np.int32)


# ---- the run ---------------------------------------------------------------------------------

def bench_batch(llm: LLM, args, dtype: str, batch: int) -> dict:
    prompts = prompts_for(batch, llm.loaded.config.vocab_size)
    new = args.new_tokens
    start = time.perf_counter()
    reference = np.array([o.outputs[0].token_ids for o in llm.generate(prompts, greedy(new), use_tqdm=False)])
    forward = jax.jit(llm.engine.runner._forward, donate_argnums=(1,))
    graphs = {k: GraphDecoder(llm, batch, k, PROMPT_LEN + new + 1, not args.unpinned) for k in KS}
    for g in graphs.values():
        assert (g.prefill(prompts, forward) == reference[:, 0]).all(), "the prefill's token differs from the engine's"
        g.start()
        g.run(2 * g.k)  # compiled; the second call sees the graph's own outputs
    compile_s = time.perf_counter() - start
    engine = EngineDecoder(llm)
    generate_tok_s, rounds = [], []
    contestants = ["engine", *KS]
    for r in range(args.rounds):
        t = time.perf_counter()
        outs = llm.generate(prompts, greedy(new), use_tqdm=False)
        generate_tok_s.append(batch * new / (time.perf_counter() - t))
        assert (np.array([o.outputs[0].token_ids for o in outs]) == reference).all()
        engine.start(prompts, new)
        for g in graphs.values():
            g.start()
        engine.run(1)  # its prefill step, untimed: the graphs' prefills are too
        chunks = []  # per turn: contestant -> (wall ms, process CPU ms) per decode step
        for c in range(new // CHUNK):
            times = {}
            for i in range(len(contestants)):
                who = contestants[(i + c + r) % len(contestants)]  # the order rotates
                wall, cpu = time.perf_counter(), time.process_time()
                steps = (engine if who == "engine" else graphs[who]).run(CHUNK)
                times[who] = ((time.perf_counter() - wall) * 1e3 / steps, (time.process_time() - cpu) * 1e3 / steps)
            chunks.append(times)
        # The engine's 128 tokens: the prefill's, then 127 decoded; the graphs decoded 128 steps.
        assert (engine.decoded() == reference).all(), "the hand-stepped engine's tokens differ"
        for k, g in graphs.items():
            same = g.decoded()[:, :new - 1] == reference[:, 1:]
            assert same.all(), f"k={k}, B={batch}: tokens differ from the engine's at {np.argwhere(~same)[:5]}"
            assert g.graph._cache_size() == 1, f"k={k}: the graph compiled again while timed"
        records = engine.records()
        rounds.append(dict(chunks=chunks, phases_ms={p: statistics.median(getattr(x, f"{p}_seconds") for x in records)
                                                     * 1e3 for p in PHASES}))
    all_chunks = [c for rnd in rounds for c in rnd["chunks"]]
    med = statistics.median
    ms = {who: med(c[who][0] for c in all_chunks) for who in contestants}  # median ms per decode step
    cpu_ms = {who: med(c[who][1] for c in all_chunks) for who in contestants}
    row = dict(dtype=dtype, resolved=auto_dtype()[0] if dtype == "auto" else dtype, batch=batch,
               unpinned=args.unpinned, decode_bucket=list(graphs[1].decode_bucket), setup_s=compile_s,
               rounds=args.rounds,
               generate_tok_s=med(generate_tok_s), step_ms={str(k): v for k, v in ms.items()},
               cpu_ms={str(k): v for k, v in cpu_ms.items()},
               tok_s={str(k): batch / v * 1e3 for k, v in ms.items()},
               phases_ms={p: med(rnd["phases_ms"][p] for rnd in rounds) for p in PHASES},
               # paired, turn by turn: how much faster than the one-step graph and than the engine
               speedup_vs_k1={str(k): med(c[1][0] / c[k][0] for c in all_chunks) for k in contestants},
               speedup_vs_engine={str(k): med(c["engine"][0] / c[k][0] for c in all_chunks) for k in contestants},
               chunks_ms=[{str(k): v for k, v in c.items()} for c in all_chunks])
    print_row(row)
    return row


def print_row(r: dict) -> None:
    p = r["phases_ms"]
    print(f"\n{r['resolved']}, B={r['batch']} (decode bucket T, B = {tuple(r['decode_bucket'])}); "
          f"LLM.generate {r['generate_tok_s']:.1f} tok/s (prefill included); engine decode step (median of "
          f"phases): schedule {p['schedule']:.2f} + prepare {p['prepare']:.2f} + device {p['device']:.1f} + "
          f"outputs {p['outputs']:.2f} ms", flush=True)
    print(f"  {'':<24}{'tok/s':>9}{'ms/step':>9}{'CPU ms':>8}{'x k=1':>8}{'x engine':>10}", flush=True)
    for k in ["engine", *KS]:
        label = {"engine": "engine decode step", 1: "one-step graph (k=1)"}.get(k, f"k-step graph, k={k}")
        key = str(k)
        print(f"  {label:<24}{r['tok_s'][key]:9.1f}{r['step_ms'][key]:9.2f}{r['cpu_ms'][key]:8.1f}"
              f"{r['speedup_vs_k1'][key]:8.2f}{r['speedup_vs_engine'][key]:10.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="auto,float32", help="comma-separated engine dtypes")
    parser.add_argument("--batch", default="1,32", help="comma-separated decode batch sizes")
    parser.add_argument("--new-tokens", type=int, default=128, help=f"a multiple of {CHUNK}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unpinned", action="store_true",
                        help="let XLA hoist the weights' converts out of the k-step loop (the naive graph)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    assert args.new_tokens % CHUNK == 0, f"--new-tokens must be a multiple of {CHUNK}"
    print(f"{cpu_name()}, jax {jax.__version__} ({jax.default_backend()}); SmolLM2-135M, greedy, {PROMPT_LEN}-token "
          f"prompts, {args.new_tokens} new tokens, {args.rounds} rounds of {args.new_tokens // CHUNK} turns of "
          f"{CHUNK} steps; dtype auto = {auto_dtype()[0]}", flush=True)
    rows = []
    for dtype in args.dtype.split(","):
        llm = LLM(dtype=dtype, **ENGINE_ARGS, max_num_seqs=max(32, *batches))
        rows += [bench_batch(llm, args, dtype, b) for b in batches]
        del llm
    print("\nSummary: median tok/s of decode steps; speed-up = paired per-turn ratio of step times")
    print(f"{'dtype':<10}{'B':>4}{'engine':>9}{'k=1':>9}" + "".join(f"{f'k={k}':>9}" for k in KS[1:])
          + "".join(f"{f'k={k}/k=1':>10}" for k in KS[1:]) + f"{'k=16/engine':>13}")
    for r in rows:
        t, s = r["tok_s"], r["speedup_vs_k1"]
        print(f"{r['resolved']:<10}{r['batch']:>4}{t['engine']:9.1f}{t['1']:9.1f}"
              + "".join(f"{t[str(k)]:9.1f}" for k in KS[1:])
              + "".join(f"{s[str(k)]:10.2f}" for k in KS[1:]) + f"{r['speedup_vs_engine']['16']:13.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
