"""The models a server holds loaded: the one `serve` started with, which stays (it answers /health,
/metrics and the /v1 routes), and the others that requests name, each loaded on first use on a
thread, with an AsyncEngine (continuous batching) of its own, and unloaded when its keep_alive
runs out, or least recently used first when a new one needs the room: a count
(JAXSERVE_MAX_LOADED_MODELS) and a memory budget (weights + KV cache bytes). Models are keyed
by their weights, so stored models over one base share its engine. Requests for a model that
is loading wait for it; one that cannot load gets the error, and the others keep serving.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable

from jaxserve.code_maps import release_dropped_graphs

logger = logging.getLogger("jaxserve.server")

KEEP_ALIVE_DEFAULT = 300.0  # Ollama's 5 minutes
_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value) -> float:
    """Ollama's keep_alive as seconds: a number of seconds or a Go duration ("10m", "1h30m",
    "-1s"); negative means forever (math.inf), 0 unloads as soon as the request ends."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"keep_alive must be a duration such as \"5m\" or a number of seconds, got {value!r:.40}")
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        if re.fullmatch(r"[0-9]*\.?[0-9]+", body):
            seconds = float(body)
        elif body and re.fullmatch(f"(?:{_DURATION.pattern})+", body):
            seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(body))
        else:
            raise ValueError(f"keep_alive must be a duration such as \"5m\" or a number of seconds, got {value!r:.40}")
        value = sign * seconds
    if math.isnan(value):
        raise ValueError("keep_alive must be a number, got NaN")
    return math.inf if value < 0 else float(value)


@dataclasses.dataclass(eq=False)
class LoadedModel:
    key: str                    # its weights' real path
    engine: object              # its AsyncEngine, started
    card: object                # its ModelCard
    formats: object             # its ChatOutputFormats
    size: int                   # bytes of its weights and KV cache (what the budget counts)
    device_bytes: int = 0       # of which on an accelerator (0 on a CPU)
    chat_template: str | None = None  # --chat-template, for the served model only
    pinned: bool = False        # the served model: never unloaded
    active: int = 0             # requests using it now
    expires_at: float = math.inf  # time.time() at which it unloads once idle
    last_used: float = 0.0      # time.monotonic() of the last request's start

    def expiry(self, keep_alive: float) -> float:
        return math.inf if self.pinned or keep_alive == math.inf else time.time() + keep_alive


class ModelLoadError(RuntimeError):
    pass


# loader(weights source) -> LoadedModel, run on a thread; its engine is started by the pool.
Loader = Callable[[str], LoadedModel]


class ModelPool:
    def __init__(self, served: LoadedModel, loader: Loader | None, *, max_loaded: int = 3,
                 memory_budget: int | None = None, keep_alive: float = KEEP_ALIVE_DEFAULT,
                 on_load: Callable[[LoadedModel], None] | None = None,
                 on_unload: Callable[[LoadedModel], None] | None = None):
        self.served = served
        self.loader = loader
        self.max_loaded = max_loaded
        self.memory_budget = memory_budget
        self.keep_alive = keep_alive
        self.on_load, self.on_unload = on_load, on_unload
        self.models: dict[str, LoadedModel] = {served.key: served}
        self._loading: dict[str, asyncio.Task] = {}  # one load per weights, awaited by every request for them
        self._changed = asyncio.Event()  # set when a model goes idle or unloads: room may be free

    @staticmethod
    def key_of(source: str) -> str:
        from jaxserve.models.loader import BUNDLED_ALIAS, bundled_model_path

        return os.path.realpath(bundled_model_path() if source == BUNDLED_ALIAS else source)

    def loaded(self) -> list[LoadedModel]:
        return list(self.models.values())

    async def acquire(self, source: str) -> LoadedModel:
        """The loaded model of these weights, counted as in use until release(); loaded first if
        it is not (requests for it meanwhile wait). Raises ModelLoadError."""
        key = self.key_of(source)
        while (model := self.models.get(key)) is None:
            if key not in self._loading:  # a task: a waiter that goes away does not stop the load
                task = self._loading[key] = asyncio.ensure_future(self._load(key, source))
                task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read, even with no waiter
            await asyncio.shield(self._loading[key])
        model.active += 1
        model.last_used = time.monotonic()
        return model

    def release(self, model: LoadedModel, keep_alive: float | None) -> None:
        """A request ended: the model stays for keep_alive (the server's default when None)."""
        model.active -= 1
        model.expires_at = model.expiry(self.keep_alive if keep_alive is None else keep_alive)
        if model.active == 0:
            self._changed.set()
            if model.expires_at <= time.time():
                asyncio.ensure_future(self.unload(model))

    async def unload(self, model: LoadedModel) -> bool:
        """Unload an idle model now (its engine stops; its memory goes with the last reference)."""
        if model.pinned or model.active or self.models.get(model.key) is not model:
            return False
        del self.models[model.key]
        logger.info("unloading %s", model.card.source)
        await model.engine.shutdown()
        if self.on_unload is not None:
            self.on_unload(model)
        # Its weights, cache and compiled graphs sit in reference cycles: collect them at the next
        # turn of the loop, once the callers have let go of it (jaxserve/code_maps.py); a load
        # that made room starts its loader thread first.
        asyncio.get_running_loop().call_soon(release_dropped_graphs, True)
        self._changed.set()
        return True

    async def reap(self, period: float = 1.0) -> None:
        """Forever: unload the idle models whose keep_alive ran out."""
        while True:
            await asyncio.sleep(period)
            now = time.time()
            expired = [m for m in self.loaded() if not m.active and m.expires_at <= now]
            while expired:  # popped, so no local name keeps an unloaded engine alive
                await self.unload(expired.pop())

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for model in self.loaded():
            if not model.pinned:
                await model.engine.shutdown()
        self.models = {self.served.key: self.served}

    async def _load(self, key: str, source: str) -> None:
        try:
            if self.loader is None:
                raise ModelLoadError("this server serves one model (no other can be loaded)")
            await self._make_room(_files_size(key))
            started = time.monotonic()
            try:
                model = await asyncio.to_thread(self.loader, source)
            except Exception as e:
                logger.warning("cannot load %s: %s", source, e)
                raise ModelLoadError(f"cannot load {source}: {e}") from None
            model.engine.start()
            model.expires_at, model.last_used = model.expiry(self.keep_alive), time.monotonic()
            self.models[key] = model
            if self.on_load is not None:
                self.on_load(model)
            logger.info("loaded %s in %.1f s (%d models loaded)", source, time.monotonic() - started,
                        len(self.models))
        finally:
            del self._loading[key]

    async def _make_room(self, incoming: int) -> None:
        """Unload idle models, least recently used first, until one more fits the count and the
        memory budget; wait while the ones in the way are busy."""
        while True:
            count = len(self.models) + len(self._loading)  # the one being loaded is in _loading
            used = sum(m.size for m in self.models.values())
            fits = count <= self.max_loaded and (self.memory_budget is None or used + incoming <= self.memory_budget)
            if fits:
                return
            idle = sorted((m for m in self.models.values() if not m.pinned and not m.active),
                          key=lambda m: m.last_used)
            if idle:
                await self.unload(idle[0])
                continue
            if not any(not m.pinned for m in self.models.values()):
                raise ModelLoadError(f"no room: {len(self.models)} model(s) loaded and JAXSERVE_MAX_LOADED_MODELS "
                                     f"is {self.max_loaded}; the memory budget is {self.memory_budget} bytes and "
                                     f"{used} are in use (the served model stays loaded)")
            self._changed.clear()
            await self._changed.wait()  # a busy model goes idle


def _files_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if os.path.isfile(os.path.join(path, f)))
    return 0
