"""Serving from several processes (`jaxserve serve --distributed`): every process must run the same
engine steps, but HTTP requests reach only process 0. Process 0 wraps its engine in a
``MirroredEngine`` that sends each accepted add and abort, and each step, to the other processes;
they ``follow``: apply the same calls to their own engine in the same order, so their schedules,
seeds and sharded steps stay in lockstep with process 0's.

The commands travel over a plain socket (``multiprocessing.connection``) on the coordinator's host,
one port above the coordinator's; JAX's own collectives carry the step's data.
"""
from __future__ import annotations

import logging
import time
from multiprocessing.connection import Client, Connection, Listener

logger = logging.getLogger(__name__)

_AUTHKEY = b"jaxserve-mirror"  # keeps stray connections out; the port is on the run's own hosts


def mirror_address(coordinator_address: str) -> tuple[str, int]:
    host, port = coordinator_address.rsplit(":", 1)
    return host, int(port) + 1


class MirroredEngine:
    """Process 0's engine, telling the followers every call that changes its state."""

    def __init__(self, engine, address: tuple[str, int], num_followers: int):
        self.engine = engine
        with Listener(address, authkey=_AUTHKEY) as listener:
            self._followers: list[Connection] = [listener.accept() for _ in range(num_followers)]
        self._pending: list[tuple] = []

    def __getattr__(self, name):  # tokenizer, stats, profiler, ...: the leader's own
        return getattr(self.engine, name)

    def add_request(self, request_id, prompt, params=None, **kwargs) -> None:
        self.engine.add_request(request_id, prompt, params, **kwargs)  # a refused request goes nowhere
        self._pending.append(("add", request_id, prompt, params, kwargs))

    def abort_request(self, request_id) -> None:
        self.engine.abort_request(request_id)
        self._pending.append(("abort", request_id))

    def add_lora(self, lora_request, adapter=None) -> None:
        self.engine.add_lora(lora_request, adapter)  # each follower reads the adapter's files itself
        self._pending.append(("add_lora", lora_request))

    def remove_lora(self, lora_name) -> bool:
        removed = self.engine.remove_lora(lora_name)
        self._pending.append(("remove_lora", lora_name))
        return removed

    def step(self):
        commands, self._pending = self._pending + [("step",)], []
        for conn in self._followers:
            conn.send(commands)
        return self.engine.step()

    def close(self) -> None:
        for conn in self._followers:
            conn.close()


def follow(engine, address: tuple[str, int], connect_timeout: float = 600.0) -> None:
    """Run `engine` as process 0's follower until process 0 goes away."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            conn = Client(address, authkey=_AUTHKEY)
            break
        except ConnectionRefusedError:  # process 0 is still loading
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    logger.info("following process 0 at %s:%d", *address)
    with conn:
        while True:
            try:
                commands = conn.recv()
            except EOFError:
                return
            for command in commands:
                if command[0] == "add":
                    _, request_id, prompt, params, kwargs = command
                    engine.add_request(request_id, prompt, params, **kwargs)
                elif command[0] == "abort":
                    engine.abort_request(command[1])
                elif command[0] == "add_lora":
                    engine.add_lora(command[1])
                elif command[0] == "remove_lora":
                    engine.remove_lora(command[1])
                else:
                    engine.step()
