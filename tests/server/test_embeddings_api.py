"""`jaxserve serve` with all-MiniLM-L6-v2 through the real `openai` and `ollama` clients:
/v1/embeddings (float and base64), /api/embed and the legacy /api/embeddings against a
sentence-transformers-style reference; each API's truncation; bad input refused by field in each
API's format, the engine serving on after it; generation routes refused on an embedding model and
embedding routes on a generating one; concurrent requests; nothing compiles while serving."""
from __future__ import annotations

import asyncio
import base64
import subprocess

import httpx
import numpy as np
import ollama
import pytest
from openai import OpenAI

from serverlib import MODEL, running, scrape
from test_readme import README
from testlib import MINILM_ENGINE_ARGS, sentence_embeddings

NAME = "all-minilm"
TEXTS = ["A man is eating food.", "A man is riding a horse.", "Ein Mann isst Essen.", "x"]
LONG = " ".join(f"w{i}" for i in range(301))  # 833 tokens: past the 256-token limit


@pytest.fixture(scope="module")
def embed_server(minilm, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed_server")
    with running([minilm, "--served-model-name", NAME, "--max-num-seqs", str(MINILM_ENGINE_ARGS["max_num_seqs"]),
                 "--max-num-batched-tokens", str(MINILM_ENGINE_ARGS["max_num_batched_tokens"]),
                 "--max-model-len", "256"], folder / "serve.log", env={"HF_HUB_OFFLINE": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenize(minilm_hf):
    return lambda text, **kwargs: minilm_hf[1](text, **kwargs).input_ids


@pytest.fixture(scope="module")
def reference(minilm_hf):
    """token-id lists -> their sentence-transformers-style embeddings [n, 384]."""
    return lambda token_lists: sentence_embeddings(minilm_hf[0], token_lists)


def _cosines(vectors, reference) -> np.ndarray:
    vectors = np.asarray(vectors, np.float64)
    return np.sum(vectors * reference, axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(reference, axis=1)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_openai_client_embeddings_match_the_reference(embed_server, tokenize, reference):
    client = OpenAI(base_url=f"{embed_server.url}/v1", api_key="unused")
    ids = [tokenize(t) for t in TEXTS]
    got = client.embeddings.create(model=NAME, input=TEXTS)  # the SDK asks for base64 and decodes it
    assert [d.index for d in got.data] == [0, 1, 2, 3] and got.model == NAME
    assert _cosines([d.embedding for d in got.data], reference(ids)).min() >= 0.9999
    assert got.usage.prompt_tokens == got.usage.total_tokens == sum(map(len, ids))
    floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert [d.embedding for d in floats.data] == [d.embedding for d in got.data]
    # Token ids, one list or several, embed as their texts do.
    by_ids = client.embeddings.create(model=NAME, input=ids, encoding_format="float")
    assert np.allclose([d.embedding for d in by_ids.data], [d.embedding for d in floats.data], atol=1e-6)
    (one,) = client.embeddings.create(model=NAME, input=ids[1], encoding_format="float").data
    assert np.allclose(one.embedding, floats.data[1].embedding, atol=1e-6)


def test_base64_on_the_wire_is_little_endian_float32(embed_server):
    body = {"model": NAME, "input": TEXTS[0]}
    floats = _post(embed_server, "/v1/embeddings", body).json()
    packed = _post(embed_server, "/v1/embeddings", {**body, "encoding_format": "base64"}).json()
    assert packed["object"] == "list" and packed["data"][0]["object"] == "embedding"
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    assert decoded.shape == (384,) and decoded.tolist() == np.float32(floats["data"][0]["embedding"]).tolist()


def test_ollama_client_embed_and_legacy_embeddings(embed_server, tokenize, reference):
    client = ollama.Client(host=embed_server.url)
    ids = [tokenize(t) for t in TEXTS]
    got = client.embed(model=NAME, input=TEXTS, keep_alive="5m")
    assert got.model == NAME and len(got.embeddings) == 4
    assert _cosines(got.embeddings, reference(ids)).min() >= 0.9999
    assert got.prompt_eval_count == sum(map(len, ids))
    assert got.total_duration > 0 and got.load_duration == 0
    single = client.embed(model=f"{NAME}:latest", input=TEXTS[0])
    assert np.allclose(single.embeddings[0], got.embeddings[0], atol=1e-6)
    legacy = client.embeddings(model=NAME, prompt=TEXTS[0])
    assert np.allclose(legacy.embedding, got.embeddings[0], atol=1e-6)


def test_each_api_truncates_its_own_way(embed_server, tokenize, reference):
    ids = tokenize(LONG)
    # Ollama's truncate (true by default) keeps the first tokens, and [SEP].
    first = ollama.Client(host=embed_server.url).embed(model=NAME, input=LONG)
    assert first.prompt_eval_count == 256
    assert _cosines(first.embeddings, reference([[*ids[:255], ids[-1]]])).min() >= 0.9999
    # vLLM's truncate_prompt_tokens keeps the last ones, after [CLS].
    last = _post(embed_server, "/v1/embeddings", {"model": NAME, "input": LONG, "truncate_prompt_tokens": 12,
                                                  "encoding_format": "float"}).json()
    assert last["usage"]["prompt_tokens"] == 12
    vector = [last["data"][0]["embedding"]]
    assert _cosines(vector, reference([[ids[0], *ids[-11:]]])).min() >= 0.9999
    assert _cosines(vector, reference([[*ids[:11], ids[-1]]])).max() < 0.99  # not the first 11: it matters


def _openai_error(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error["param"]


def _ollama_error(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    return r.json()["error"]


@pytest.mark.parametrize("body, param", [
    ({"model": NAME}, "input"),
    ({"model": NAME, "input": ""}, "input"),
    ({"model": NAME, "input": []}, "input"),
    ({"model": NAME, "input": ["a", ""]}, "input[1]"),
    ({"model": NAME, "input": {"text": "a"}}, "input"),
    ({"model": NAME, "input": ["a", 3]}, "input"),
    ({"model": NAME, "input": [101, 30522, 102]}, "input"),
    ({"model": NAME, "input": [[101, 102], [101, -1, 102]]}, "input[1]"),
    ({"model": NAME, "input": ["a", LONG]}, "input[1]"),
    ({"model": NAME, "input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"model": NAME, "input": "a", "encoding_format": 1}, "encoding_format"),
    ({"model": NAME, "input": "a", "dimensions": 128}, "dimensions"),  # not a Matryoshka model
    ({"model": NAME, "input": "a", "dimensions": 0}, "dimensions"),
    ({"model": NAME, "input": "a", "dimensions": "128"}, "dimensions"),
    ({"model": NAME, "input": "a", "truncate_prompt_tokens": 1000}, "truncate_prompt_tokens"),
    ({"model": NAME, "input": "a", "truncate_prompt_tokens": -5}, "truncate_prompt_tokens"),
])
def test_openai_bad_input_is_refused_by_field(embed_server, body, param):
    assert _openai_error(_post(embed_server, "/v1/embeddings", body)) == param


@pytest.mark.parametrize("path, body, words", [
    ("/api/embed", {"model": NAME}, "input is required"),
    ("/api/embed", {"model": NAME, "input": ""}, "'input' must not be empty"),
    ("/api/embed", {"model": NAME, "input": []}, "input must not be empty"),
    ("/api/embed", {"model": NAME, "input": [1, 2]}, "input must be a string or an array of strings"),
    ("/api/embed", {"model": NAME, "input": ["a", LONG], "truncate": False},
     "input[1] has 833 tokens, more than this model's input limit of 256"),
    ("/api/embed", {"model": NAME, "input": "a", "truncate": "no"}, "'truncate' must be a boolean"),
    ("/api/embed", {"model": NAME, "input": "a", "dimensions": 128}, "dimensions is only supported by Matryoshka"),
    ("/api/embed", {"model": NAME, "input": "a", "dimensions": -1}, "dimensions must be >= 1"),
    ("/api/embed", {"model": NAME, "input": "a", "keep_alive": [1]}, "keep_alive must be a duration"),
    ("/api/embeddings", {"model": NAME, "prompt": ""}, "prompt must not be empty"),
    ("/api/embeddings", {"model": NAME, "prompt": 5}, "'prompt' must be a string"),
])
def test_ollama_bad_input_is_refused_by_field(embed_server, path, body, words):
    assert words in _ollama_error(_post(embed_server, path, body))


def test_the_engine_serves_on_after_bad_input(embed_server):
    _post(embed_server, "/v1/embeddings", {"model": NAME, "input": [[101, 2 ** 40]]})
    _post(embed_server, "/api/embed", {"model": NAME, "input": LONG, "truncate": False})
    r = _post(embed_server, "/v1/embeddings", {"model": NAME, "input": "still here"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    assert httpx.get(f"{embed_server.url}/health", timeout=10).status_code == 200


def test_generation_routes_refuse_an_embedding_model(embed_server):
    chat = [{"role": "user", "content": "Hi"}]
    for path, body in (("/v1/completions", {"model": NAME, "prompt": "Hi"}),
                       ("/v1/chat/completions", {"model": NAME, "messages": chat})):
        r = _post(embed_server, path, body)
        assert _openai_error(r) == "model" and "is an embedding model" in r.json()["error"]["message"]
    for path, body, word in (("/api/generate", {"model": NAME, "prompt": "Hi"}, "generate"),
                             ("/api/generate", {"model": NAME}, "generate"),
                             ("/api/chat", {"model": NAME, "messages": chat}, "chat")):
        assert _ollama_error(_post(embed_server, path, body)) == f'"{NAME}" does not support {word}'
    with pytest.raises(ollama.ResponseError, match="does not support chat"):
        ollama.Client(host=embed_server.url).chat(model=NAME, messages=chat)
    show = _post(embed_server, "/api/show", {"model": NAME}).json()
    assert show["capabilities"] == ["embedding"] and show["details"]["family"] == "bert"


def test_embedding_routes_refuse_a_generating_model(server):
    r = _post(server, "/v1/embeddings", {"model": MODEL, "input": "Hi"})
    assert _openai_error(r) == "model" and "does not support the Embeddings API" in r.json()["error"]["message"]
    for path, body in (("/api/embed", {"model": MODEL, "input": "Hi"}),
                       ("/api/embeddings", {"model": MODEL, "prompt": "Hi"})):
        assert _ollama_error(_post(server, path, body)) == f'"{MODEL}" does not support embeddings'
    assert _post(server, "/api/show", {"model": MODEL}).json()["capabilities"] == ["completion"]


def test_concurrent_requests_compile_nothing_and_get_their_own_vectors(embed_server, tokenize):
    compiled = scrape(embed_server.url)['jaxserve:num_compiled_graphs{model_name="all-minilm"}']
    assert compiled == 5  # every bucket, at warm-up
    texts = [f"request {i}: " + " ".join(["token"] * (i * 7)) for i in range(24)]  # 4 to 170 tokens

    async def main():
        async with httpx.AsyncClient(base_url=embed_server.url, timeout=120) as client:
            together = await asyncio.gather(*(client.post("/v1/embeddings", json={
                "model": NAME, "input": [t], "encoding_format": "float"}) for t in texts))
            alone = (await client.post("/v1/embeddings", json={
                "model": NAME, "input": texts, "encoding_format": "float"})).json()
        return [r.json()["data"][0]["embedding"] for r in together], [d["embedding"] for d in alone["data"]]

    together, alone = asyncio.run(main())
    assert np.allclose(together, alone, atol=1e-5)
    assert scrape(embed_server.url)['jaxserve:num_compiled_graphs{model_name="all-minilm"}'] == compiled


# The fuzz of tests/server/test_fuzz.py, aimed at the embedding routes of this server.
FUZZ_BASES = {"/v1/embeddings": {"model": NAME, "input": TEXTS[:2], "encoding_format": "float"},
              "/api/embed": {"model": NAME, "input": TEXTS[0]},
              "/api/embeddings": {"model": NAME, "prompt": TEXTS[0]}}
FUZZ_FIELDS = {"/v1/embeddings": ["model", "input", "encoding_format", "dimensions", "truncate_prompt_tokens", "user"],
               "/api/embed": ["model", "input", "truncate", "dimensions", "keep_alive", "options"],
               "/api/embeddings": ["model", "prompt", "keep_alive", "options"]}


def test_fuzzed_embedding_bodies_get_no_5xx_and_errors_in_the_api_format(embed_server, monkeypatch):
    import test_fuzz

    monkeypatch.setattr(test_fuzz, "BASES", FUZZ_BASES)
    monkeypatch.setattr(test_fuzz, "FIELDS", FUZZ_FIELDS)
    log_start = len(embed_server.read_log())
    cases = test_fuzz.make_cases(test_fuzz.SEED, 150, model=NAME)
    failures, statuses = test_fuzz.run_cases(embed_server.url, cases)
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:30])
    assert sum(n for (_, status), n in statuses.items() if status == 200) >= len(cases) // 30, statuses
    assert _post(embed_server, "/v1/embeddings", {"model": NAME, "input": "still here"}).status_code == 200
    log = embed_server.read_log()[log_start:]
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 500):][:3000]


def test_readme_embedding_curl_examples_work(embed_server):
    section = open(README).read().split("## Embeddings", 1)[1].split("\n## ", 1)[0]
    commands = [c for c in section.splitlines() if c.startswith("curl ")]
    assert {"/v1/embeddings", "/api/embed"} <= {c.split("8000", 1)[1].split()[0] for c in commands}
    for command in commands:
        command = command.replace("http://127.0.0.1:8000", embed_server.url).replace("curl ", "curl -sS --fail-with-body ")
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and '"embedding' in done.stdout, (command, done.stdout[-300:], done.stderr[-300:])
