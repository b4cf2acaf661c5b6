"""Logprobs as every API shows them: the engine's per-token entries (token id -> Logprob, the chosen
token first, then the top N by rank) -> one `TokenLogprob` per generated token, which the OpenAI
chat, legacy completions and Ollama formats each lay out in their own fields."""
from __future__ import annotations

import math
from dataclasses import dataclass

from jaxserve.outputs import Logprob

# vLLM clamps -inf logprobs (tokens the sampler filtered out) so the JSON stays standard.
MIN_LOGPROB = -9999.0


def finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str                           # the chosen token's text
    logprob: float                       # finite (MIN_LOGPROB for -inf)
    top: tuple[tuple[str, float], ...]   # the num_top most likely (text, logprob), best first


def token_logprobs(entries, token_ids, num_top: int) -> list[TokenLogprob]:
    """One TokenLogprob per (entry, token id) pair (the entries of the generated tokens)."""
    items = []
    for entry, tid in zip(entries or (), token_ids):
        chosen = entry[tid]
        items.append(TokenLogprob(chosen.decoded_token or "", finite(chosen.logprob),
                                  tuple((lp.decoded_token or "", finite(lp.logprob)) for lp in ranked(entry, num_top))))
    return items


def ranked(entry: dict[int, Logprob], num_top: int) -> list[Logprob]:
    """The entry's tokens of rank 1..num_top, best first."""
    return sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= num_top), key=lambda lp: lp.rank)


def openai_chat(items: list[TokenLogprob]) -> list[dict]:
    """OpenAI chat ``logprobs.content`` items (with UTF-8 bytes)."""
    return [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
             "top_logprobs": [{"token": tok, "logprob": lp, "bytes": list(tok.encode())} for tok, lp in t.top]}
            for t in items]


def ollama(items: list[TokenLogprob]) -> list[dict]:
    """Ollama's ``logprobs`` items."""
    return [{"token": t.token, "logprob": t.logprob,
             "top_logprobs": [{"token": tok, "logprob": lp} for tok, lp in t.top]} for t in items]


class CompletionLogprobs:
    """The legacy completions ``logprobs`` object, built piece by piece (text offsets carry on);
    `top_logprobs` maps text -> logprob for the chosen token and the top N."""

    def __init__(self, tokenizer, num_top: int):
        self.tokenizer = tokenizer
        self.num_top = num_top
        self.offset = 0

    def _item(self, token: str, logprob: float | None, top: dict | None, out: dict) -> None:
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.offset)
        self.offset += len(token)

    def piece(self, entries, token_ids) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry, tid in zip(entries, token_ids):
            if entry is None:  # the first prompt token has no logprob
                self._item(self.tokenizer.decode([tid]), None, None, out)
                continue
            (item,) = token_logprobs([entry], [tid], self.num_top)
            self._item(item.token, item.logprob, {item.token: item.logprob, **dict(item.top)}, out)
        return out

    def skip_text(self, text: str) -> None:
        """Echoed prompt text without logprobs still moves the offsets."""
        self.offset += len(text)


def merge(into: dict | None, piece: dict) -> dict:
    """Legacy completions logprobs: `piece` appended to `into` (a copy of it when None)."""
    if into is None:
        return {k: list(v) for k, v in piece.items()}
    for k, v in piece.items():
        into[k].extend(v)
    return into
