"""AsyncEngine over a scripted fake LLMEngine (no JAX): deltas, errors travelling back to the caller,
the queue limit and admissions held before tokenising, the tokenizer thread, aborts on cancellation,
engine faults, idling without spinning, shutdown."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from jaxserve.async_engine import (AsyncEngine, EngineClosedError, EngineStepError, QueueFullError,
                                   RequestRefusedError)
from jaxserve.engine import EngineStats
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams


class FakeEngine:
    """One token per request per step; token i of a request reads "w{i} ". Step count observable.
    Outputs as the params' output_kind asks (the AsyncEngine asks for DELTA or FINAL_ONLY)."""

    def __init__(self, max_num_seqs=2, step_seconds=0.0):
        self.tokenizer = SimpleNamespace(name="fake")
        self.max_model_len = 64
        self.vocab_size = 100
        self.max_num_seqs = max_num_seqs
        self.requests = {}
        self.scheduled = {}  # request id -> the time its first step began, reported as the engine does
        self.aborted = []
        self.steps = 0
        self.fail_next_step = False
        self.step_seconds = step_seconds
        self.thread_ids = set()

    def refresh_stats(self):
        return EngineStats(num_running=len(self.requests))

    @property
    def stats(self):  # read after each step when an on_step hook is set (the app sets one)
        return EngineStats(num_running=len(self.requests), steps=self.steps, last_step_seconds=self.step_seconds)

    lora_enabled = False

    def list_loras(self):
        return []

    def add_request(self, request_id, prompt, params, prompt_text=None, lora_request=None):
        self.thread_ids.add(threading.get_ident())
        if not prompt:
            raise ValueError("prompt must not be empty")
        self.requests[request_id] = (list(prompt), params, [[] for _ in range(params.n)])

    def abort_request(self, request_id):
        self.thread_ids.add(threading.get_ident())
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        time.sleep(self.step_seconds)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("device on fire")
        outs = []
        for rid, (prompt, params, children) in list(self.requests.items()):
            self.scheduled.setdefault(rid, time.monotonic())
            completions = []
            for i, toks in enumerate(children):
                toks.append(len(toks))
                done = len(toks) >= params.max_tokens
                new = toks[-1:] if params.output_kind is RequestOutputKind.DELTA else toks
                completions.append(CompletionOutput(i, "".join(f"w{t} " for t in new), list(new), None, None,
                                                    "length" if done else None))
            finished = all(c.finish_reason for c in completions)
            if finished:
                del self.requests[rid]
            if finished or params.output_kind is not RequestOutputKind.FINAL_ONLY:
                outs.append(RequestOutput(rid, None, prompt, completions, finished,
                                          metrics={"scheduled_time": self.scheduled[rid]}))
        return outs


async def _collect(stream):
    return [out async for out in stream]


def _run(coro):
    return asyncio.run(coro)


def test_deltas_concatenate_to_the_full_output_and_the_engine_runs_in_one_thread():
    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        engine.start()
        records = []
        engine.on_request_done = records.append
        stream = await engine.add_request("a", [1, 2], SamplingParams(max_tokens=4, n=2), log_id="client-1")
        async with stream:
            outs = await _collect(stream)
        await engine.shutdown()
        return fake, outs, records

    fake, outs, records = _run(main())
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    for i in range(2):
        text = "".join(c.text for o in outs for c in o.outputs if c.index == i)
        ids = [t for o in outs for c in o.outputs if c.index == i for t in c.token_ids]
        assert text == "w0 w1 w2 w3 " and ids == [0, 1, 2, 3]
    assert len(fake.thread_ids) == 1 and threading.get_ident() not in fake.thread_ids
    (record,) = records
    assert record.log_id == "client-1" and record.num_generation_tokens == 8 and record.num_prompt_tokens == 2
    assert record.finish_reasons == ("length", "length") and record.ttft is not None and record.e2e >= record.ttft
    assert 0 <= record.queue_time <= record.ttft  # the engine's admission time, as tracing spans show it


def test_a_refused_request_raises_to_the_caller_and_leaves_the_others_running():
    async def main():
        engine = AsyncEngine(FakeEngine())
        engine.start()
        good = await engine.add_request("good", [1], SamplingParams(max_tokens=3))
        with pytest.raises(RequestRefusedError, match="must not be empty"):
            await engine.add_request("bad", [], SamplingParams(max_tokens=3))
        outs = await _collect(good)
        good.close()
        open_after = engine.num_open_sequences
        await engine.shutdown()
        return outs, open_after

    outs, open_after = _run(main())
    assert outs[-1].finished and open_after == 0


def test_requests_beyond_max_queue_are_refused_until_room_frees():
    async def main():
        engine = AsyncEngine(FakeEngine(max_num_seqs=2, step_seconds=0.01), max_queue=1)
        engine.start()
        streams = [await engine.add_request(f"r{i}", [1], SamplingParams(max_tokens=50)) for i in range(3)]
        with pytest.raises(QueueFullError):
            await engine.add_request("r3", [1], SamplingParams(max_tokens=50))
        with pytest.raises(RequestRefusedError, match="n must be <= 3"):  # could never fit: the client's mistake
            await engine.add_request("r5", [1], SamplingParams(max_tokens=50, n=4))
        streams[0].close()  # an abort frees its place at once
        late = await engine.add_request("r4", [1], SamplingParams(max_tokens=2))
        await _collect(late)
        for s in streams + [late]:
            s.close()
        await engine.shutdown()

    _run(main())


def test_an_admission_holds_places_before_tokenising_and_gives_back_the_unused_ones():
    async def main():
        engine = AsyncEngine(FakeEngine(max_num_seqs=2, step_seconds=0.01), max_queue=1)
        engine.start()
        with engine.admit(2) as first:  # 2 of the 3 places, held while the prompt would be tokenised
            assert engine.num_open_sequences == 2
            with pytest.raises(QueueFullError):
                engine.admit(2)  # refused at once: no tokenising, no engine round trip
            stream = await engine.add_request("a", [1], SamplingParams(max_tokens=50), admission=first)
        assert engine.num_open_sequences == 1  # the unused place came back when the block closed
        more = [await engine.add_request(f"b{i}", [1], SamplingParams(max_tokens=50)) for i in range(2)]
        with pytest.raises(QueueFullError):
            await engine.add_request("b2", [1], SamplingParams(max_tokens=50))
        with pytest.raises(RequestRefusedError, match=r"n times the number of prompts must be <= 3 .*got 4"):
            engine.admit(4, what="n times the number of prompts")
        for s in [stream, *more]:
            s.close()
        with pytest.raises(ValueError, match="boom"):
            with engine.admit(3):
                raise ValueError("boom")  # a refusal while tokenising gives the places back too
        open_after = engine.num_open_sequences
        await engine.shutdown()
        with pytest.raises(EngineClosedError):
            engine.admit(1)
        return open_after

    assert _run(main()) == 0


def test_tokenising_runs_on_its_own_thread_with_its_own_tokenizer_copy():
    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        engine.start()
        seen = await engine.with_tokenizer(lambda tok: (threading.get_ident(), tok))
        beat = asyncio.ensure_future(asyncio.sleep(0.05))
        slow = engine.with_tokenizer(lambda tok: time.sleep(0.3))  # a long encode does not hold the loop
        done, _ = await asyncio.wait([beat, asyncio.ensure_future(slow)], return_when=asyncio.FIRST_COMPLETED)
        stream = await engine.add_request("r", [1], SamplingParams(max_tokens=1))
        await _collect(stream)
        stream.close()
        await engine.shutdown()
        return fake, engine, seen, beat in done

    fake, engine, (thread_id, tok), loop_was_free = _run(main())
    assert thread_id != threading.get_ident() and thread_id not in fake.thread_ids
    assert tok.name == "fake" and tok is not fake.tokenizer and tok is not engine.tokenizer
    assert loop_was_free


def test_cancelling_the_consumer_aborts_the_request():
    async def main():
        fake = FakeEngine(step_seconds=0.01)
        engine = AsyncEngine(fake)
        engine.start()

        async def consume():
            async with await engine.add_request("slow", [1], SamplingParams(max_tokens=10_000)) as stream:
                async for _ in stream:
                    pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not fake.requests:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return fake

    fake = _run(main())
    assert fake.aborted == ["slow"] and not fake.requests


def test_an_engine_fault_fails_the_running_requests_and_the_loop_carries_on():
    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        engine.start()
        fake.fail_next_step = True
        stream = await engine.add_request("x", [1], SamplingParams(max_tokens=5))
        with pytest.raises(EngineStepError, match="device on fire"):
            await _collect(stream)
        stream.close()
        after = await engine.add_request("y", [1], SamplingParams(max_tokens=2))
        outs = await _collect(after)
        after.close()
        await engine.shutdown()
        return fake, outs

    fake, outs = _run(main())
    assert "x" in fake.aborted and outs[-1].finished


def test_an_engine_bug_on_adding_is_logged_with_the_http_requests_id(caplog):
    async def main():
        fake = FakeEngine()
        fake.add_request = lambda *args, **kwargs: 1 / 0  # a bug, not a refusal (ValueError)
        engine = AsyncEngine(fake)
        engine.start()
        with pytest.raises(EngineStepError, match="could not take the request"):
            await engine.add_request("x", [1], SamplingParams(max_tokens=2), log_id="client-7")
        await engine.shutdown()

    with caplog.at_level(logging.ERROR, logger="jaxserve.async_engine"):
        _run(main())
    (record,) = [r for r in caplog.records if "add_request failed" in r.getMessage()]
    # The engine thread serves every request: it names the one it logs for (request_ids.XidFilter).
    assert record.xid == "client-7"


def test_idle_loop_sleeps_instead_of_spinning():
    async def main():
        fake = FakeEngine()
        engine = AsyncEngine(fake)
        engine.start()
        await asyncio.sleep(0.3)
        steps_idle = fake.steps
        stream = await engine.add_request("z", [1], SamplingParams(max_tokens=2))
        await _collect(stream)
        stream.close()
        await engine.shutdown()
        return steps_idle, engine

    steps_idle, engine = _run(main())
    assert steps_idle == 0 and not engine.is_running


def test_shutdown_ends_open_streams_with_abort_and_refuses_new_requests():
    async def main():
        engine = AsyncEngine(FakeEngine(step_seconds=0.01))
        engine.start()
        stream = await engine.add_request("long", [1], SamplingParams(max_tokens=10_000))
        reader = asyncio.ensure_future(_collect(stream))
        await asyncio.sleep(0.05)
        await engine.shutdown()
        outs = await asyncio.wait_for(reader, 5)
        with pytest.raises(EngineClosedError):
            await engine.add_request("late", [1], SamplingParams())
        return outs

    outs = _run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


def test_the_server_package_does_not_import_jax():
    code = ("import sys, jaxserve.server.app, jaxserve.async_engine; "
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_closing_a_stream_ends_a_reader_waiting_in_another_task():
    async def main():
        fake = FakeEngine(step_seconds=0.01)
        engine = AsyncEngine(fake)
        engine.start()
        stream = await engine.add_request("r", [1], SamplingParams(max_tokens=10_000))
        reader = asyncio.ensure_future(_collect(stream))
        await asyncio.sleep(0.05)
        stream.close()
        outs = await asyncio.wait_for(reader, 2)
        await engine.shutdown()
        return outs, fake

    outs, fake = _run(main())
    assert outs and not outs[-1].finished and fake.aborted == ["r"]
