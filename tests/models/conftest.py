"""Fixtures for model tests: tiny random transformers checkpoints saved to disk, a tiny tokenizer,
and a builder for ragged paged batches (the host-side work the scheduler does in the engine).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import AttentionMetadata, KVCache

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """kind -> (folder with config.json + model.safetensors + tokenizer, the transformers model)."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            model = make_hf_model(kind)
            model.save_pretrained(str(folder), safe_serialization=True)
            save_tiny_tokenizer(folder)
            cache[kind] = (str(folder), model)
        return cache[kind]

    return get


@dataclasses.dataclass
class RaggedBatch:
    tokens: jnp.ndarray  # [T] int32, padded
    md: AttentionMetadata
    q_slices: list[slice]  # rows of each real sequence in the T axis


def build_batch(seqs: list[tuple[list[int], int]], page_tables: list[list[int]], *,
                num_tokens: int = 32, max_seqs: int = 4, width: int = 8) -> RaggedBatch:
    """One ragged step. seqs[b] = (new tokens, number of tokens already in the cache); page_tables[b]
    = pages owned by sequence b. T and B are padded; padding tokens write into page 0."""
    tokens, positions, slots, cu, kv_lens, q_slices = [], [], [], [0], [], []
    table = np.zeros((max_seqs, width), np.int32)
    for b, ((new, cached), pages) in enumerate(zip(seqs, page_tables)):
        table[b, :len(pages)] = pages
        q_slices.append(slice(len(tokens), len(tokens) + len(new)))
        for i, tok in enumerate(new):
            pos = cached + i
            tokens.append(tok)
            positions.append(pos)
            slots.append(pages[pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE)
        cu.append(len(tokens))
        kv_lens.append(cached + len(new))
    num_real = len(tokens)
    assert num_real <= num_tokens and len(seqs) <= max_seqs
    pad = num_tokens - num_real
    tokens += [0] * pad
    positions += [0] * pad
    slots += [i % PAGE_SIZE for i in range(pad)]  # garbage page 0
    cu += [num_real] * (max_seqs - len(seqs))
    kv_lens += [0] * (max_seqs - len(seqs))
    md = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32), slot_mapping=jnp.asarray(slots, jnp.int32),
        cu_q_lens=jnp.asarray(cu, jnp.int32), kv_lens=jnp.asarray(kv_lens, jnp.int32),
        page_table=jnp.asarray(table), num_seqs=jnp.asarray(len(seqs), jnp.int32))
    return RaggedBatch(jnp.asarray(tokens, jnp.int32), md, q_slices)


def empty_cache(config, num_pages: int, dtype=jnp.float32) -> KVCache:
    shape = (config.num_layers, num_pages, PAGE_SIZE, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@pytest.fixture
def ragged_batch():
    return build_batch


@pytest.fixture
def kv_cache_factory():
    return empty_cache


def pytest_generate_tests(metafunc):
    # A test taking `tiny_kind` runs once per tiny model family config.
    if "tiny_kind" in metafunc.fixturenames:
        metafunc.parametrize("tiny_kind", list(TINY_CONFIGS))
