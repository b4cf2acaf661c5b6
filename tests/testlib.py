"""Shared test helpers: tiny random-weight transformers models of every supported family (no hub
access: the weights are drawn here, the tokenizer is a word-level toy), the shared engine shape,
and the counter of executables JAX builds.
"""
from __future__ import annotations

# The shared SmolLM2 engine: small buckets (max 64 tokens, 8 sequences) keep warm-up short.
SMOLLM2_ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512)

VOCAB = 320
PAGE_SIZE = 4

# Every tiny model: hidden 64, 2 layers, 4 heads, 2 KV heads, fp32. Values are HF config kwargs.
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_linear_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling=dict(rope_type="linear", factor=2.0))),
    "smollm2_tied": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=100000.0, tie_word_embeddings=True)),
    # A window of 5 is shorter than the test prompts, so the window really masks something.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0)),
    # head_dim 32 != hidden / heads = 16: Qwen3's explicit head_dim must be honoured.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_theta=1000000.0)),
}


def save_tiny_tokenizer(path) -> None:
    """A whitespace word-level tokenizer over "w0".."w{VOCAB-1}" saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                            eos_token="w2").save_pretrained(str(path))


def make_hf_model(kind: str, seed: int = 0):
    """A random tiny transformers model; weights are re-drawn large enough that logits are O(1-10)
    and norms/biases differ from their 1/0 defaults, so a mis-mapped tensor changes the output."""
    import torch
    import transformers

    config_cls, model_cls, extra = TINY_CONFIGS[kind]
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    model.set_attn_implementation("eager")  # the plain masked softmax, sliding window included
    return model



# Two PEFT adapters of the tiny llama with different ranks, scalings and target modules.
TINY_ADAPTERS = {
    "attn_mlp": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"]),
}


def make_peft_adapter(base, folder, seed: int = 1, base_model_name_or_path: str | None = None, **lora_config):
    """Save a PEFT LoRA adapter of `base` (a transformers model, left untouched) with random A and B
    (PEFT starts B at zero, which would change nothing) to `folder`; returns the transformers model
    with the adapter merged into its weights (PEFT's merge_and_unload): the oracle."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(lora_dropout=0.0, **lora_config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(folder))
    if base_model_name_or_path is not None:  # PEFT writes the base model's name_or_path (None here)
        import json
        import os
        path = os.path.join(str(folder), "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = base_model_name_or_path
        with open(path, "w") as f:
            json.dump(config, f)
    return model.merge_and_unload().eval()


class CompileCounter:
    """Counts executables JAX builds, whether compiled or loaded from the persistent cache."""

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER: CompileCounter | None = None


def compile_counter() -> CompileCounter:
    """The session's one counter (JAX listeners cannot be removed, so register one only)."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CompileCounter()
    return _COUNTER
