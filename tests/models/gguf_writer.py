"""Writes a tiny transformers model as a float32 GGUF file the way llama.cpp's converter lays one
out, for the GGUF loader's tests of architectures no small real file exists for.

The tensor names come from the gguf package's own HF -> GGUF name map (gguf.get_tensor_name_map),
and its writer's metadata keys; what the converter does beyond naming is done here as it does:
experts merged into one [E, ...] tensor per projection, llama q/k rows permuted to interleaved
RoPE pairs, Gemma's norm scales stored plus one, Phi-3's longrope factors as tensors.
"""
from __future__ import annotations

import re

import numpy as np

# HF config.json "architectures"[0] -> GGUF general.architecture (Mixtral converts to llama).
GGUF_ARCH = {"MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe",
             "Qwen3MoeForCausalLM": "qwen3moe", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
             "Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")


def _permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert-time q/k permutation: each head's rows from HF's halves (i, i + H/2)
    to interleaved pairs (2i, 2i + 1)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _merged_experts(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert tensors (...experts.{e}.{proj}.weight) stacked into one [E, ...] per projection."""
    merged, groups = {}, {}
    for name, array in state.items():
        match = _EXPERT.fullmatch(name)
        if match:
            groups.setdefault(f"{match[1]}.{match[3]}.weight", {})[int(match[2])] = array
        else:
            merged[name] = array
    for name, experts in groups.items():
        merged[name] = np.stack([experts[e] for e in sorted(experts)])
    return merged


def write_gguf(hf_model, checkpoint: str, path: str) -> None:
    """hf_model (for its config) saved in the folder `checkpoint` (for the tensors under the names
    checkpoints have: transformers 5 fuses experts in memory) -> a GGUF file at path."""
    import gguf
    from safetensors.numpy import load_file

    cfg = hf_model.config
    hf_arch = cfg.architectures[0]
    arch = GGUF_ARCH[hf_arch]
    writer = gguf.GGUFWriter(path, arch)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = dict(cfg.rope_parameters)
    rope_full = rope.get("full_attention", rope)
    writer.add_rope_freq_base(rope_full["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
    if rope_full.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_full["factor"])
    if rope_full.get("partial_rotary_factor", 1.0) != 1.0:
        writer.add_rope_dimension_count(int(head_dim * rope_full["partial_rotary_factor"]))

    state = _merged_experts({k: v.astype(np.float32) for k, v in load_file(f"{checkpoint}/model.safetensors").items()})
    if rope_full.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(rope_full["original_max_position_embeddings"])
        state["rope_factors_short.weight"] = np.asarray(rope_full["short_factor"], np.float32)
        state["rope_factors_long.weight"] = np.asarray(rope_full["long_factor"], np.float32)
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    for name, array in state.items():
        if name.startswith("rope_factors"):
            gguf_name = name
        else:
            base = names.get_name(name.removesuffix(".weight").removesuffix(".bias"))
            assert base is not None, f"gguf has no name for {name} in {arch}"
            gguf_name = base + name[name.rfind("."):]
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            array = _permute_rope_rows(array, heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1
        if name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)  # llama.cpp keeps it as a vector
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
