"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share its class): the shared decoder's layers, with
longrope RoPE and partial rotary taken from the config. What differs is the checkpoint: q, k and v
are one fused `qkv_proj`, gate and up one fused `gate_up_proj`, split here by rows on load.
"""
from __future__ import annotations

import dataclasses

from jaxserve.models.decoder import DecoderLM, decoder_tensor_map
from jaxserve.models.layers import HFTensor

_LAYER = "model.layers.{l}"


@dataclasses.dataclass(frozen=True)
class Phi3LM(DecoderLM):
    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        cfg = self.config
        D, N, K, H, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        names = decoder_tensor_map(cfg)
        qkv = HFTensor(f"{_LAYER}.self_attn.qkv_proj.weight", ((N + 2 * K) * H, D), True)
        starts = {"q": 0, "k": N * H, "v": (N + K) * H}
        for proj, heads in (("q", N), ("k", K), ("v", K)):
            names[("layers", "attn", f"{proj}_proj")] = dataclasses.replace(
                qkv, rows=(starts[proj], starts[proj] + heads * H))
        gate_up = HFTensor(f"{_LAYER}.mlp.gate_up_proj.weight", (2 * F, D), True)
        names[("layers", "mlp", "gate_proj")] = dataclasses.replace(gate_up, rows=(0, F))
        names[("layers", "mlp", "up_proj")] = dataclasses.replace(gate_up, rows=(F, 2 * F))
        return names
