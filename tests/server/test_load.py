"""Concurrency: 64 streamed chats at once all complete while /metrics shows a batch running; clients
that hang up half way leave the server healthy and the KV cache empty once idle."""
from __future__ import annotations

import asyncio

import httpx
import openai

from serverlib import MODEL, metric, scrape, wait_idle

QUESTIONS = [f"Write one sentence about the number {i}." for i in range(64)]


def test_64_concurrent_streamed_chats_complete_while_metrics_show_a_batch(server):
    before = scrape(server.url)

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=600) as client:
            async def one(i):
                stream = await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": QUESTIONS[i]}], max_tokens=16,
                    temperature=0.7, seed=i, stream=True)
                text, reasons = "", []
                async for chunk in stream:
                    for c in chunk.choices:
                        text += c.delta.content or ""
                        if c.finish_reason:
                            reasons.append(c.finish_reason)
                return text, reasons

            async def poll(done: asyncio.Event):
                peak = 0.0
                async with httpx.AsyncClient(timeout=10) as http:
                    while not done.is_set():
                        body = (await http.get(f"{server.url}/metrics")).text
                        for line in body.splitlines():
                            if line.startswith("jaxserve:num_requests_running"):
                                peak = max(peak, float(line.rsplit(" ", 1)[1]))
                        await asyncio.sleep(0.1)
                return peak

            done = asyncio.Event()
            poller = asyncio.ensure_future(poll(done))
            results = await asyncio.gather(*(one(i) for i in range(64)))
            done.set()
            return results, await poller

    results, peak = asyncio.run(main())
    assert len(results) == 64
    for text, reasons in results:
        assert text and len(reasons) == 1 and reasons[0] in ("stop", "length")
    assert peak > 1
    after = wait_idle(server.url)
    finished = metric(after, "jaxserve:request_success_total") - metric(before, "jaxserve:request_success_total")
    assert finished >= 64
    # Serving compiles nothing: every bucket the burst needs was compiled at warm-up.
    assert metric(after, "jaxserve:num_compiled_graphs") == metric(before, "jaxserve:num_compiled_graphs") > 0
    assert metric(after, "jaxserve:kv_cache_usage_perc") == 0.0


def test_clients_closing_streams_half_way_free_their_pages(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            async def hang_up(path, body):
                got = 0
                async with http.stream("POST", path, json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        got += bool(line.strip())
                        if got >= 3:
                            break  # leaving the block closes the connection mid-stream
                return got

            async def give_up(path, body):  # a non-streamed request the client stops waiting for
                try:
                    await asyncio.wait_for(http.post(path, json=body), 1.5)
                except asyncio.TimeoutError:
                    return 3
                return 0

            long = {"max_tokens": 400, "ignore_eos": True, "temperature": 0}
            return await asyncio.gather(
                give_up("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", **long}),
                give_up("/api/chat", {"model": MODEL, "stream": False, "options": {"num_predict": 400},
                                      "messages": [{"role": "user", "content": "Tell a story"}]}),
                *(hang_up("/v1/chat/completions", {"model": MODEL, "stream": True, **long,
                                                   "messages": [{"role": "user", "content": f"Tell story {i}"}]})
                  for i in range(3)),
                hang_up("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "stream": True, **long}),
                hang_up("/api/generate", {"model": MODEL, "prompt": "Tell a long story",
                                          "options": {"num_predict": 400, "temperature": 0}}))

    assert all(got >= 3 for got in asyncio.run(main()))
    # 7 x 400 tokens would take over 10 s to run out; aborted, they are gone within a few steps.
    samples = wait_idle(server.url, timeout=5)
    assert metric(samples, "jaxserve:num_requests_running") == 0
    assert metric(samples, "jaxserve:kv_cache_usage_perc") == 0.0
    assert 'finished_reason="abort"' in "".join(k for k in samples if k.startswith("jaxserve:request_success"))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    after = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert after.choices[0].message.content
