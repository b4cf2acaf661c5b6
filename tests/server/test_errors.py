"""Bad requests get a 4xx in the OpenAI error format and leave the server, and the valid requests
running beside them, untouched."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from serverlib import MODEL, metric, wait_idle

CHAT = "/v1/chat/completions"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
OK_CHAT = {"model": MODEL, "messages": QUESTION, "max_tokens": 8}

# (path, body or raw bytes, status, param the error must name (None: any), code (None: any))
BAD = [
    (CHAT, b'{"model": "smollm2", "messages": [', 400, None, "invalid_json"),
    (CHAT, b"[1, 2, 3]", 400, None, "invalid_json"),
    (CHAT, b"", 400, None, "invalid_json"),
    (CHAT, {**OK_CHAT, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    (CHAT, {**OK_CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    (CHAT, {**OK_CHAT, "messages": "hello"}, 400, "messages", "invalid_type"),
    (CHAT, {**OK_CHAT, "messages": [{"content": "no role"}]}, 400, "messages[0].role", None),
    (CHAT, {**OK_CHAT, "stream": "yes"}, 400, "stream", "invalid_type"),
    (CHAT, {"model": MODEL}, 400, "messages", "missing_required_parameter"),
    (CHAT, {"messages": QUESTION}, 400, "model", "missing_required_parameter"),
    (CHAT, {**OK_CHAT, "messages": []}, 400, "messages", None),
    (CHAT, {**OK_CHAT, "max_tokens": -1}, 400, "max_tokens", None),
    (CHAT, {**OK_CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    (CHAT, {**OK_CHAT, "n": 0}, 400, "n", None),
    (CHAT, {**OK_CHAT, "n": 600}, 400, "n", "invalid_value"),  # more than --max-num-seqs + --max-queue
    (CHAT, {**OK_CHAT, "top_p": 2}, 400, "top_p", None),
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    (CHAT, {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    # The engine's refusal, with the field named as the client sent it.
    (CHAT, {**OK_CHAT, "max_tokens": 5000}, 400, "max_tokens", "context_length_exceeded"),
    (CHAT, {**OK_CHAT, "max_completion_tokens": 5000}, 400, "max_completion_tokens", "context_length_exceeded"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages",
     "context_length_exceeded"),
    (CHAT, {**OK_CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    (CHAT, {**OK_CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type", "invalid_value"),
    (CHAT, {**OK_CHAT, "guided_json": {"type": "nonsense"}}, 400, "guided_json", "invalid_value"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content[0].type", None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, "a"]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": [999999]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": ["hi", "word " * 600]}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [1]}, 400, "stop", "invalid_type"),
    ("/v1/no-such-route", {}, 404, None, None),
    # What the bounded body parser refuses (server/validation.py), naming where it is.
    *[(path, raw, 400, param, "invalid_json") for path, raw, param in [
        (CHAT, b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b', "messages": []}', "model"),
        (CHAT, b'{"model": "smollm2", "messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"}]}",
         "messages[0].content"),
        (CHAT, b'{"model": "smollm2", "messages": [], "stop": ' + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}",
         "stop.a"),
        ("/v1/completions", b'{"model": "smollm2", "prompt": ' + b"[" * 65 + b"]" * 65 + b"}", "prompt"),
        ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "seed"),
        ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "any_field": -' + b"1" * 101 + b"}", "any_field"),
        ("/v1/completions", b'{"model": "smollm2", "prompt": "\\ud800a\\udc00"}', "prompt"),
        (CHAT, b'{"model": "smollm2", "messages": [{"role": "system", "content": "ok \\udfff"}]}',
         "messages[0].content"),
        (CHAT, b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
         "temperature"),
        ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "top_p": Infinity}', "top_p"),
        ("/v1/completions", b'{"model": "smollm2", "prompt": "hi", "max_tokens": 1e400}', "max_tokens"),
        ("/tokenize", b'{"model": "smollm2", "prompt": "\\udbff"}', "prompt"),
        ("/detokenize", b'{"model": "smollm2", "tokens": [1, -Infinity]}', "tokens[1]"),
        (CHAT, b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff"}]}', None),
    ]],
    # Valid JSON past what a field holds: refused by the field's own check.
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2 ** 64}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [2 ** 40]}, 400, "stop_token_ids",
     "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1e308}, 400, "max_tokens", "invalid_type"),
    (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 2 ** 40}, 400, "top_logprobs", "invalid_value"),
]


def _check_error(response: httpx.Response, status: int, param, code) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body


def test_bad_requests_get_4xx_while_valid_ones_beside_them_complete(server):
    want = httpx.post(f"{server.url}{CHAT}", json={**OK_CHAT, "temperature": 0}, timeout=60).json()
    finished_before = metric(wait_idle(server.url), "jaxserve:request_success_total")

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http, \
                openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
            async def valid():
                stream = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                                              temperature=0, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            async def bad(path, body):
                await asyncio.sleep(0.05)
                if isinstance(body, bytes):
                    return await http.post(path, content=body, headers={"Content-Type": "application/json"})
                return await http.post(path, json=body, headers={"X-Request-ID": f"bad-{path}"})

            valid_tasks = [asyncio.ensure_future(valid()) for _ in range(4)]
            responses = await asyncio.gather(*(bad(path, body) for path, body, *_ in BAD))
            return await asyncio.gather(*valid_tasks), responses

    texts, responses = asyncio.run(main())
    assert texts == [want["choices"][0]["message"]["content"]] * 4
    for (path, body, status, param, code), response in zip(BAD, responses):
        _check_error(response, status, param, code)
        if not isinstance(body, bytes):
            assert response.headers["x-request-id"] == f"bad-{path}"
    samples = wait_idle(server.url)
    assert metric(samples, "jaxserve:kv_cache_usage_perc") == 0.0
    # The engine ran the 4 valid requests and nothing else: every bad one was refused before it.
    assert metric(samples, "jaxserve:request_success_total") - finished_before == 4
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_body_too_large_is_413_in_the_right_format(server):
    big = {**OK_CHAT, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    _check_error(httpx.post(f"{server.url}{CHAT}", json=big, timeout=60), 413, None, None)
    r = httpx.post(f"{server.url}/api/chat", json={**big, "model": MODEL}, timeout=60)
    assert r.status_code == 413 and set(r.json()) == {"error"}


def test_the_openai_client_raises_the_matching_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-3)
    assert e.value.param == "max_tokens" and "max_tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, logit_bias={"5": 1.0})
    assert "not supported" in e.value.message and e.value.param == "logit_bias"
