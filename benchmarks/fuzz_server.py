"""The server fuzz of tests/server/test_fuzz.py, as long as you like, against any running server.

    .venv/bin/jaxserve serve &        # or any URL serving the model under --model
    .venv/bin/python benchmarks/fuzz_server.py --url http://127.0.0.1:8000 --cases 5000 --seed 7

Prints the answers by route and status, then every failing case (a 5xx, an error body not in its
API's format, a body the parser must refuse that was accepted); exits 1 if there was one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import httpx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "server"))
import test_fuzz as fuzz  # noqa: E402  (the cases and the checks live with the test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=fuzz.SEED)
    parser.add_argument("--model", default=fuzz.MODEL, help="the served model name the valid bodies use")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for one answer")
    args = parser.parse_args()

    cases = fuzz.make_cases(args.seed, args.cases, model=args.model)
    start = time.perf_counter()
    failures, statuses = fuzz.run_cases(args.url, cases, timeout=args.timeout)
    elapsed = time.perf_counter() - start
    health = httpx.get(f"{args.url}/health", timeout=10).status_code

    print(f"{len(cases)} cases (seed {args.seed}) in {elapsed:.1f} s; /health after: {health}")
    for (path, status), count in sorted(statuses.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {path:24} {status!s:>9}  {count}")
    print(f"{len(failures)} failures")
    for line in failures:
        print(" ", line[:500])
    return 1 if failures or health != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
