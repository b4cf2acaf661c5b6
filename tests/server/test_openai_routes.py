"""The real `openai` SDK (sync and async) against `jaxserve serve`: models, completions, chat,
streaming, logprobs, n, stop, seeds, vLLM's extra fields, tokenizer routes; greedy text equals the
offline LLM's."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from jaxserve import SamplingParams
from serverlib import MODEL, metric, scrape

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert models.data[0].max_model_len == 512


def test_greedy_completion_equals_the_offline_llm(client, smollm2_llm):
    prompt = "The capital of France is"
    want = smollm2_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.object == "text_completion" and got.model == MODEL
    assert got.choices[0].text == want.outputs[0].text
    assert got.choices[0].finish_reason == want.outputs[0].finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_greedy_chat_equals_the_offline_llm(client, smollm2_llm):
    want = smollm2_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    got = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=20, temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    # Content given as text parts is the same message.
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    again = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=20, temperature=0)
    assert again.choices[0].message.content == want.outputs[0].text


def test_prompt_as_list_of_strings_and_as_token_ids(client, smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    prompts = ["1, 2, 3,", "The capital of France is"]
    want = [o.outputs[0].text for o in smollm2_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6),
                                                            use_tqdm=False)]
    got = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert [c.text for c in got.choices] == want
    ids = tok(prompts[1]).input_ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == want[1]
    batch_ids = client.completions.create(model=MODEL, prompt=[tok(p).input_ids for p in prompts], max_tokens=6,
                                          temperature=0)
    assert [c.text for c in batch_ids.choices] == want


def test_echo_and_logprobs_on_completions(client):
    prompt = "The capital of France is"
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == got.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert max(top.values()) == pytest.approx(value, abs=1e-4) and top[token] == pytest.approx(value)


def test_chat_logprobs_and_top_logprobs(client):
    got = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert "".join(item.token for item in content) == got.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode() == item.token
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_streamed_chat_equals_the_non_streamed_seeded_chat(client):
    kwargs = dict(model=MODEL, messages=QUESTION, max_tokens=24, temperature=1.0, seed=1234)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_equals_non_streamed_and_ends_with_one_done(server, client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=7)
    full = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    assert streamed == full.choices[0].text
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**kwargs, "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]) == full.choices[0].text


def test_n_seeds_and_stop(client):
    a = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, seed=5, n=2)
    b = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, seed=5, n=2)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens <= 24
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0,
                                                seed=5, n=2, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in a.choices]

    greedy = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    text = greedy.choices[0].message.content
    assert " is " in text
    stopped = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                             stop=[" is "])
    assert stopped.choices[0].message.content == text.split(" is ")[0]
    assert stopped.choices[0].finish_reason == "stop"
    kept = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0, stop=" is ",
                                          extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].message.content == text.split(" is ")[0] + " is "


def test_vllm_extra_sampling_fields(server, client):
    base = dict(model=MODEL, prompt="The capital of France is", max_tokens=8)
    greedy = client.completions.create(**base, temperature=0)
    top1 = client.completions.create(**base, temperature=1.0, seed=3, extra_body={"top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text
    long = client.completions.create(**base, temperature=0, extra_body={"ignore_eos": True, "min_tokens": 8,
                                                                          "min_p": 0.1, "repetition_penalty": 1.0})
    assert long.usage.completion_tokens == 8 and long.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0)
    tok_ids = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": chat.choices[0].message.content,
                                                         "add_special_tokens": False}).json()["tokens"]
    stop_at = tok_ids[2]
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=20, temperature=0,
                                         extra_body={"stop_token_ids": [stop_at], "skip_special_tokens": True})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].stop_reason == stop_at
    assert cut.usage.completion_tokens == tok_ids.index(stop_at) + 1


def test_async_client_concurrent_requests_match_sequential_ones(server, client):
    prompts = ["1, 2, 3,", "Paris is", "The sky is", "Water boils at"]
    want = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
            for p in prompts]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as aclient:
            outs = await asyncio.gather(*(aclient.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                                     temperature=0) for p in prompts))
            models = await aclient.models.list()
        return [o.choices[0].text for o in outs], models

    got, models = asyncio.run(main())
    assert got == want and models.data[0].id == MODEL


def test_tokenize_detokenize_health_version_metrics(server, smollm2_llm):
    tok = smollm2_llm.get_tokenizer()
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "Hello world"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tok("Hello world").input_ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()
    want = smollm2_llm.chat(QUESTION, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    assert chat["tokens"] == want
    back = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": body["tokens"]}).json()
    assert back == {"prompt": "Hello world"}
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    samples = scrape(server.url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total",
                 "prefix_cache_queries_total", "prompt_tokens_total", "generation_tokens_total",
                 "request_success_total", "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count"):
        assert any(k.startswith(f"jaxserve:{name}") for k in samples), name
    assert metric(samples, "jaxserve:generation_tokens_total") > 0


def test_request_id_is_echoed_or_generated_and_cors_headers_sent(server):
    r = httpx.get(f"{server.url}/v1/models", headers={"X-Request-ID": "abc-123", "Origin": "http://example.com"})
    assert r.headers["x-request-id"] == "abc-123"
    assert r.headers["access-control-allow-origin"] == "*"
    r = httpx.get(f"{server.url}/v1/models")
    assert len(r.headers["x-request-id"]) >= 16
    done = httpx.post(f"{server.url}/v1/completions", headers={"X-Request-ID": "logged-7"},
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
    assert done.headers["x-request-id"] == "logged-7"
    (line,) = [line for line in server.read_log().splitlines() if "request logged-7:" in line]
    assert "prompt_tokens=1 generation_tokens=3 ttft=" in line and "total=" in line
    pre = httpx.options(f"{server.url}/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "*"
