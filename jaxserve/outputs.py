"""What generation and embedding return, shaped as vLLM's ``RequestOutput`` / ``CompletionOutput``
and ``EmbeddingRequestOutput``.

The generation outputs have slots: a 256-sequence step makes hundreds of them, and an instance
without a ``__dict__`` is one allocation (and one object for the garbage collector) less."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = most likely; None when outside the returned top-N
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int                       # which of the request's n completions
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # per generated token: token id -> Logprob
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    embedding: list[float]           # the text's vector (unit length when the model normalises)

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """One embedded text, as vLLM's ``EmbeddingRequestOutput``."""
    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]      # what was embedded, after any truncation
    finished: bool = True
