"""Gemma 2 and Gemma 3: what differs from the shared decoder is only where their checkpoints keep
things. The layers themselves are the shared decoder's, driven by the config the registry gives
them (embeddings scaled by sqrt(D), sandwich norms, GeGLU, local and global layers with their own
RoPE bases, Gemma 2's soft-capping, Gemma 3's q/k norm).

The checkpoint differences: the norm around the MLP is `pre_feedforward_layernorm` (the decoder's
`mlp_norm`), `post_attention_layernorm` is the norm after attention, and every RMSNorm scale is
stored minus one (Gemma's norm multiplies by 1 + weight), so loading adds the one back.
"""
from __future__ import annotations

import dataclasses

from jaxserve.models.decoder import DecoderLM, decoder_tensor_map
from jaxserve.models.layers import HFTensor

_LAYER = "model.layers.{l}"
_NORM_NAMES = {
    ("layers", "mlp_norm", "scale"): f"{_LAYER}.pre_feedforward_layernorm.weight",
    ("layers", "post_attn_norm", "scale"): f"{_LAYER}.post_attention_layernorm.weight",
    ("layers", "post_mlp_norm", "scale"): f"{_LAYER}.post_feedforward_layernorm.weight",
}


@dataclasses.dataclass(frozen=True)
class GemmaLM(DecoderLM):
    def hf_tensor_map(self) -> dict[tuple[str, ...], HFTensor]:
        D = self.config.hidden_size
        names = decoder_tensor_map(self.config)
        for path, name in _NORM_NAMES.items():
            names[path] = HFTensor(name, (D,))
        return {path: dataclasses.replace(t, offset=1.0) if path[-1] == "scale" else t
                for path, t in names.items()}
