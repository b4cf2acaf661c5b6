"""A second server, configured through --config YAML, the environment and flags at once: the API
key guards /v1/* and /api/* (not /health), --max-queue refuses the overflow with 503, and SIGTERM
ends open streams and exits 0 within 10 s."""
from __future__ import annotations

import asyncio
import signal
import time

import httpx
import ollama
import openai
import pytest
import yaml

from serverlib import MODEL, ServerProcess

KEY = "s3cret-key"
# ChatML without SmolLM2's default system prompt: visible in /tokenize when --chat-template applies.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyed")
    config = folder / "serve.yaml"
    # The environment's key beats the file's; the --max-queue flag beats the file's max_queue.
    template = folder / "chatml.jinja"
    template.write_text(TEMPLATE)
    config.write_text(yaml.safe_dump({"api-key": "from-the-file", "max_queue": 0, "chat-template": str(template),
                                      "served-model-name": [MODEL, "alias"], "disable-log-requests": True}))
    srv = ServerProcess(["--config", str(config), "--max-queue", "1"], folder / "serve.log",
                        env={"JAXSERVE_API_KEY": KEY})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_profile_routes_are_404_without_a_profiler_dir(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    for path in ("/start_profile", "/stop_profile"):
        r = httpx.post(f"{keyed.url}{path}", headers=headers)
        assert r.status_code == 404 and "--profiler-dir" in r.json()["error"]["message"], r.text


def test_wrong_or_missing_key_is_401_in_each_family_format(keyed):
    for headers in ({}, {"Authorization": "Bearer from-the-file"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
                             ("GET", "/metrics")):
            r = httpx.request(method, f"{keyed.url}{path}", headers=headers, json={})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key" and set(r.json()["error"]) == {
                "message", "type", "param", "code"}
        for method, path in (("GET", "/api/tags"), ("POST", "/api/chat"), ("POST", "/api/generate")):
            r = httpx.request(method, f"{keyed.url}{path}", headers=headers, json={})
            assert r.status_code == 401 and set(r.json()) == {"error"}, (path, r.text)
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    assert httpx.head(f"{keyed.url}/health").status_code == 200
    refused = httpx.get(f"{keyed.url}/v1/models", headers={"X-Request-ID": "who-am-i"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "who-am-i"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url, headers={"Authorization": "Bearer wrong"}).list()
    assert e.value.status_code == 401


def test_the_right_key_works_and_config_names_are_served(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, "alias"]
    got = client.chat.completions.create(model="alias", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert got.model == "alias" and got.choices[0].message.content
    oll = ollama.Client(host=keyed.url, headers={"Authorization": f"Bearer {KEY}"})
    assert oll.generate(model="alias", prompt="Hi", options={"num_predict": 3}).done
    assert "jaxserve.server: request " not in keyed.read_log()  # disable-log-requests, from the file
    auth = {"Authorization": f"Bearer {KEY}"}
    by_template = httpx.post(f"{keyed.url}/tokenize", headers=auth,
                             json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    by_hand = httpx.post(f"{keyed.url}/tokenize", headers=auth, json={
        "prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "add_special_tokens": False}).json()
    assert by_template == by_hand["tokens"]
    assert oll.show("alias").template == TEMPLATE


def test_requests_beyond_max_queue_get_503(keyed):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{keyed.url}/v1", api_key=KEY, max_retries=0, timeout=300) as client:
            async def one(i):
                await asyncio.sleep(0.01 * i)
                try:
                    out = await client.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=64,
                                                          extra_body={"ignore_eos": True})
                    return out.usage.completion_tokens
                except openai.APIStatusError as e:
                    return e

            return await asyncio.gather(*(one(i) for i in range(12)))

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, Exception)]
    # 8 run (--max-num-seqs) and 1 may wait (--max-queue 1 from the flag, not the file's 0).
    assert [r for r in results if not isinstance(r, Exception)] == [64] * 9
    assert len(refused) == 3 and all(e.status_code == 503 for e in refused)
    assert refused[0].body["code"] == "queue_full"


def test_sigterm_ends_open_streams_and_exits_0_within_10_s(keyed):
    async def main():
        async with httpx.AsyncClient(base_url=keyed.url, timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            lines = []
            async with http.stream("POST", "/v1/completions", json={
                    "model": MODEL, "prompt": "Once", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                    if len(lines) == 3:
                        keyed.proc.send_signal(signal.SIGTERM)
                        sent = time.monotonic()
            return lines, sent

    try:
        lines, sent = asyncio.run(main())
    except httpx.HTTPError:  # the server may close the connection instead of finishing the stream
        lines, sent = [], time.monotonic()
    keyed.proc.wait(10)
    assert keyed.proc.returncode == 0
    assert time.monotonic() - sent < 10
    if lines:
        assert len(lines) < 400 and lines[-1] == "data: [DONE]"
