"""Incremental detokenisation of one output stream, and the stop-string search over its text.

Host side, one `IncrementalDetokenizer` per sequence. Each token decodes a short window of ids
(prefix/read offsets, as vLLM and TGI do), so a step costs O(window), not O(output length).
`add_tokens` steps many streams at once with two batched decodes, each one call into the Rust
tokenizer where the tokenizer allows (transformers' decode wrapper costs about 5x the decode
itself per call: at 256 streams it was most of a step's host time).
"""
from __future__ import annotations

from typing import Callable, Sequence

# Prompt tokens decoded ahead of the output, so the first output token's text comes out as
# it would inside the whole sequence (e.g. SentencePiece's leading space); vLLM uses 5.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """Turns output token ids into text one token at a time.

    The pieces returned by `add_token` concatenate to `tokenizer.decode(output_ids)` (with the
    same special-token options); a token that ends inside a multi-byte character returns ""
    and its text comes out with the token that completes the character.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self._tokenizer = tokenizer
        # `spaces_between_special_tokens` only reaches tokenizers with a Python decode path
        # (sentencepiece); `tokenizers`-backed ones swallow the keyword, as in vLLM.
        self._decode_kwargs = dict(skip_special_tokens=skip_special_tokens,
                                   spaces_between_special_tokens=spaces_between_special_tokens)
        self._decode_batch = batch_decoder(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends mid-character: a window starting there would shift the diff.
            context = []
        self._ids = context             # context + output ids; windows are slices of it
        self._prefix_offset = 0         # start of the window already turned into text
        self._read_offset = len(context)  # end of the text already returned
        self._prefix_text = self._decode(context)
        self.output_ids: list[int] = []
        self._pieces: list[str] = []
        self._text: str | None = ""

    def _decode(self, ids: list[int]) -> str:
        return self._decode_batch([ids])[0] if ids else ""

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete,
        or for a skipped special token)."""
        return add_tokens([self], [token_id])[0]

    def _window(self, token_id: int) -> list[int]:
        """Take the token; the ids whose decode tells what text it completes."""
        self._ids.append(token_id)
        self.output_ids.append(token_id)
        return self._ids[self._prefix_offset:]

    def _advance(self, new_text: str) -> str | None:
        """The text the window decoded to -> the new piece, or None (nothing completed yet).
        Decoding the window again (not the token alone) keeps byte-level merges and
        sentencepiece spaces right; comparing lengths tolerates a changed prefix rendering."""
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return None
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._pieces.append(delta)
        self._text = None
        return delta

    def flush(self) -> str:
        """Text still held back (an unfinished character at the end, decoded with U+FFFD).

        Call once when the sequence finishes, so the total text equals decode(output_ids).
        """
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(self._prefix_text):
            return ""
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        self._pieces.append(delta)
        self._text = None
        return delta

    @property
    def text(self) -> str:
        """All output text returned so far."""
        if self._text is None:
            self._text = "".join(self._pieces)
            self._pieces = [self._text]
        return self._text


def add_tokens(detokenizers: Sequence[IncrementalDetokenizer], token_ids: Sequence[int]) -> list[str]:
    """`add_token` on many streams at once (token_ids[i] to detokenizers[i]), in two batched
    decodes per group of streams that decode alike: the windows, then the new prefixes of the
    streams that produced text."""
    pieces = [""] * len(detokenizers)
    groups: dict[Callable, list[int]] = {}
    for i, detok in enumerate(detokenizers):
        groups.setdefault(detok._decode_batch, []).append(i)
    for decode_batch, members in groups.items():
        windows = [detokenizers[i]._window(token_ids[i]) for i in members]
        advanced = []
        for i, text in zip(members, decode_batch(windows)):
            delta = detokenizers[i]._advance(text)
            if delta is not None:
                pieces[i] = delta
                advanced.append(detokenizers[i])
        if advanced:
            prefixes = decode_batch([d._ids[d._prefix_offset:d._read_offset] for d in advanced])
            for detok, text in zip(advanced, prefixes):
                detok._prefix_text = text
    return pieces


_DECODERS: dict[tuple[int, bool, bool], tuple[object, Callable]] = {}
_MAX_DECODERS = 32


def batch_decoder(tokenizer, skip_special_tokens: bool = True,
                  spaces_between_special_tokens: bool = True) -> Callable[[list[list[int]]], list[str]]:
    """A function decoding a list of id lists exactly as tokenizer.decode does each, shared by
    every stream with the same tokenizer and options (add_tokens batches by it). One call into
    the Rust tokenizer where transformers' wrapper would add nothing (a fast tokenizer whose
    clean_up_tokenization_spaces is off, or ignored as it is for BPE models), else decode per list."""
    key = (id(tokenizer), skip_special_tokens, spaces_between_special_tokens)
    cached = _DECODERS.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False) and not (
        backend is not None and type(backend.model).__name__ == "BPE"
        and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                        False))
    if backend is not None and not cleans_up and hasattr(backend, "decode_batch"):
        def decode(windows: list[list[int]]) -> list[str]:
            return [backend.decode(ids, skip_special_tokens=skip_special_tokens) for ids in windows]
    else:
        options = dict(skip_special_tokens=skip_special_tokens,
                       spaces_between_special_tokens=spaces_between_special_tokens)

        def decode(windows: list[list[int]]) -> list[str]:
            return [tokenizer.decode(ids, **options) if ids else "" for ids in windows]
    if len(_DECODERS) >= _MAX_DECODERS:  # tokenizers come and go (tests, reloaded models)
        _DECODERS.clear()
    _DECODERS[key] = (tokenizer, decode)
    return decode


def find_stop(text: str, num_new_chars: int, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the earliest stop string that ends inside the last `num_new_chars`
    characters of `text`, or None. Earlier matches were found when their text was new."""
    best: tuple[int, str] | None = None
    for stop in stops:
        # A match ending in the new chars starts at most len(stop) - 1 chars before them.
        start = text.find(stop, max(0, len(text) - num_new_chars - len(stop) + 1))
        if start != -1 and (best is None or start < best[0]):
            best = (start, stop)
    return best


def find_stop_string(text: str, num_new_chars: int, stops: list[str]) -> int | None:
    """Index in `text` where the earliest stop string ending inside the new chars starts.

    The caller truncates the output to text[:index] (or text[:index + len(stop)] with
    include_stop_str_in_output; `find_stop` also returns which stop matched).
    """
    match = find_stop(text, num_new_chars, stops)
    return None if match is None else match[0]
