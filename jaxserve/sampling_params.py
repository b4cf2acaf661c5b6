"""`SamplingParams`: how one request wants its tokens chosen and when it stops (vLLM's fields).

Host-side and immutable in spirit: validated once when the request arrives, so that nothing a
client sends can reach the jitted sampler as an out-of-range value.
"""
from __future__ import annotations

import dataclasses
import enum
import numbers

from jaxserve.sampling import registry  # names only: imports no JAX

# The most top logprobs a request may ask for (per sampled or prompt token); the sampler's
# static `num_top_logprobs` is sized to this.
MAX_LOGPROBS = 20

# Below this temperature a request is greedy, as in vLLM: dividing logits by ~0 only adds
# overflow risk and the argmax is the answer anyway.
_SAMPLING_EPS = 1e-5


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "typical_p", "tfs_z", "mirostat_tau", "mirostat_eta")


def _is_int(value) -> bool:
    # bool is an int subclass; `top_k=True` is a client bug, not top_k=1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclasses.dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's StructuredOutputsParams): exactly one of a JSON schema
    (`json`, a dict or its JSON text), any JSON object (`json_object`), a regular expression
    (`regex`), one of some strings (`choice`), or a grammar (`grammar`: Lark, or GBNF/EBNF as
    llama.cpp writes it). `whitespace_pattern` (a regex) replaces the whitespace JSON allows
    between tokens; `disable_any_whitespace` allows none."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            kinds.append("json_object")
        if len(kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of json, json_object, regex, choice "
                             f"or grammar, got {kinds or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise _bad("structured_outputs.json", self.json, "a JSON schema (an object or its JSON text)")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _bad(f"structured_outputs.{name}", value, "a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise _bad("structured_outputs.choice", self.choice, "a non-empty list of strings")
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.json_object and disable_any_whitespace must be bools")

    @property
    def kind(self) -> str:
        return next(name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None) \
            if not self.json_object else "json_object"


class RequestOutputKind(enum.Enum):
    """Which RequestOutputs a request produces while it runs (vLLM's names)."""
    CUMULATIVE = 0   # one every step it advances: all its text, tokens and logprobs so far
    DELTA = 1        # one every step it advances: only what is new since the last one
    FINAL_ONLY = 2   # one, when it finishes (LLM.generate; non-streaming server requests)


@dataclasses.dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request (defaults follow vLLM).

    Filtering happens in this order, after the penalties: temperature, then top-k, top-p and
    min-p, each on the distribution the previous one left.
    """

    n: int = 1
    """Number of independent completions to return for the prompt."""
    temperature: float = 1.0
    """Divides the logits before sampling; lower is more deterministic, 0 is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    top_p. In (0, 1]; 1 disables it."""
    top_k: int = -1
    """Keep only the top_k most likely tokens (ties at the boundary kept). -1 disables it."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's. In [0, 1];
    0 disables it."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token that already appears in the output. In [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it appears in the output. In [-2, 2]."""
    repetition_penalty: float = 1.0
    """Applied to tokens seen in the prompt or the output: positive logits are divided by it,
    negative ones multiplied. > 0; 1 disables it, > 1 discourages repetition."""
    seed: int | None = None
    """Seed of this request's random stream: same seed and prompt give the same tokens,
    whatever else is in the batch. None lets the engine pick one."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context limit."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or a stop token id may end the request."""
    stop: str | list[str] | None = None
    """Strings that end generation when they appear in the output text (the string itself is
    left out unless include_stop_str_in_output). Normalised to a list."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation, besides EOS (the token is kept in the output ids).
    Normalised to a list."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenised text."""
    spaces_between_special_tokens: bool = True
    """Put spaces between special tokens in the text (only tokenizers with a Python decode
    path honour it; `tokenizers`-backed ones ignore it, as in vLLM)."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of this many most likely
    alternatives (0..MAX_LOGPROBS). None returns none."""
    prompt_logprobs: int | None = None
    """Return log-probabilities of the prompt tokens with this many alternatives
    (0..MAX_LOGPROBS). None returns none."""
    sampler: str | None = None
    """Name of the registered sampler that chooses this request's tokens (`jaxserve.sampling`).
    None picks one from Ollama's options below: mirostat 1 or 2 -> "mirostat" / "mirostat2",
    else typical_p < 1 -> "typical", else tfs_z < 1 -> "tfs", else "default" (temperature, then
    top-k, top-p and min-p). Naming one that those options contradict is an error. Penalties and
    banned ids apply before every sampler; top_k, top_p and min_p only to "default". A greedy
    request (temperature 0 or top_k 1) takes the argmax under every built-in sampler."""
    typical_p: float = 1.0
    """Locally typical sampling (Meister et al. 2022; Ollama's typical_p): keep the tokens whose
    surprise is closest to the distribution's entropy until their mass exceeds typical_p. In
    (0, 1]; below 1 it selects the "typical" sampler, 1 disables it."""
    tfs_z: float = 1.0
    """Tail-free sampling (Bricken 2019; Ollama's tfs_z): cut the sorted distribution where the
    cumulative normalised |second derivative| exceeds tfs_z. In (0, 1]; below 1 it selects the
    "tfs" sampler, 1 disables it. At most one of typical_p and tfs_z may be below 1."""
    mirostat: int = 0
    """Ollama's mirostat: 1 or 2 selects Mirostat (Basu et al. 2021) version 1 or 2, which tunes
    its truncation every token to hold the surprise near mirostat_tau and replaces typical_p and
    tfs_z, as in llama.cpp. 0 disables it."""
    mirostat_tau: float = 5.0
    """Mirostat's target surprise in bits (its per-request state mu starts at 2 * tau). > 0."""
    mirostat_eta: float = 0.1
    """Mirostat's learning rate: mu -= eta * (observed surprise - tau) after every token. > 0."""
    repeat_last_n: int = -1
    """How many of the latest tokens (prompt and output together) the penalties look at, as
    Ollama's repeat_last_n: -1 all of them (vLLM's behaviour, and Ollama's num_ctx here, since
    the context is the whole history), 0 turns the penalties off. >= -1."""

    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """Which outputs `LLMEngine.step` returns for the request (RequestOutputKind)."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, a regex, a choice or a grammar (StructuredOutputsParams)."""
    extra_args: dict | None = None
    """Arbitrary values for custom samplers (vLLM's extra_args): a registered sampler's `params`
    callable may read them, e.g. `params=lambda p: (p.extra_args["alpha"],)`."""

    def __post_init__(self) -> None:
        self._check_types()
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop) if self.stop is not None else []
        self.stop_token_ids = list(self.stop_token_ids) if self.stop_token_ids is not None else []
        # Store floats as floats: the sampler packs them into float32 arrays anyway.
        for name in _FLOAT_FIELDS:
            setattr(self, name, float(getattr(self, name)))
        self._check_ranges()
        self._check_sampler()

    def _check_types(self) -> None:
        for name in _FLOAT_FIELDS:
            if not _is_real(getattr(self, name)):
                raise _bad(name, getattr(self, name), "a number")
        for name in ("n", "top_k", "min_tokens", "mirostat", "repeat_last_n"):
            if not _is_int(getattr(self, name)):
                raise _bad(name, getattr(self, name), "an integer")
        for name in ("seed", "max_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                raise _bad(name, value, "an integer or None")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "a bool")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise _bad("output_kind", self.output_kind, "a RequestOutputKind")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise _bad("structured_outputs", self.structured_outputs, "a StructuredOutputsParams or None")
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise _bad("stop", self.stop, "a string or a list of strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                    _is_int(t) for t in self.stop_token_ids):
                raise _bad("stop_token_ids", self.stop_token_ids, "a list of integers")

    def _check_ranges(self) -> None:
        if self.n < 1:
            raise _bad("n", self.n, ">= 1")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise _bad("temperature", self.temperature, ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", self.top_p, "in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise _bad("top_k", self.top_k, "-1 (disabled) or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", self.min_p, "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise _bad(name, getattr(self, name), "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise _bad("repetition_penalty", self.repetition_penalty, "> 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _bad("max_tokens", self.max_tokens, ">= 1 or None")
        if self.min_tokens < 0:
            raise _bad("min_tokens", self.min_tokens, ">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise _bad(name, value, f"in [0, {MAX_LOGPROBS}] or None")
        if any(t < 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", self.stop_token_ids, "a list of integers >= 0")
        if any(s == "" for s in self.stop):
            raise _bad("stop", self.stop, "non-empty strings")
        for name in ("typical_p", "tfs_z"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise _bad(name, getattr(self, name), "in (0, 1]")
        if self.mirostat not in (0, 1, 2):
            raise _bad("mirostat", self.mirostat, "0 (off), 1 or 2")
        for name in ("mirostat_tau", "mirostat_eta"):
            if not getattr(self, name) > 0.0:
                raise _bad(name, getattr(self, name), "> 0")
        if self.repeat_last_n < -1:
            raise _bad("repeat_last_n", self.repeat_last_n, ">= -1 (-1 = all tokens, 0 = off)")

    def _check_sampler(self) -> None:
        if self.sampler is not None and not isinstance(self.sampler, str):
            raise _bad("sampler", self.sampler, "a string or None")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise _bad("extra_args", self.extra_args, "a dict or None")
        if self.mirostat == 0 and self.typical_p < 1.0 and self.tfs_z < 1.0:
            raise ValueError(f"typical_p ({self.typical_p}) and tfs_z ({self.tfs_z}) select different "
                             "samplers: set at most one of them below 1")
        implied = self._implied_sampler()
        if self.sampler is not None:
            names = registry.names()
            if self.sampler not in names:
                raise _bad("sampler", self.sampler, f"one of the registered samplers {names}")
            if implied != "default" and implied != self.sampler:
                raise _bad("sampler", self.sampler, f"{implied!r} (or None), as the mirostat, "
                           "typical_p and tfs_z options select it")

    def _implied_sampler(self) -> str:
        if self.mirostat:
            return "mirostat" if self.mirostat == 1 else "mirostat2"
        if self.typical_p < 1.0:
            return "typical"
        if self.tfs_z < 1.0:
            return "tfs"
        return "default"

    @property
    def selected_sampler(self) -> str:
        """Name of the sampler this request uses (see `sampler`)."""
        return self.sampler if self.sampler is not None else self._implied_sampler()

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token (no randomness)."""
        return self.temperature < _SAMPLING_EPS or self.top_k == 1

    @property
    def max_stop_len(self) -> int:
        """Length of the longest stop string: how much streamed text to hold back."""
        return max((len(s) for s in self.stop), default=0)
