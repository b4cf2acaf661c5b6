"""A seeded, bounded fuzz of every POST route of a running server: valid bodies mutated in types,
sizes, nesting, encodings, unknown fields and extreme sampling values. No answer may be a 5xx,
every 4xx is in its API's error format, the bodies the parser must refuse are refused, and the
server answers /health and the same greedy text afterwards.

JAXSERVE_FUZZ_SEED and JAXSERVE_FUZZ_CASES pick the run (the default is sized for `make test`);
benchmarks/fuzz_server.py runs the same cases, longer, against any server URL.
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass

import httpx

MODEL = "smollm2"
SEED = int(os.environ.get("JAXSERVE_FUZZ_SEED", "11"))
CASES = int(os.environ.get("JAXSERVE_FUZZ_CASES", "400"))

QUESTION = [{"role": "user", "content": "Hi"}]
# Valid bodies of every POST route, generating at most 2 tokens so that a case costs little.
BASES = {
    "/v1/completions": {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2, "seed": 1},
    "/v1/chat/completions": {"model": MODEL, "messages": QUESTION, "max_tokens": 2},
    "/tokenize": {"model": MODEL, "prompt": "Hello world"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2, 3]},
    "/api/generate": {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
    "/api/chat": {"model": MODEL, "messages": QUESTION, "stream": False, "options": {"num_predict": 2}},
    "/api/show": {"model": MODEL},
    "/stop_profile": {},  # answers 409 (nothing is profiling); the body is never read
}
# Fields each route reads, the ones worth aiming at first.
_SAMPLING = ["temperature", "top_p", "top_k", "min_p", "seed", "n", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "logprobs", "sampler",
             "typical_p", "tfs_z", "mirostat", "mirostat_tau", "mirostat_eta", "repeat_last_n", "best_of",
             "skip_special_tokens", "include_stop_str_in_output", "stream", "stream_options", "response_format",
             "logit_bias", "tools", "user"]
FIELDS = {
    "/v1/completions": ["model", "prompt", "max_tokens", "echo", "suffix", *_SAMPLING],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "top_logprobs",
                             "add_generation_prompt", "continue_final_message", *_SAMPLING],
    "/tokenize": ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs"],
    "/detokenize": ["model", "tokens"],
    "/api/generate": ["model", "name", "prompt", "system", "context", "raw", "keep_alive", "stream", "format",
                      "images", "options", "logprobs", "top_logprobs", "suffix", "template", "think"],
    "/api/chat": ["model", "messages", "stream", "format", "tools", "options", "keep_alive", "logprobs",
                  "top_logprobs", "think"],
    "/api/show": ["model", "name", "verbose"],
    "/stop_profile": ["trace"],
}
OPTIONS = ["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
           "seed", "stop", "num_predict", "num_ctx", "repeat_last_n", "typical_p", "tfs_z", "mirostat",
           "mirostat_tau", "mirostat_eta", "num_thread", "num_gpu", "unknown_option"]
_NUMERIC_SAMPLING = ["temperature", "top_p", "top_k", "min_p", "seed", "n", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "min_tokens", "typical_p", "tfs_z", "mirostat", "mirostat_tau",
                     "mirostat_eta", "repeat_last_n", "logprobs", "max_tokens"]
_NUMERIC_OPTIONS = [o for o in OPTIONS if o not in ("stop", "unknown_option")]
_NUMERIC = {"/v1/completions": _NUMERIC_SAMPLING, "/v1/chat/completions": [*_NUMERIC_SAMPLING, "top_logprobs"],
            "/api/generate": _NUMERIC_OPTIONS, "/api/chat": _NUMERIC_OPTIONS}
# Fields that set how much is generated: a mutation may break them, never make them large.
_LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "n", "best_of")
_MAX_LENGTH = 2


class Raw(str):
    """JSON text put into the body as is: a 100-digit integer, a deep pile of arrays."""


class Hostile(Raw):
    """Raw JSON text no body may hold (NaN, a 5,000-digit integer, a lone surrogate escape)."""


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes
    must_refuse: bool  # the parser must answer 4xx whatever the route would make of the value
    what: str          # the mutations, for the failure message


def render(value) -> str:
    """JSON text of `value`, with Raw pieces inserted verbatim."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{render(Raw(k)) if isinstance(k, Raw) else json.dumps(k)}:{render(v)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    return json.dumps(value)


def _nest(rng: random.Random, depth: int) -> Raw:
    if rng.random() < 0.5:
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def hostile_value(rng: random.Random) -> tuple[object, str]:
    """A value no body may hold: the parser must refuse it wherever it is."""
    kind = rng.randrange(6)
    if kind == 0:
        depth = rng.choice([65, 100, 1000, 5000, 100_000])
        return Hostile(_nest(rng, depth)), f"nested {depth} deep"
    if kind == 1:
        digits = rng.choice([101, 500, 4301, 20_000])
        return Hostile(rng.choice(["", "-"]) + "9" * digits), f"{digits}-digit integer"
    if kind == 2:
        name = rng.choice(["NaN", "Infinity", "-Infinity"])
        return Hostile(name), name
    if kind == 3:
        token = rng.choice(["1e400", "-1e999", "1" * 50 + "e300", "0." + "1" * 200])
        return Hostile(token), f"number {token[:12]}..."
    if kind == 4:
        text = rng.choice(['"\\ud800a\\udc00"', '"x\\udfff"', '"\\udbff"', '"ok \\ud83d"'])
        return Hostile(text), f"lone surrogate {text}"
    if rng.random() < 0.5:
        return [Hostile('"\\ud800"')], "lone surrogate in an array"
    return {"k": Hostile("NaN")}, "NaN in an object"


def odd_value(rng: random.Random) -> tuple[object, str]:
    """Valid JSON of every type and size: the route decides; anything but a 5xx will do."""
    pool = [None, True, False, 0, -1, 1, 2, 0.5, -0.0, 2 ** 31, 2 ** 63, 2 ** 64, -2 ** 63 - 1, Raw("9" * 100),
            Raw("-" + "9" * 99), 1e308, -1e308, 5e-324, 1e-300, -2.5, "", "x", "\u0000", "\U0001F600 ok",
            "[[{{", "a" * rng.choice([1_000, 200_000]), [], {}, [1, 2, 3], [-1], [2 ** 40], ["a", 1],
            ["stop"] * rng.choice([2, 100, 5_000]), list(range(5_000)), {"a": 1}, {"type": "text"},
            [{"role": "user", "content": "Hi"}], _nest(rng, 10), _nest(rng, 60)]
    value = rng.choice(pool)
    return value, f"{type(value).__name__} {render(value)[:24]}"


def extreme_number(rng: random.Random) -> tuple[object, str]:
    """A number at the edges of what the sampler's float32 and int32 arrays hold, or past them."""
    value = rng.choice([0, -1, 1, 2, 0.0, 1e-45, 1e-40, 5e-324, 1e-300, 1e308, -1e308, 3.4e38, 3.5e38, 1e39,
                        -3.5e38, 2 ** 31 - 1, 2 ** 31, -2 ** 31, 2 ** 40, 2 ** 63 - 1, -2 ** 63, 0.9999999, 1.0000001,
                        65504.0, 1e-7, -0.5, 0.5, 100])
    return value, f"{type(value).__name__} {value!r}"


def _set_length_fields(path: str, body) -> None:
    """Keep generation tiny: no valid length field above 2, Ollama's num_predict always small."""
    if not isinstance(body, dict) or path not in ("/v1/completions", "/v1/chat/completions",
                                                  "/api/generate", "/api/chat"):
        return
    for name in _LENGTH_FIELDS:
        value = body.get(name)
        if type(value) is int and value > _MAX_LENGTH:
            body[name] = _MAX_LENGTH
    if path == "/v1/chat/completions" and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = _MAX_LENGTH  # null or absent: the rest of the context
    if path.startswith("/api/") and isinstance(body.get("options"), dict):
        num_predict = body["options"].get("num_predict")
        if not isinstance(num_predict, Hostile) and (type(num_predict) is not int or num_predict > _MAX_LENGTH
                                                     or num_predict in (-1, -2)):
            body["options"]["num_predict"] = _MAX_LENGTH
    elif path.startswith("/api/") and "options" not in body:
        body["options"] = {"num_predict": _MAX_LENGTH}


def _mutate_field(rng: random.Random, path: str, body: dict) -> str:
    pick = rng.random()
    if pick < 0.35 and path in _NUMERIC:  # an edge value where the route takes a number
        value, what = extreme_number(rng)
        name = rng.choice(_NUMERIC[path])
        if path.startswith("/api/"):
            body["options"] = body.get("options") if isinstance(body.get("options"), dict) else {}
            body["options"][name] = value
            return f"options.{name} = {what}"
        body[name] = value
        return f"{name} = {what}"
    value, what = (hostile_value if pick < 0.65 else odd_value)(rng)
    target = rng.random()
    if path.startswith("/api/") and path != "/api/show" and target < 0.3:
        options = body.setdefault("options", {}) if isinstance(body.get("options"), dict) else {}
        body["options"] = options
        name = rng.choice(OPTIONS)
        options[name] = value
        return f"options.{name} = {what}"
    if "messages" in body and isinstance(body["messages"], list) and target < 0.45:
        message = {"role": "user", "content": "Hi"}
        field = rng.choice(["content", "role", "name", "images", "tool_calls"])
        message[field] = value if rng.random() < 0.7 else [{"type": "text", "text": value}]
        body["messages"] = [message]
        return f"messages[0].{field} = {what}"
    if target < 0.9:
        name = rng.choice(FIELDS[path])
    else:
        name = rng.choice(["unknown_field", "", "x" * 300, Hostile('"\\ud800"'), "max_tokens "])
    if rng.random() < 0.1 and name in body:
        del body[name]
        return f"del {name}"
    body[name] = value
    return f"{name!s:.40} = {what}"


def _mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, bool | None, str]:
    """(the bytes, whether the parser must now refuse them (None: as before), what changed)."""
    kind = rng.randrange(7)
    at = rng.randrange(len(data) + 1)
    if kind == 0:
        return data[:at] + rng.choice([b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"]) + data[at:], \
            True, "invalid UTF-8"
    if kind == 1:
        return b"\xef\xbb\xbf" + data, None, "UTF-8 byte order mark"
    if kind == 2:
        return data.decode().encode(rng.choice(["utf-16", "utf-32", "utf-16-le"])), True, "UTF-16/32 body"
    if kind == 3:
        return data[:rng.randrange(len(data))], True, "truncated"
    if kind == 4:
        return rng.choice([b"", b"null", b"[]", b'"text"', b"42", b"{", b"}", b'{"a":}', b"NaN"]), \
            True, "not an object"
    if kind == 5:
        i = rng.randrange(len(data))
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:], False, "one byte changed"  # may mend it
    tail = rng.choice([b" ", b"\n", b"x", b"{}"])
    return data + tail, None if tail.isspace() else True, f"trailing {tail!r}"


def _holds_hostile(value) -> bool:
    if isinstance(value, Hostile):
        return True
    if isinstance(value, dict):
        return any(_holds_hostile(k) or _holds_hostile(v) for k, v in value.items())
    return isinstance(value, list) and any(_holds_hostile(v) for v in value)


def make_cases(seed: int, count: int, model: str = MODEL) -> list[Case]:
    """`count` cases, the same for the same seed; the valid bodies name `model`."""
    rng = random.Random(seed)
    paths = list(BASES)
    cases = []
    for _ in range(count):
        path = rng.choice(paths)
        body = json.loads(json.dumps(BASES[path]))
        if "model" in body:
            body["model"] = model
        what = []
        for _ in range(rng.choice([1, 1, 1, 1, 2, 3])):
            what.append(_mutate_field(rng, path, body))
        _set_length_fields(path, body)
        must_refuse = _holds_hostile(body)
        data = render(body).encode("utf-8")
        if rng.random() < 0.15:
            data, refused, w = _mutate_bytes(rng, data)
            must_refuse = must_refuse if refused is None else refused
            what.append(w)
        if path == "/stop_profile":  # reads no body: nothing to refuse there
            must_refuse = False
        cases.append(Case(path, data, must_refuse, "; ".join(what)))
    return cases


def check(case: Case, response: httpx.Response) -> str | None:
    """What is wrong with the answer to one case (None: nothing)."""
    status = response.status_code
    if status >= 500:
        return f"HTTP {status}: {response.text[:300]}"
    if case.must_refuse and status < 400:
        return f"accepted (HTTP {status}) a body the parser must refuse"
    if status < 400:
        return _stream_error(response)
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {status} with a body that is not JSON: {response.text[:200]!r}"
    if case.path.startswith("/api/"):
        if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(body["error"], str)
                and body["error"]):
            return f"HTTP {status}, not Ollama's {{'error': str}}: {body!r:.300}"
        if case.must_refuse and status != 400:
            return f"HTTP {status}, not the parser's 400: {body['error'][:200]}"
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not (set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
            and error["message"] and (error["param"] is None or isinstance(error["param"], str))):
        return f"HTTP {status}, not OpenAI's error object: {body!r:.300}"
    if case.must_refuse and (status != 400 or error["code"] != "invalid_json"):
        return f"HTTP {status} {error['code']}, not the parser's 400 invalid_json: {error['message'][:200]}"
    return None


def _stream_error(response: httpx.Response) -> str | None:
    """An error sent inside a 200 stream (SSE or NDJSON): the engine failed mid-request."""
    kind = response.headers.get("content-type", "")
    if "event-stream" not in kind and "ndjson" not in kind:
        return None
    for line in response.text.splitlines():
        line = line.removeprefix("data: ")
        if line.startswith("{") and '"error"' in line and "error" in json.loads(line):
            return f"HTTP {response.status_code}, an error inside the stream: {line[:300]}"
    return None


def run_cases(url: str, cases: list[Case], *, timeout: float = 120) -> tuple[list[str], Counter]:
    """Send the cases one after another (streams read to the end): the failures, described, and
    the count of answers by (route, status)."""
    failures, statuses = [], Counter()
    with httpx.Client(base_url=url, timeout=timeout) as client:
        for i, case in enumerate(cases):
            try:
                response = client.post(case.path, content=case.body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as e:
                statuses[case.path, "no answer"] += 1
                failures.append(f"case {i} {case.path} [{case.what}]: no answer ({type(e).__name__}: {e})")
                continue
            statuses[case.path, response.status_code] += 1
            problem = check(case, response)
            if problem:
                failures.append(f"case {i} {case.path} [{case.what}]: {problem}")
    return failures, statuses


def greedy_text(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_fuzzed_bodies_get_no_5xx_and_errors_in_the_api_format(server):
    before = greedy_text(server.url)
    log_start = len(server.read_log())
    cases = make_cases(SEED, CASES)
    failures, statuses = run_cases(server.url, cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed (seed {SEED}):\n" + "\n".join(failures[:30])
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert greedy_text(server.url) == before
    served = sum(n for (path, status), n in statuses.items() if status == 200 and path != "/api/show")
    assert served >= CASES // 20, statuses  # the mutations still leave requests that are served
    log = server.read_log()[log_start:]
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 500):][:3000]  # no step failed either


def test_the_cases_are_seeded_and_cover_every_route_and_class():
    a, b = make_cases(SEED, CASES), make_cases(SEED, CASES)
    assert a == b and make_cases(SEED + 1, 50) != a[:50]
    assert {c.path for c in a} == set(BASES)
    refused = " ".join(c.what for c in a if c.must_refuse)
    for kind in ("deep", "digit", "NaN", "surrogate", "UTF-8"):
        assert kind in refused, kind
