"""ModelPool's policy with a fake loader (no model, no server): one load per weights however many
wait, keep_alive, the count and memory limits with the least recently used idle model unloading
first, waiting for a busy one, load failures."""
from __future__ import annotations

import asyncio
import math
import threading
import time
from types import SimpleNamespace

import pytest

from jaxserve.server.model_pool import LoadedModel, ModelLoadError, ModelPool


class FakeEngine:
    def __init__(self):
        self.started = self.stopped = False

    def start(self):
        self.started = True

    async def shutdown(self, timeout: float = 5.0):
        self.stopped = True


def model(path: str, size: int = 10, pinned: bool = False) -> LoadedModel:
    return LoadedModel(ModelPool.key_of(path), FakeEngine(), SimpleNamespace(source=path, names=(path,)), None,
                       size=size, pinned=pinned)


def pool_of(loader, **kwargs) -> ModelPool:
    return ModelPool(model("/served", pinned=True), loader, **kwargs)


def keys(pool: ModelPool) -> list[str]:
    return sorted(m.key for m in pool.loaded())


def test_one_load_serves_every_waiting_request():
    calls = []
    gate = threading.Event()

    def loader(source):
        calls.append(source)
        gate.wait(5)
        return model(source)

    async def main():
        pool = pool_of(loader)
        waiting = [asyncio.ensure_future(pool.acquire("/a")) for _ in range(4)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)  # loading: they wait
        gate.set()
        got = await asyncio.gather(*waiting)
        assert len({id(m) for m in got}) == 1 and got[0].active == 4 and got[0].engine.started
        return pool

    asyncio.run(main())
    assert calls == ["/a"]


def test_keep_alive_zero_unloads_after_the_last_request_and_negative_keeps():
    async def main():
        pool = pool_of(lambda source: model(source), keep_alive=300)
        a = await pool.acquire("/a")
        b = await pool.acquire("/a")
        pool.release(a, 0)
        await asyncio.sleep(0)
        assert keys(pool) == ["/a", "/served"]  # another request still holds it
        pool.release(b, 0)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert keys(pool) == ["/served"] and a.engine.stopped
        c = await pool.acquire("/a")  # loaded again
        pool.release(c, math.inf)
        assert c.expires_at == math.inf and keys(pool) == ["/a", "/served"]
        d = await pool.acquire("/b")
        pool.release(d, None)  # the server's default
        assert 299 < d.expires_at - time.time() <= 300

    asyncio.run(main())


def test_the_reaper_unloads_expired_idle_models_only():
    async def main():
        pool = pool_of(lambda source: model(source))
        a, b = await pool.acquire("/a"), await pool.acquire("/b")
        pool.release(a, 0.05)
        b.expires_at = time.time()  # expired but busy
        reaper = asyncio.ensure_future(pool.reap(period=0.02))
        await asyncio.sleep(0.2)
        assert keys(pool) == ["/b", "/served"]
        pool.release(b, 0.01)
        await asyncio.sleep(0.1)
        assert keys(pool) == ["/served"]
        reaper.cancel()

    asyncio.run(main())


def test_the_least_recently_used_idle_model_unloads_to_keep_the_count():
    async def main():
        pool = pool_of(lambda source: model(source), max_loaded=3)
        a = await pool.acquire("/a")
        b = await pool.acquire("/b")
        pool.release(b, None)
        pool.release(a, None)
        a2 = await pool.acquire("/a")  # /a used after /b: /b is the least recently used
        pool.release(a2, None)
        c = await pool.acquire("/c")
        assert keys(pool) == ["/a", "/c", "/served"]
        # Both others busy: the next load waits until one is released.
        d = asyncio.ensure_future(pool.acquire("/d"))
        a3 = await pool.acquire("/a")
        pool.release(a3, None)  # /a goes idle while /c is busy: /a makes room
        got = await asyncio.wait_for(d, 10)  # unloading runs a full garbage collection (slow in a big process)
        assert keys(pool) == ["/c", "/d", "/served"] and got.active == 1 and c.active == 1

    asyncio.run(main())


def test_the_memory_budget_unloads_until_the_new_model_fits(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "weights").write_bytes(b"x" * 50)

    async def main():
        pool = pool_of(lambda source: model(source, size=50 if source == str(big) else 30), memory_budget=100,
                       max_loaded=10)
        for path in ("/a", "/b"):
            pool.release(await pool.acquire(path), None)
        assert keys(pool) == ["/a", "/b", "/served"]  # 10 + 30 + 30 bytes
        pool.release(await pool.acquire(str(big)), None)  # 50 more (its files): /a, used first, makes room
        assert keys(pool) == sorted(["/b", str(big), "/served"])

    asyncio.run(main())


def test_a_load_that_fails_reaches_every_waiter_and_is_tried_again():
    attempts = []

    def loader(source):
        attempts.append(source)
        time.sleep(0.05)
        raise OSError("no such weights")

    async def main():
        pool = pool_of(loader)
        results = await asyncio.gather(*(pool.acquire("/bad") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ModelLoadError) and "no such weights" in str(r) for r in results)
        with pytest.raises(ModelLoadError):
            await pool.acquire("/bad")
        assert keys(pool) == ["/served"] and not pool._loading

    asyncio.run(main())
    assert attempts == ["/bad", "/bad"]


def test_no_room_beside_the_served_model_is_an_error():
    async def main():
        pool = pool_of(lambda source: model(source), max_loaded=1)
        with pytest.raises(ModelLoadError, match="MAX_LOADED_MODELS"):
            await pool.acquire("/a")
        with pytest.raises(ModelLoadError, match="serves one model"):
            await pool_of(None).acquire("/a")

    asyncio.run(main())


class CyclicEngine(FakeEngine):
    """An engine whose objects refer to each other, as a real one's compiled graphs do: only a
    full garbage collection frees it."""

    def __init__(self):
        super().__init__()
        self.itself = self


def test_an_unloaded_models_engine_is_collected_without_waiting_for_the_gc():
    import gc
    import weakref

    engines = []

    def loader(source):
        engines.append(weakref.ref(engine := CyclicEngine()))
        return LoadedModel(ModelPool.key_of(source), engine, SimpleNamespace(source=source, names=(source,)), None,
                           size=10)

    async def main():
        pool = pool_of(loader)
        a = await pool.acquire("/a")
        pool.release(a, 0.01)
        del a
        reaper = asyncio.ensure_future(pool.reap(period=0.02))
        await asyncio.sleep(0.2)
        assert keys(pool) == ["/served"]
        reaper.cancel()
        assert engines[0]() is None  # the reaper's unload collected it
        b = await pool.acquire("/b")
        pool.release(b, 0)  # keep_alive 0: unloaded as the request ends
        del b
        await asyncio.sleep(0.05)
        assert keys(pool) == ["/served"] and engines[1]() is None
        pool.max_loaded = 2
        c = await pool.acquire("/c")
        pool.release(c, None)
        del c
        d = await pool.acquire("/d")  # /c makes room for it
        assert keys(pool) == ["/d", "/served"] and engines[2]() is None
        pool.release(d, None)

    gc.disable()  # only the pool's own collection can free the cycles
    try:
        asyncio.run(main())
    finally:
        gc.enable()
