"""The real `ollama` client against `jaxserve serve`: generate and chat (NDJSON streams and single
objects), options, final stats, model listing routes; greedy text equals the offline LLM's."""
from __future__ import annotations

import asyncio
import json

import httpx
import ollama
import pytest

from jaxserve import SamplingParams
from serverlib import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
         "eval_duration")


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def test_greedy_chat_equals_the_offline_llm_and_reports_stats(client, smollm2_llm):
    want = smollm2_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    got = client.chat(model=MODEL, messages=QUESTION, options={**GREEDY, "num_predict": 16})
    assert got.message.role == "assistant" and got.message.content == want.outputs[0].text
    assert got.done and got.done_reason in ("stop", "length")
    assert got.prompt_eval_count == len(want.prompt_token_ids)
    assert got.eval_count == len(want.outputs[0].token_ids)
    for name in STATS:
        assert isinstance(got[name], int) and got[name] >= 0, name
    # Nanoseconds: the whole request took well over a microsecond and under a minute.
    assert 1_000 < got.total_duration < 60e9
    assert got.total_duration >= got.prompt_eval_duration + got.eval_duration


def test_generate_applies_the_template_unless_raw(client, smollm2_llm):
    prompt = "What is the capital of France?"
    want = smollm2_llm.chat([{"role": "user", "content": prompt}], SamplingParams(temperature=0, max_tokens=12),
                            use_tqdm=False)[0]
    got = client.generate(model=MODEL, prompt=prompt, options={**GREEDY, "num_predict": 12})
    assert got.response == want.outputs[0].text
    assert got.context == want.prompt_token_ids + want.outputs[0].token_ids
    raw_want = smollm2_llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8),
                                    use_tqdm=False)[0]
    raw = client.generate(model=MODEL, prompt="The capital of France is", raw=True,
                          options={**GREEDY, "num_predict": 8})
    assert raw.response == raw_want.outputs[0].text and raw.done_reason == "length"
    system = client.generate(model=MODEL, prompt=prompt, system="Answer in French.", keep_alive="5m",
                             options={**GREEDY, "num_predict": 4})
    tok = smollm2_llm.get_tokenizer()
    templated = tok.apply_chat_template([{"role": "system", "content": "Answer in French."},
                                         {"role": "user", "content": prompt}], tokenize=False,
                                        add_generation_prompt=True)
    assert system.context[:system.prompt_eval_count] == tok(templated, add_special_tokens=False).input_ids


def test_streamed_equals_non_streamed_seeded_on_both_routes(client):
    options = {"temperature": 0.9, "seed": 42, "num_predict": 20, "top_k": 50, "top_p": 0.95, "min_p": 0.01,
               "repeat_penalty": 1.05, "repeat_last_n": 64, "presence_penalty": 0.1, "frequency_penalty": 0.1}
    full = client.chat(model=MODEL, messages=QUESTION, options=options)
    parts = list(client.chat(model=MODEL, messages=QUESTION, options=options, stream=True))
    assert "".join(p.message.content for p in parts) == full.message.content
    assert all(not p.done for p in parts[:-1]) and parts[-1].done and parts[-1].message.content == ""
    assert parts[-1].eval_count == full.eval_count and parts[-1].done_reason == full.done_reason

    gen = client.generate(model=MODEL, prompt="Tell me a story.", options=options)
    gen_parts = list(client.generate(model=MODEL, prompt="Tell me a story.", options=options, stream=True))
    assert "".join(p.response for p in gen_parts) == gen.response
    assert gen_parts[-1].context == gen.context


def test_ndjson_is_the_default_and_stop_and_num_ctx_apply(server, client):
    with httpx.stream("POST", f"{server.url}/api/generate", timeout=60, json={
            "model": MODEL, "prompt": "Count: 1, 2, 3,", "raw": True, "options": {**GREEDY, "num_predict": 30}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        objects = [json.loads(line) for line in r.iter_lines() if line]
    text = "".join(o["response"] for o in objects)
    assert objects[-1]["done"] is True and len(objects) > 2
    assert "5" in text
    stopped = client.generate(model=MODEL, prompt="Count: 1, 2, 3,", raw=True,
                              options={**GREEDY, "num_predict": 30, "stop": ["5"]})
    assert stopped.response == text.split("5")[0] and stopped.done_reason == "stop"
    # num_ctx caps prompt + output: the default num_predict (-1) fills exactly what is left.
    small = client.generate(model=MODEL, prompt="Count: 1, 2, 3,", raw=True, options={**GREEDY, "num_ctx": 16})
    assert small.prompt_eval_count + small.eval_count <= 16 and small.done_reason in ("length", "stop")


def test_chat_logprobs(client):
    got = client.chat(model=MODEL, messages=QUESTION, options={**GREEDY, "num_predict": 5}, logprobs=True,
                      top_logprobs=2)
    assert len(got.logprobs) == got.eval_count
    assert "".join(lp.token for lp in got.logprobs) == got.message.content
    for lp in got.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 2 and lp.top_logprobs[0].token == lp.token


def test_empty_prompt_loads_the_model(client):
    got = client.generate(model=MODEL, prompt="")
    assert got.done and got.done_reason == "load" and got.response == ""
    chat = client.chat(model=MODEL, messages=[])
    assert chat.done and chat.done_reason == "load"


def test_tags_show_ps_version(server, client):
    tags = client.list()
    assert [m.model for m in tags.models] == [f"{MODEL}:latest"]
    model = tags.models[0]
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.quantization_level == "Q4_1" and model.size > 50_000_000
    show = client.show(f"{MODEL}:latest")
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.block_count"] == 30 and show.modelinfo["llama.context_length"] == 8192
    assert show.modelinfo["general.parameter_count"] > 100_000_000
    assert "<|im_start|>" in show.template and "stop" in show.parameters
    assert show.details.parameter_size.endswith("M")
    ps = client.ps()
    assert ps.models[0].model == f"{MODEL}:latest" and ps.models[0].context_length == 512
    assert httpx.get(f"{server.url}/api/version").json()["version"]


def test_errors_in_ollama_format(server, client):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=QUESTION)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="hi", images=["aGk="])
    assert e.value.status_code == 400 and "images" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="hi", options={"temperature": "hot"})
    assert e.value.status_code == 400 and "options.temperature" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="hi", options={"num_predict": -5})
    assert e.value.status_code == 400 and "num_predict" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model=MODEL, prompt="word " * 600)
    assert e.value.status_code == 400 and "context" in e.value.error
    for bad in (b"{not json", b"[1, 2]"):
        r = httpx.post(f"{server.url}/api/chat", content=bad)
        assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(f"{server.url}/api/chat", json={"messages": QUESTION})
    assert r.status_code == 400 and r.json() == {"error": "model is required"}
    r = httpx.get(f"{server.url}/api/nothing-here")
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_async_client_streams_the_same_text(server, client):
    options = {"temperature": 0.7, "seed": 9, "num_predict": 12}
    want = client.chat(model=MODEL, messages=QUESTION, options=options).message.content

    async def main():
        aclient = ollama.AsyncClient(host=server.url)
        parts = [p async for p in await aclient.chat(model=MODEL, messages=QUESTION, options=options, stream=True)]
        return "".join(p.message.content for p in parts)

    assert asyncio.run(main()) == want


GEN = b'{"model": "smollm2", "stream": false, "options": {"num_predict": 2}, '
# (route, raw body, the field the {"error"} message must name) for what the bounded parser refuses.
HOSTILE = [
    ("/api/generate", b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b', "prompt": "hi"}', "'model'"),
    ("/api/generate", GEN + b'"prompt": ' + b"[" * 65 + b"]" * 65 + b"}", "'prompt'"),
    ("/api/chat", b'{"model": "smollm2", "messages": [{"role": "user", "content": ' + b"[" * 100_000 + b"}]}",
     "'messages[0].content'"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "options": ' + b'{"a": ' * 2000 + b"{}" + b"}" * 2000
     + b"}", "'options.a'"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "options": {"stop": ' + b"[" * 70 + b"]" * 70 + b"}}",
     "'options.stop'"),
    ("/api/generate", GEN + b'"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "'seed'"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "options": {"seed": -' + b"1" * 300 + b"}}",
     "'options.seed'"),
    ("/api/generate", GEN + b'"prompt": "\\ud800a\\udc00"}', "'prompt'"),
    ("/api/generate", GEN + b'"prompt": "hi", "system": "be \\udfff"}', "'system'"),
    ("/api/chat", b'{"model": "smollm2", "messages": [{"role": "user", "content": "x\\udbff"}]}',
     "'messages[0].content'"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "options": {"temperature": NaN}}',
     "'options.temperature'"),
    ("/api/chat", b'{"model": "smollm2", "messages": [], "options": {"top_p": Infinity}}', "'options.top_p'"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "keep_alive": -Infinity}', "'keep_alive'"),
    ("/api/generate", b'{"model": "smollm2", "prompt": "hi", "options": {"num_predict": 1e400}}',
     "'options.num_predict'"),
    ("/api/show", b'{"model": "smollm2", "verbose": NaN}', "'verbose'"),
    ("/api/show", b'{"model": "\\ud800"}', "'model'"),
    ("/api/chat", b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff"}]}', "UTF-8"),
]


def test_hostile_bodies_are_refused_in_ollama_format_naming_the_field(server):
    for path, raw, field in HOSTILE:
        r = httpx.post(f"{server.url}{path}", content=raw, timeout=60)
        assert r.status_code == 400, (path, raw[:80], r.text)
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str), body
        assert field in body["error"], (field, body)
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("options, words", [
    ({"num_thread": "many"}, "options.num_thread"),
    ({"low_vram": {"a": 1}}, "options.low_vram"),
    ({"num_gpu": [1]}, "options.num_gpu"),
    ({"seed": 2 ** 64}, "options.seed"),
    ({"num_predict": 2, "stop": ["a", 1]}, "options.stop"),
    ({"stop_token_ids": [1]}, None),  # not an Ollama option: ignored, and the request runs
])
def test_option_types_are_checked_as_ollama_does(server, options, words):
    r = httpx.post(f"{server.url}/api/generate", timeout=60, json={
        "model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 2, **options}})
    if words is None:
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 400 and words in r.json()["error"], r.text


def test_top_logprobs_errors_name_top_logprobs_not_an_option(server):
    r = httpx.post(f"{server.url}/api/chat", timeout=60, json={
        "model": MODEL, "messages": QUESTION, "stream": False, "logprobs": True, "top_logprobs": 2 ** 40})
    assert r.status_code == 400 and r.json()["error"].startswith("top_logprobs must be"), r.text


def test_top_k_zero_and_past_any_vocabulary_keep_every_token(client):
    """llama.cpp's top-k is off for k <= 0; a k past the sampler's int32 used to fail the engine step."""
    for top_k in (0, -5, 2 ** 40):
        got = client.generate(model=MODEL, prompt="Hi", options={"top_k": top_k, "seed": 1, "num_predict": 2})
        assert got.done and got.eval_count == 2
