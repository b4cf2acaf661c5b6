"""The engine's adapters: which are registered (by name), and which sit in the device's max_loras
slots. Host-side bookkeeping only; the runner writes the slots.

A request holds its adapter's slot from admission until it finishes or is preempted; a slot no
running request holds is idle and is given to another adapter when one needs room, least recently
used first. An adapter that finds no slot waits (the scheduler admits other requests meanwhile),
so at most max_loras adapters run in one step and any number may be registered. Each slot write
is queued here and handed to the runner with the step that first uses it.
"""
from __future__ import annotations

from collections import OrderedDict

from jaxserve.lora import LoRAAdapter, LoRAAdapterError, LoRAConfig, LoRARequest, read_adapter

BASE_SLOT = 0  # the all-zero slot of requests without an adapter


class LoRAManager:
    def __init__(self, config: LoRAConfig, model_config):
        self.config = config
        self.model_config = model_config
        self.adapters: dict[str, LoRAAdapter] = {}   # registered, by name
        slots = range(1, config.max_loras + 1)
        self.occupant: dict[int, LoRAAdapter | None] = dict.fromkeys(slots)
        self.holders: dict[int, int] = dict.fromkeys(slots, 0)  # requests holding each slot
        self.slot_of: dict[int, int] = {}             # adapter uid -> its slot while resident
        self.idle: OrderedDict[int, None] = OrderedDict.fromkeys(slots)  # held by none; front = reused first
        self.pending_writes: list[tuple[int, LoRAAdapter]] = []

    # ---- registration ------------------------------------------------------------------------

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter's files read and checked against this model (no state touched: any thread)."""
        return read_adapter(request, self.model_config, self.config.max_lora_rank)

    def add(self, request: LoRARequest, adapter: LoRAAdapter | None = None) -> LoRAAdapter:
        """Register an adapter (read now unless `adapter` was read ahead). Raises LoRAAdapterError."""
        if request.lora_name in self.adapters:
            raise LoRAAdapterError(f"The lora adapter '{request.lora_name}' has already been loaded.")
        clash = next((a for a in self.adapters.values() if a.request.lora_int_id == request.lora_int_id), None)
        if clash is not None:
            raise LoRAAdapterError(f"lora_int_id {request.lora_int_id} is already the id of LoRA adapter "
                                   f"'{clash.name}'")
        adapter = adapter if adapter is not None else self.read(request)
        self.adapters[request.lora_name] = adapter
        return adapter

    def remove(self, name: str) -> bool:
        """Unregister; requests already queued with it still finish with it. False if unknown."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            return False
        slot = self.slot_of.get(adapter.uid)
        if slot is not None and self.holders[slot] == 0:  # nobody will use it again: free the slot first
            self._evict(slot)
            self.idle.move_to_end(slot, last=False)
        return True

    def resolve(self, request: LoRARequest) -> LoRAAdapter:
        """The registered adapter `request` names, registering it on first use (as vLLM's offline LLM
        does); a name already bound to other files or another id is refused."""
        known = self.adapters.get(request.lora_name)
        if known is None:
            return self.add(request)
        if (known.request.lora_int_id, known.request.lora_path) != (request.lora_int_id, request.lora_path):
            raise LoRAAdapterError(f"LoRA adapter '{request.lora_name}' is loaded as id {known.request.lora_int_id} "
                                   f"from {known.request.lora_path}, not id {request.lora_int_id} from "
                                   f"{request.lora_path}")
        return known

    def list(self) -> list[LoRARequest]:
        return [a.request for a in self.adapters.values()]

    # ---- device slots (the scheduler's) ------------------------------------------------------

    def acquire(self, adapter: LoRAAdapter) -> int | None:
        """A slot holding `adapter` for one more request (queueing its write if it was not resident),
        or None when every slot is held by running requests of other adapters."""
        slot = self.slot_of.get(adapter.uid)
        if slot is None:
            if not self.idle:
                return None
            slot = next(iter(self.idle))
            self._evict(slot)
            self.occupant[slot] = adapter
            self.slot_of[adapter.uid] = slot
            self.pending_writes.append((slot, adapter))
        if self.holders[slot] == 0:
            del self.idle[slot]
        self.holders[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.holders[slot] -= 1
        assert self.holders[slot] >= 0, f"LoRA slot {slot} released twice"
        if self.holders[slot] == 0:
            occupant = self.occupant[slot]
            if occupant is not None and self.adapters.get(occupant.name) is not occupant:
                self._evict(slot)  # unregistered while running: its last request is done
                self.idle[slot] = None
                self.idle.move_to_end(slot, last=False)
            else:
                self.idle[slot] = None  # most recently used: reused last

    def take_writes(self) -> list[tuple[int, LoRAAdapter]]:
        """The slot writes queued since the last call, in order (the runner applies them)."""
        writes, self.pending_writes = self.pending_writes, []
        return writes

    def _evict(self, slot: int) -> None:
        occupant = self.occupant[slot]
        if occupant is not None:
            del self.slot_of[occupant.uid]
            self.occupant[slot] = None
