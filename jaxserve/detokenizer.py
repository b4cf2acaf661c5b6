"""Incremental detokenisation of one output stream, and the stop-string search over its text.

Host side, one `IncrementalDetokenizer` per sequence. Each token decodes a short window of ids
(prefix/read offsets, as vLLM and TGI do), so a step costs O(window), not O(output length).
Fast tokenizers run that window logic in Rust (`tokenizers.decoders.DecodeStream`, one call per
token: transformers' decode wrapper alone cost about 5x the decode per call, most of a 256-stream
step's host time); other tokenizers run it here, with the streams of a step decoded in one batch.

Byte-level BPE tokenizers (GPT-2's decoder: SmolLM2, Qwen, Llama 3) need no window at all: a
token's text is its own bytes, whatever came before, so a stream keeps only the bytes of an
unfinished character and a token whose bytes are whole characters is a table lookup (about a
tenth of a DecodeStream step, which re-decodes its window every token).
"""
from __future__ import annotations

from typing import Any, Sequence

# Prompt tokens decoded ahead of the output, so the first output token's text comes out as
# it would inside the whole sequence (e.g. SentencePiece's leading space); vLLM uses 5.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """Turns output token ids into text one token at a time.

    The pieces returned by `add_token` concatenate to `tokenizer.decode(output ids)` (with the
    same special-token options); a token that ends inside a multi-byte character returns ""
    and its text comes out with the token that completes the character.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        # `spaces_between_special_tokens` only reaches tokenizers with a Python decode path
        # (sentencepiece); `tokenizers`-backed ones swallow the keyword, as in vLLM.
        self._decoding = decoding_for(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if self._decode(context).endswith(_REPLACEMENT):
            # The prompt ends mid-character: a window starting there would shift the diff.
            context = []
        self._ids = context             # context + output ids; windows are slices of it
        self._prefix_offset = 0         # start of the window already turned into text
        self._read_offset = len(context)  # end of the text already returned
        self._prefix_text = self._decode(context)
        # The byte-level tables (None: windows, in Rust or in Python); then no stream is needed.
        self._pieces_of = self._decoding.byte_level()
        self._pending = b""  # byte-level: bytes of a character no token has finished yet
        self._stream = self._decoding.stream(context) if self._pieces_of is None else None  # None: Python windows
        self._backend = self._decoding.backend
        self._pieces: list[str] = []
        self._text: str | None = ""
        self._deferred: list[int] = []  # tokens taken by defer(), not decoded yet

    def _decode(self, ids: list[int]) -> str:
        return self._decoding.decode_batch([ids])[0] if ids else ""

    def add_token(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete,
        or for a skipped special token)."""
        self._catch_up()
        return add_tokens([self], [token_id])[0]

    def defer(self, token_ids: Sequence[int]) -> None:
        """Take tokens whose text nobody reads yet (a final-only output without stop strings, all
        its ids when it ends): they are decoded in order, as add_token would, when `text` or
        `flush` is next asked for, so the decoding runs once, at the end."""
        self._deferred.extend(token_ids)

    def _catch_up(self) -> None:
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            for token_id in deferred:
                add_tokens([self], [token_id])

    def _step_in_rust(self, token_id: int) -> str:
        self._ids.append(token_id)
        delta = self._stream.step(self._backend, token_id)
        if delta is None:
            return ""
        # Mirror the stream's offsets, for flush().
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None  # decoded by flush() if it needs it
        self._pieces.append(delta)
        self._text = None
        return delta

    def _step_bytes(self, token_id: int) -> str:
        """A byte-level step the table cannot answer alone (add_tokens looks up the rest): a
        token inside a character, or any token while one is unfinished. Returns "" while the
        character is unfinished (its bytes wait in _pending); the text comes out with the token
        that ends it, with U+FFFD for bytes that can never form one, as the lossy decode of the
        whole has it."""
        raw = self._pieces_of[1]
        if token_id >= len(raw):  # past the tokenizer's ids (a model's padded vocabulary): decode drops it
            return ""
        self._pending += raw[token_id]
        piece = self._pending.decode("utf-8", "replace")
        if piece.endswith(_REPLACEMENT):
            return ""
        self._pending = b""
        self._pieces.append(piece)
        self._text = None
        return piece

    def _window(self, token_id: int) -> list[int]:
        """Take the token; the ids whose decode tells what text it completes."""
        self._ids.append(token_id)
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

        Call once when the sequence finishes, so the total text equals the decode of the output ids.
        """
        self._catch_up()
        if self._pieces_of is not None:
            delta, self._pending = self._pending.decode("utf-8", "replace"), b""
            if delta:
                self._pieces.append(delta)
                self._text = None
            return delta
        if self._read_offset == len(self._ids):
            return ""  # nothing held back
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
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
        """All output text returned so far (deferred tokens decoded first)."""
        if self._deferred:
            self._catch_up()
        if self._text is None:
            self._text = "".join(self._pieces)
            self._pieces = [self._text]
        return self._text


def add_tokens(detokenizers: Sequence[IncrementalDetokenizer], token_ids: Sequence[int]) -> list[str]:
    """`add_token` on many streams at once (token_ids[i] to detokenizers[i]). Streams decoding
    in Python go in two batched decodes per group that decodes alike: the windows, then the new
    prefixes of the streams that produced text."""
    pieces = [""] * len(detokenizers)
    groups: dict[_Decoding, list[int]] = {}
    for i, detok in enumerate(detokenizers):
        if detok._pieces_of is not None:
            token_id = token_ids[i]
            try:
                piece = detok._pieces_of[0][token_id] if not detok._pending else None
            except IndexError:  # past the tokenizer's ids (a model's padded vocabulary): decode drops it
                piece = ""
            if piece:  # the common case inline: whole characters after whole characters
                detok._pieces.append(piece)
                detok._text = None
                pieces[i] = piece
            elif piece is None:
                pieces[i] = detok._step_bytes(token_id)
        elif detok._stream is not None:
            pieces[i] = detok._step_in_rust(token_ids[i])
        else:
            groups.setdefault(detok._decoding, []).append(i)
    for decoding, members in groups.items():
        windows = [detokenizers[i]._window(token_ids[i]) for i in members]
        advanced = []
        for i, text in zip(members, decoding.decode_batch(windows)):
            delta = detokenizers[i]._advance(text)
            if delta is not None:
                pieces[i] = delta
                advanced.append(detokenizers[i])
        if advanced:
            prefixes = decoding.decode_batch([d._ids[d._prefix_offset:d._read_offset] for d in advanced])
            for detok, text in zip(advanced, prefixes):
                detok._prefix_text = text
    return pieces


class _Decoding:
    """How one tokenizer with one set of options decodes: decode_batch (a list of id lists,
    each exactly as tokenizer.decode would) and, for fast tokenizers, streams in Rust."""

    def __init__(self, tokenizer, skip_special_tokens: bool, spaces_between_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.options = dict(skip_special_tokens=skip_special_tokens,
                            spaces_between_special_tokens=spaces_between_special_tokens)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        # transformers' decode adds a clean-up pass where clean_up_tokenization_spaces is on
        # (except for BPE models, which it skips unless forced): the Rust decode alone would
        # then differ, so such tokenizers decode through transformers.
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False) and not (
            backend is not None and type(backend.model).__name__ == "BPE"
            and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                            False))
        self.backend: Any = backend if backend is not None and not cleans_up else None
        self._byte_level: tuple | None | bool = False  # False: not built yet

    def decode_batch(self, windows: list[list[int]]) -> list[str]:
        if self.backend is not None:
            # One decode each: decode_batch's thread pool costs more than it saves at these sizes
            # (measured: 0.55 ms against 0.25 ms for 256 windows of two tokens after a step).
            return [self.backend.decode(ids, skip_special_tokens=self.skip_special_tokens) for ids in windows]
        return [self.tokenizer.decode(ids, **self.options) if ids else "" for ids in windows]

    def byte_level(self) -> tuple[list[str | None], list[bytes]] | None:
        """For a byte-level BPE decoder (GPT-2's), per token id: its text when its bytes are whole
        UTF-8 characters ("" for a skipped special token), else None; and its bytes. None for
        other decoders. Built once per tokenizer and options (0.06 s for SmolLM2's 49,152 ids)."""
        if self._byte_level is False:
            self._byte_level = _byte_level_tables(self.backend, self.skip_special_tokens) if self.backend else None
        return self._byte_level

    def stream(self, context: list[int]):
        """A Rust incremental decoder primed with `context`, or None where decoding runs in Python."""
        if self.backend is None or _DecodeStream is None:
            return None
        return _DecodeStream(ids=list(context), skip_special_tokens=self.skip_special_tokens)


def _byte_level_tables(backend, skip_special_tokens: bool) -> tuple[list[str | None], list[bytes]] | None:
    """`_Decoding.byte_level`'s tables, read off the vocabulary the way the ByteLevel decoder reads
    it: each char of a token stands for one byte (GPT-2's printable map), and a token with a char
    outside the map stands for its own UTF-8. Added tokens take their text from decode itself."""
    from tokenizers import decoders
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> char map

    if not isinstance(backend.decoder, decoders.ByteLevel):
        return None  # no decoder, or one with more steps (SentencePiece's spaces, byte fallback)
    added = backend.get_added_tokens_decoder()
    texts: list[str | None] = []
    raw: list[bytes] = []
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
        token = added.get(token_id)
        if token is not None:
            skipped = skip_special_tokens and token.special
            text = "" if skipped else backend.decode([token_id], skip_special_tokens=False)
            data = text.encode()
        else:
            piece = backend.id_to_token(token_id)
            if piece is None:  # a hole in the ids: decode drops it
                data, text = b"", ""
            else:
                try:
                    data = bytes([byte_of[c] for c in piece])
                except KeyError:
                    data = piece.encode()
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = None  # part of a character: the stream collects its bytes
        if text is not None and text.endswith(_REPLACEMENT):
            text = None  # held back as DecodeStream holds any text ending in U+FFFD
        texts.append(text)
        raw.append(data)
    return texts, raw


try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the Python window logic
    _DecodeStream = None

_DECODINGS: dict[tuple[int, bool, bool], _Decoding] = {}
_MAX_DECODINGS = 32


def decoding_for(tokenizer, skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> _Decoding:
    """The decoding of a tokenizer and options, shared by every stream using them (add_tokens
    batches the Python-side streams by it)."""
    key = (id(tokenizer), skip_special_tokens, spaces_between_special_tokens)
    cached = _DECODINGS.get(key)
    if cached is not None and cached.tokenizer is tokenizer:
        return cached
    if len(_DECODINGS) >= _MAX_DECODINGS:  # tokenizers come and go (tests, reloaded models)
        _DECODINGS.clear()
    decoding = _DECODINGS[key] = _Decoding(tokenizer, skip_special_tokens, spaces_between_special_tokens)
    return decoding



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
