"""The ``jaxserve`` command line: ``jaxserve generate [--model M] "prompt"`` streams a completion."""
from __future__ import annotations

import argparse
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="HF folder, .gguf file or 'smollm2' (default: bundled SmolLM2)")
    g.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache")
    g.add_argument("--seed", type=int, default=0)


def _generate(args: argparse.Namespace) -> int:
    from jaxserve.llm import LLM
    from jaxserve.sampling_params import SamplingParams

    # One sequence streams: a small engine compiles few graphs.
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=1,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              enable_prefix_caching=args.enable_prefix_caching, kv_cache_memory=args.kv_cache_memory,
              seed=args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)
    engine = llm.engine
    if args.chat:
        tok = llm.get_tokenizer()
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        engine.add_request("cli", tok(text, add_special_tokens=False).input_ids, params, prompt_text=text)
    else:
        engine.add_request("cli", args.prompt, params)
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference and serving on JAX/XLA")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of PROMPT to the terminal")
    gen.add_argument("prompt")
    _add_engine_args(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--sample-seed", type=int, default=None)
    s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    # One stream needs no big prefill steps: fewer buckets to compile at start.
    gen.set_defaults(max_num_batched_tokens=128)
    args = parser.parse_args(argv)
    if args.command == "generate":
        try:
            return _generate(args)
        except (ValueError, FileNotFoundError) as e:
            parser.exit(2, f"jaxserve: error: {e}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
