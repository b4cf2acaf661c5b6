"""Qwen2-MoE and Qwen3-MoE: the shared decoder with a sparse MoE MLP (models/moe.py); what differs
is only their checkpoint names: mlp.experts.{e}.{gate,up,down}_proj, and Qwen2-MoE's shared expert
with its gate.
"""
from __future__ import annotations

import dataclasses

from jaxserve.models.decoder import DecoderLM, decoder_tensor_map
from jaxserve.models.layers import HFTensor
from jaxserve.models.moe import expert_tensors, without_dense_mlp


@dataclasses.dataclass(frozen=True)
class QwenMoeLM(DecoderLM):
    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        cfg = self.config
        names = {**without_dense_mlp(decoder_tensor_map(cfg)),
                 **expert_tensors(cfg, "mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})}
        if cfg.shared_expert_intermediate_size:
            D, S = cfg.hidden_size, cfg.shared_expert_intermediate_size
            shared = "model.layers.{l}.mlp.shared_expert"
            names.update({
                ("layers", "mlp", "shared_expert", "gate_proj"): HFTensor(f"{shared}.gate_proj.weight", (S, D), True),
                ("layers", "mlp", "shared_expert", "up_proj"): HFTensor(f"{shared}.up_proj.weight", (S, D), True),
                ("layers", "mlp", "shared_expert", "down_proj"): HFTensor(f"{shared}.down_proj.weight", (D, S), True),
                ("layers", "mlp", "shared_expert_gate"): HFTensor("model.layers.{l}.mlp.shared_expert_gate.weight",
                                                                  (1, D), True),
            })
        return names
