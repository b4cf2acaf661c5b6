"""`AsyncEngine`: the LLMEngine run by one background thread, fed and read from asyncio.

The thread owns all engine state. The event loop hands it adds and aborts through a thread-safe
inbox, applied at the top of each loop iteration, and gets back per request an asyncio.Queue of
output deltas (via ``call_soon_threadsafe``). A second thread does the tokenising and chat-template
rendering, so the event loop stays free to refuse a burst's overflow at once (``admit``); a
request's structured-output constraint is compiled on a worker thread before the request is
queued, so the engine thread never stops its steps to compile one. Embedding requests (``embed``,
on a pooling model) are tokenised on the tokenizer thread too, then embedded on the engine thread,
every request waiting in the inbox in one batch. LoRA adapters loaded at runtime are read and
checked on a worker thread; the engine thread only registers them.
``server/`` reaches the engine only through this class, so it never imports JAX.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable, TypeVar

from jaxserve.lora import LoRARequest
from jaxserve.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from jaxserve.pooling_params import PoolingParams
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
# models/registry.py's capability names, spelled out: importing jaxserve.models starts JAX.
GENERATE, EMBED = "generate", "embed"


class RequestRefusedError(ValueError):
    """The engine cannot serve this request as asked (LLMEngine.add_request's ValueError); nothing
    changed. The client's mistake: a 400; ``param`` names the field when one is known, ``code``
    says what was wrong with it (OpenAI's codes: invalid_value, context_length_exceeded)."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code

    def renamed(self, names: dict[str, str]) -> "RequestRefusedError":
        """The same refusal with its field named as the caller's API names it."""
        param = names.get(self.param, self.param)
        message = str(self)
        if param != self.param and message.startswith(f"{self.param} "):
            message = f"{param} {message[len(self.param) + 1:]}"
        return RequestRefusedError(message, param, self.code)


def _refusal(error: ValueError) -> RequestRefusedError:
    """The engine's ValueError as a refusal (the InputProcessor's RequestValidationError names the field)."""
    return RequestRefusedError(str(error), getattr(error, "param", None), getattr(error, "code", "invalid_value"))


class QueueFullError(RuntimeError):
    """More requests are waiting than --max-queue allows; the client should retry later."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


class EngineStepError(RuntimeError):
    """The engine failed while this request was running (a server fault, not the client's)."""


@dataclasses.dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one finished (or aborted) request cost, for the request log and /metrics."""
    request_id: str
    log_id: str                       # the client-facing id (X-Request-ID) the logs show
    prompt: str | None
    num_prompt_tokens: int
    num_generation_tokens: int        # over all n completions
    arrival_time: float               # time.monotonic() when add_request was called
    first_token_time: float | None
    finish_time: float
    finish_reasons: tuple[str, ...]   # one per completion; "abort" when the client left
    scheduled_time: float | None = None  # when the scheduler first admitted it (None: never, or an embedding)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        per_seq = self.num_generation_tokens / max(1, len(self.finish_reasons))
        if self.first_token_time is None or per_seq < 2:
            return None
        return (self.finish_time - self.first_token_time) / (per_seq - 1)


class _Progress:
    """Engine-thread bookkeeping of one request's stream: the engine's outputs are already deltas
    (RequestOutputKind.DELTA, or the one FINAL_ONLY output); this drops the pieces that carry
    nothing new and stamps the stream's own times on the rest."""

    def __init__(self, request_id: str, n: int, arrival: float):
        self.request_id = request_id
        self.arrival = arrival
        self.scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.done = [False] * n

    def delta(self, out: RequestOutput, now: float) -> RequestOutput | None:
        """The engine's output as this stream's next delta (None: nothing new in it); `out` is
        the engine's own object, made for this step, so it is taken over rather than copied."""
        done = self.done
        pieces = out.outputs
        if len(pieces) != 1 or done[pieces[0].index] or not (pieces[0].token_ids or pieces[0].finish_reason):
            # n > 1 outputs carry every completion, finished and idle ones too.
            pieces = [c for c in pieces if not done[c.index] and (c.text or c.token_ids or c.finish_reason)]
        for c in pieces:
            if c.finish_reason is not None:
                done[c.index] = True
        if self.first_token_time is None and any(c.token_ids for c in pieces):
            # The engine's own times of admission and first token: a FINAL_ONLY output comes at the end.
            self.scheduled_time = out.metrics.get("scheduled_time")
            self.first_token_time = out.metrics.get("first_token_time") or now
        if not pieces and not out.finished:
            return None
        out.outputs = pieces
        out.metrics = dict(arrival_time=self.arrival, scheduled_time=self.scheduled_time,
                           first_token_time=self.first_token_time)
        if out.finished:
            out.metrics["finish_time"] = now
        return out

    def aborted(self, now: float) -> RequestOutput:
        """The closing delta of a request the engine dropped (shutdown or an engine fault)."""
        pieces = [CompletionOutput(i, "", [], None, None, "abort") for i, d in enumerate(self.done) if not d]
        return RequestOutput(self.request_id, None, [], pieces, True, metrics=dict(
            arrival_time=self.arrival, scheduled_time=self.scheduled_time, first_token_time=self.first_token_time,
            finish_time=now))


class Admission:
    """Sequence places held for one HTTP request from its arrival, before any tokenising, so that a
    burst's overflow is refused at once; its engine requests take their places from it, and closing
    it (leaving the ``with`` block) gives back the places no request took. Event-loop thread only."""

    def __init__(self, engine: "AsyncEngine", num_seqs: int):
        self._engine = engine
        self.remaining = num_seqs

    def take(self, n: int) -> None:
        if n > self.remaining:
            raise RuntimeError(f"this admission holds {self.remaining} sequence places, not {n}")
        self.remaining -= n

    def close(self) -> None:
        self._engine._num_seqs -= self.remaining
        self.remaining = 0

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_CLOSED = object()  # queued by RequestStream.close() so that a pending reader returns


class RequestStream:
    """The outputs of one request, as an async iterator of deltas; closing it early aborts it.

    Use ``async with stream:`` (or call ``close()``) so that a handler that stops reading — a
    client that disconnected, an exception — frees the request's KV pages.
    """

    def __init__(self, engine: "AsyncEngine", request_id: str, params: SamplingParams, log_id: str,
                 prompt: str | None):
        self.request_id = request_id
        self.params = params
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()
        self._log_id = log_id
        self._prompt = prompt
        self._finished = False
        self._closed = False
        self._num_prompt_tokens = 0
        self._num_generated = 0
        self._reasons: dict[int, str] = {}
        self._metrics: dict = {}

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CLOSED:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._observe(item)
        return item

    def _observe(self, out: RequestOutput) -> None:
        if out.prompt_token_ids:
            self._num_prompt_tokens = len(out.prompt_token_ids)
        for c in out.outputs:
            self._num_generated += len(c.token_ids)
            if c.finish_reason is not None:
                self._reasons[c.index] = c.finish_reason
        self._metrics.update(out.metrics)
        self._finished = out.finished

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Abort the request unless it finished; report it once. Idempotent, event-loop thread only."""
        if self._closed:
            return
        self._closed = True
        now = time.monotonic()
        if not self._finished:
            self._engine._post(("abort", self.request_id))
            self._queue.put_nowait(_CLOSED)  # a reader still waiting (another task) ends too
        reasons = tuple(self._reasons.get(i, "abort") for i in range(self.params.n))
        self._engine._forget(self.request_id, self.params.n)
        self._engine._report(RequestRecord(
            self.request_id, self._log_id, self._prompt, self._num_prompt_tokens, self._num_generated,
            self._metrics.get("arrival_time", now), self._metrics.get("first_token_time"),
            self._metrics.get("finish_time", now), reasons, self._metrics.get("scheduled_time")))


class AsyncEngine:
    """Serve an LLMEngine to asyncio code. Call ``start()`` inside the running event loop.

    ``max_queue``: sequences allowed to wait beyond the ``max_num_seqs`` the engine runs at once
    (Ollama's OLLAMA_MAX_QUEUE); more are refused with QueueFullError.
    ``on_request_done``: called on the event loop with a RequestRecord when a request ends, in the
    task that closed its stream or awaited ``embed`` (so the caller's context variables are set).
    ``on_step``: called on the engine thread with each step's seconds (keep it cheap and thread-safe).
    """

    def __init__(self, engine, *, max_queue: int = 512,
                 on_request_done: Callable[[RequestRecord], None] | None = None,
                 on_step: Callable[[float], None] | None = None):
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.engine = engine
        # HF fast tokenizers are not safe to share between threads (encode may reconfigure the
        # Rust object), so each thread has its own copy: the engine thread keeps the original, the
        # event loop decodes single tokens with ``tokenizer``, and the tokenizer thread
        # (``with_tokenizer``) does the heavy encodes and template renders with a third.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._worker_tokenizer = copy.deepcopy(engine.tokenizer)
        self._tokenizer_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # What the model does: (GENERATE,) for an LLMEngine, (EMBED,) for a PoolingEngine.
        self.capabilities: tuple[str, ...] = getattr(engine, "capabilities", (GENERATE,))
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.vocab_size
        self.max_num_seqs: int = engine.max_num_seqs
        self.max_queue = max_queue
        self.on_request_done = on_request_done
        self.on_step = on_step
        self._steps_reported = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        # Event-loop side only: the open streams and the sequences they hold, the registered adapters.
        self._streams: dict[str, RequestStream] = {}
        self._num_seqs = 0
        self.lora_enabled: bool = engine.lora_enabled
        self.loras: dict[str, LoRARequest] = {r.lora_name: r for r in engine.list_loras()}
        self._lora_ids = itertools.count(1 + max((r.lora_int_id for r in self.loras.values()), default=0))
        # Engine-thread side only.
        self._progress: dict[str, _Progress] = {}
        self._stats = dataclasses.replace(engine.refresh_stats(), step_seconds=[])

    # ---- event-loop API ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        # One thread: the encodes are short, and one worker needs only one tokenizer copy.
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-tokenizer")
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_open_sequences(self) -> int:
        return self._num_seqs

    def admit(self, num_seqs: int, *, what: str = "n") -> Admission:
        """Hold ``num_seqs`` sequence places for a request that has just arrived, or refuse it now.

        Use it as ``with engine.admit(n) as admission:`` around tokenising and ``add_request(...,
        admission=admission)``. Raises EngineClosedError, RequestRefusedError (``num_seqs`` could
        never fit; ``what`` names it in the message) or QueueFullError (no room now).
        """
        if not self._accepting or not self.is_running:
            raise EngineClosedError("the server is shutting down")
        capacity = self.max_num_seqs + self.max_queue
        if num_seqs > capacity:
            raise RequestRefusedError(f"{what} must be <= {capacity} (--max-num-seqs plus --max-queue), "
                                      f"got {num_seqs}", param="n")
        if self._num_seqs + num_seqs > capacity:
            raise QueueFullError(f"server busy: more than {self.max_queue} sequences waiting "
                                 f"(--max-queue); retry later")
        self._num_seqs += num_seqs
        return Admission(self, num_seqs)

    async def with_tokenizer(self, work: Callable[[Any], T]) -> T:
        """``work(tokenizer)`` on the tokenizer thread, with that thread's own tokenizer copy: long
        prompts and chat templates are encoded there, not on the event loop."""
        if self._tokenizer_pool is None:
            raise EngineClosedError("the engine is not started")
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, work,
                                                                self._worker_tokenizer)

    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                          prompt_text: str | None = None, log_id: str | None = None,
                          admission: Admission | None = None, stream: bool = True,
                          lora_request: LoRARequest | None = None) -> RequestStream:
        """Queue a request and return its stream once the engine accepted it. stream=False: the
        caller wants the finished output only, which is all the stream then yields (the engine
        builds no output per step for it: RequestOutputKind.FINAL_ONLY).

        With ``admission`` the request takes its ``params.n`` places from it (already counted against
        --max-queue); without, it is admitted here. Raises RequestRefusedError (the request cannot be
        served, nothing changed), QueueFullError or EngineClosedError.
        """
        if request_id in self._streams:
            raise RequestRefusedError(f"request id {request_id!r} is already in use")
        # The engine cuts the deltas (the stream yields nothing else) or builds only the last output.
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA if stream
                                     else RequestOutputKind.FINAL_ONLY)
        if admission is None:
            admission = self.admit(params.n)
        elif not self._accepting or not self.is_running:
            raise EngineClosedError("the server is shutting down")
        admission.take(params.n)  # the stream holds these places now; _forget gives them back
        text = prompt_text if prompt_text is not None else (prompt if isinstance(prompt, str) else None)
        stream = RequestStream(self, request_id, params, log_id or request_id, text)
        self._streams[request_id] = stream
        arrival = time.monotonic()
        try:
            if params.structured_outputs is not None:
                await self._compile(params.structured_outputs)
            accepted = self._loop.create_future()
            self._post(("add", request_id, prompt, params, prompt_text, accepted, arrival, lora_request,
                        log_id or request_id))
            await accepted
        except asyncio.CancelledError:
            stream.close()  # the add may have landed already: the abort queued behind it undoes it
            raise
        except BaseException:
            stream._finished = True
            self._forget(request_id, params.n)
            raise
        return stream

    async def embed(self, prompts: list, params: PoolingParams, *, log_id: str | None = None
                    ) -> list[EmbeddingRequestOutput]:
        """Embed every prompt (text or token ids) of one request, in order. Tokenised and checked
        on the tokenizer thread, embedded on the engine thread beside any other request waiting
        there. Raises RequestRefusedError (the model cannot embed, or an input is refused: its
        field named as the engine names it, "prompt[i]"), EngineClosedError or EngineStepError."""
        if EMBED not in self.capabilities:
            raise RequestRefusedError("this model does not support embeddings: it runs with runner 'generate' "
                                      "(serve it with --runner pooling to embed with it)", param="model")
        if not self._accepting or not self.is_running:
            raise EngineClosedError("the server is shutting down")
        arrival = time.monotonic()
        try:
            token_lists = await self.with_tokenizer(lambda tokenizer: self.engine.process(prompts, params, tokenizer))
        except ValueError as e:
            raise _refusal(e) from None
        done = self._loop.create_future()
        self._post(("embed", token_lists, params, done))
        vectors = await done
        request_id = f"embd-{uuid.uuid4().hex}"
        self._report(RequestRecord(request_id, log_id or request_id, None, sum(len(ids) for ids in token_lists), 0,
                                   arrival, None, time.monotonic(), ("stop",)))
        return [EmbeddingRequestOutput(f"{request_id}-{i}", EmbeddingOutput(v), ids)
                for i, (v, ids) in enumerate(zip(vectors, token_lists))]

    async def _compile(self, so) -> None:
        """Compile a constraint into the engine's grammar cache (GrammarCompiler) before queueing
        its request, so the engine thread's add_request finds it there instead of compiling while
        every running request waits for its next step. The wait runs on a worker thread of the
        loop's, not the tokenizer thread: other requests' prompts keep being encoded meanwhile.
        Raises RequestRefusedError."""
        try:
            await asyncio.to_thread(self.engine.grammars.compile, so)
        except ValueError as e:
            raise _refusal(e) from None

    async def load_lora(self, lora_name: str, lora_path: str) -> LoRARequest:
        """Register an adapter under a new id: its files are read and checked on a worker thread,
        then the engine thread registers it between steps. Raises the engine's LoRAAdapterError
        (a ValueError; ``not_found`` when its files are missing)."""
        request = LoRARequest(lora_name, next(self._lora_ids), lora_path)  # taken now: concurrent loads differ
        adapter = await asyncio.to_thread(self.engine.read_lora, request)
        await self._on_engine_thread(lambda: self.engine.add_lora(request, adapter))
        self.loras[lora_name] = request
        return request

    async def unload_lora(self, lora_name: str) -> bool:
        """Unregister an adapter (requests already queued with it finish); False if unknown."""
        removed = await self._on_engine_thread(lambda: self.engine.remove_lora(lora_name))
        self.loras.pop(lora_name, None)
        return removed

    async def _on_engine_thread(self, work: Callable[[], T]) -> T:
        """work() run by the engine thread between steps (it owns the engine's state)."""
        if not self._accepting or not self.is_running:
            raise EngineClosedError("the server is shutting down")
        done = self._loop.create_future()
        self._post(("call", work, done))
        return await done

    def check_request(self, token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own checks of a tokenised request (its InputProcessor, which reads only
        settings), without queueing it: a caller adding several requests checks them all first,
        so that none runs when one would be refused. Raises RequestRefusedError."""
        try:
            self.engine.input_processor.check(token_ids, params)
        except ValueError as e:
            raise _refusal(e) from None

    def stats(self):
        """The latest EngineStats snapshot published by the engine thread (gauges and counters)."""
        return self._stats

    @property
    def profiler_dir(self) -> str | None:
        """Where start_profile writes traces; None: profiling is off."""
        return self.engine.profiler.trace_dir

    async def start_profile(self) -> str:
        """Start a JAX profiler trace of the following engine steps; returns its folder."""
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.profiler.start)

    async def stop_profile(self) -> str:
        """Stop the trace (writing it out takes a moment); returns the run folder."""
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.profiler.stop)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Refuse new requests, end every open stream with finish_reason "abort", join the thread."""
        self._accepting = False
        if self._tokenizer_pool is not None:
            self._tokenizer_pool.shutdown(wait=False)  # queued encodes finish, then meet EngineClosedError
        if self._thread is None:
            return
        self._post(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop within %.1f s", timeout)

    # ---- event-loop internals ------------------------------------------------------------------

    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    def _forget(self, request_id: str, n: int) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._num_seqs -= n

    def _report(self, record: RequestRecord) -> None:
        if self.on_request_done is not None:
            try:
                self.on_request_done(record)
            except Exception:  # a logging or metrics bug must not break the request path
                logger.exception("on_request_done failed for %s", record.request_id)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream._queue.put_nowait(item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is not None:
                stream._queue.put_nowait(out)

    # ---- engine thread -------------------------------------------------------------------------

    def _send(self, request_id: str, item) -> None:
        self._loop.call_soon_threadsafe(self._deliver, request_id, item)

    @staticmethod
    def _resolve(future: asyncio.Future, error: BaseException | None, result: Any = None) -> None:
        if future.cancelled():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def _apply_inbox(self) -> bool:
        """Apply queued adds and aborts, embed the queued embedding requests together; True when
        a stop was asked for."""
        stop, embeds = False, []
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                if embeds:
                    self._embed(embeds)
                return stop
            kind = message[0]
            if kind == "add":
                _, request_id, prompt, params, prompt_text, future, arrival, lora_request, log_id = message
                error = None
                try:
                    if lora_request is not None and not any(r.lora_name == lora_request.lora_name
                                                            for r in self.engine.list_loras()):
                        # Unloaded since the route looked it up: as unknown as any other name.
                        raise RequestRefusedError(f"The model `{lora_request.lora_name}` does not exist.",
                                                  param="model", code="model_not_found")
                    self.engine.add_request(request_id, prompt, params, prompt_text=prompt_text,
                                            lora_request=lora_request)
                    self._progress[request_id] = _Progress(request_id, params.n, arrival)
                except ValueError as e:
                    error = _refusal(e)
                except Exception as e:  # a bug, not the client's mistake: keep the loop alive
                    # This thread serves every request: the log line names its HTTP request itself.
                    logger.exception("add_request failed for %s", request_id, extra={"xid": log_id})
                    error = EngineStepError(f"the engine could not take the request: {e}")
                self._loop.call_soon_threadsafe(self._resolve, future, error)
            elif kind == "call":
                _, work, future = message
                try:
                    result, error = work(), None
                except Exception as e:  # the caller's to handle: the loop carries on
                    result, error = None, e
                self._loop.call_soon_threadsafe(self._resolve, future, error, result)
            elif kind == "abort":
                self._progress.pop(message[1], None)
                try:
                    self.engine.abort_request(message[1])
                except Exception:  # the loop must outlive any one request
                    logger.exception("abort_request failed for %s", message[1])
            elif kind == "embed":
                embeds.append(message[1:])
            elif kind == "stop":
                stop = True

    def _embed(self, jobs: list[tuple[list[list[int]], PoolingParams, asyncio.Future]]) -> None:
        """Every waiting request's texts in one pooling run; each request's vectors finished as it
        asked and handed back to it."""
        try:
            vectors = self.engine.run([ids for token_lists, _, _ in jobs for ids in token_lists])
            results, row = [], 0
            for token_lists, params, _ in jobs:
                results.append(self.engine.finish(vectors[row:row + len(token_lists)], params))
                row += len(token_lists)
        except Exception as e:  # a bug, not the client's mistake: keep the loop alive
            logger.exception("embedding failed")
            error = EngineStepError(f"the engine failed: {e}")
            for _, _, future in jobs:
                self._loop.call_soon_threadsafe(self._settle, future, None, error)
            return
        for (_, _, future), result in zip(jobs, results):
            self._loop.call_soon_threadsafe(self._settle, future, result, None)

    @staticmethod
    def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
        if future.cancelled():  # the client left
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def _abort_all(self, error: BaseException | None) -> None:
        now = time.monotonic()
        for request_id, progress in list(self._progress.items()):
            self.engine.abort_request(request_id)
            self._send(request_id, error if error is not None else progress.aborted(now))
        self._progress.clear()

    def _report_step(self, stats) -> None:
        if stats.steps == self._steps_reported:  # nothing was scheduled
            return
        self._steps_reported = stats.steps
        try:
            self.on_step(stats.last_step_seconds)
        except Exception:
            logger.exception("on_step failed")

    def _publish_stats(self) -> None:
        # A fresh copy each time: readers on the event loop never see a half-updated object.
        self._stats = dataclasses.replace(self.engine.refresh_stats(), step_seconds=[])

    def _run(self) -> None:
        engine = self.engine
        while True:
            self._wakeup.clear()  # before reading the inbox, so a later post is never missed
            if self._apply_inbox():
                self._abort_all(None)
                self._publish_stats()
                return
            if not engine.has_unfinished_requests():
                self._publish_stats()
                self._wakeup.wait()
                continue
            try:
                outputs = engine.step()
            except Exception as e:
                logger.exception("engine step failed; aborting the running requests")
                self._abort_all(EngineStepError(f"the engine failed: {e}"))
                self._publish_stats()
                continue
            if self.on_step is not None:
                self._report_step(engine.stats)
            now = time.monotonic()
            deltas = []
            for out in outputs:
                progress = self._progress.get(out.request_id)
                if progress is None:
                    continue
                if out.finished:
                    del self._progress[out.request_id]
                delta = progress.delta(out, now)
                if delta is not None:
                    deltas.append(delta)
            if deltas:  # one wake-up of the event loop per step, not one per request
                self._loop.call_soon_threadsafe(self._deliver_all, deltas)
            self._publish_stats()
