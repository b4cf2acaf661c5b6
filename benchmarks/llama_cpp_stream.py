"""One stream through llama-cpp-python's `Llama` API, driven by benchmarks/peers_single.py.

Runs in .venv-peers (llama-cpp-python only, no jaxserve). Loads the GGUF once per thread count,
says {"ready": ...} on stdout, then answers each JSON line on stdin ({"threads", "prompt_ids",
"max_tokens"}) with one JSON line: greedy token ids, time to the first token and decode time (first
token to last). End-of-generation tokens do not stop it: every run makes max_tokens tokens.

    .venv-peers/bin/python benchmarks/llama_cpp_stream.py MODEL.gguf 1,2
"""
import json
import sys
import time

import llama_cpp


def run(llm: "llama_cpp.Llama", prompt_ids: list[int], max_tokens: int) -> dict:
    llm.reset()  # no KV reuse from the last run: every run pays its prefill
    times, ids = [], []
    start = time.perf_counter()
    for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
        times.append(time.perf_counter())
        ids.append(int(token))
        if len(ids) == max_tokens:
            break
    return {"token_ids": ids, "ttft_s": times[0] - start, "decode_s": times[-1] - times[0]}


def main() -> None:
    model, threads = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
    llms = {t: llama_cpp.Llama(model_path=model, n_threads=t, n_threads_batch=t, n_ctx=2048, n_batch=512,
                               verbose=False) for t in threads}
    print(json.dumps({"ready": True, "version": llama_cpp.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        result = run(llms[request["threads"]], request["prompt_ids"], request["max_tokens"])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
