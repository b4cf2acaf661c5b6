"""Mixtral: the shared decoder with a sparse MoE MLP (models/moe.py); what differs is only its
checkpoint names: a block_sparse_moe of w1 (gate), w3 (up) and w2 (down) experts.
"""
from __future__ import annotations

import dataclasses

from jaxserve.models.decoder import DecoderLM, decoder_tensor_map
from jaxserve.models.layers import HFTensor
from jaxserve.models.moe import expert_tensors, without_dense_mlp


@dataclasses.dataclass(frozen=True)
class MixtralLM(DecoderLM):
    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        return {**without_dense_mlp(decoder_tensor_map(self.config)),
                **expert_tensors(self.config, "block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})}
