"""Input processing: a request as it arrives -> token ids and the checks it must pass (vLLM v1's
InputProcessor), before it touches any engine state.

Every rule a request can break lives here, once: a prompt of the wrong type (text, token ids
and vLLM's prompt dicts are taken), an empty prompt, token ids outside the
vocabulary, a prompt or max_tokens the context cannot hold, more stop ids than min_tokens can ban,
more KV pages than the cache has, a sampler unregistered since the params were made. A refusal is
a `RequestValidationError` naming the field (`param`) and, as OpenAI's errors do, a `code`; the
server maps it to its API's error format (renaming fields where its API names them otherwise)
instead of checking again. Free of JAX, so the server may use the shared checks directly.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

from jaxserve.sampling import registry
from jaxserve.sampling_params import SamplingParams

# What a request's prompt may be: text, token ids, or vLLM's prompt dicts ({"prompt": text},
# {"prompt_token_ids": ids}).
PromptType = str | Sequence[int] | dict


class RequestValidationError(ValueError):
    """A request the engine cannot serve as asked; nothing changed. `param` names the field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.code = code


def check_token_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    """Every id in [0, vocab_size), else a refusal naming the first one outside."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestValidationError(f"{param} holds token id {bad}, outside the vocabulary [0, {vocab_size})",
                                     param=param)


def prompt_from_dict(prompt: dict, label: str = "prompt") -> str | list[int]:
    """The text or token ids of vLLM's TextPrompt / TokensPrompt dict, or a refusal naming what
    is wrong with it (`label`: the field, "prompt[2]" in a list)."""
    has_text, has_ids = "prompt" in prompt, "prompt_token_ids" in prompt
    if has_text == has_ids:
        raise RequestValidationError(f"{label}: a prompt dict needs exactly one of 'prompt' (text) and "
                                     f"'prompt_token_ids', got keys {sorted(map(str, prompt))}", param=label)
    if has_text and not isinstance(prompt["prompt"], str):
        raise RequestValidationError(f"{label} must be text, got {type(prompt['prompt']).__name__}", param=label)
    return prompt["prompt"] if has_text else prompt["prompt_token_ids"]


def integer_ids(ids, label: str = "prompt") -> list[int]:
    """Token ids as Python ints (numpy integers accepted), or a refusal naming the first that is not one."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise RequestValidationError(f"{label} must be text or a list of token ids, got {type(ids).__name__}",
                                     param=label)
    ids = list(ids)
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
    if bad is not None:
        raise RequestValidationError(f"{label} token ids must be integers, got {bad!r}", param=label)
    return [int(t) for t in ids]


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """The request's max_tokens (what fits after the prompt when None), or a refusal naming the
    prompt (it leaves no room) or max_tokens (the two together do not fit)."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise RequestValidationError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens. However, the prompt has "
            f"{num_prompt_tokens} tokens, leaving no room to generate.", param="prompt",
            code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise RequestValidationError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens. However, "
            f"{num_prompt_tokens + max_tokens}"
            f" tokens were requested ({num_prompt_tokens} in the prompt, {max_tokens} for the completion): "
            f"max_tokens must be <= {room}.", param="max_tokens", code="context_length_exceeded")
    return max_tokens if max_tokens is not None else room


class InputProcessor:
    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, eos_token_ids: tuple[int, ...],
                 banned_width: int, num_pages: int, block_size: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.banned_width = banned_width   # ids one step can ban (min_tokens bans EOS and the stop ids)
        self.usable_pages = num_pages - 1  # page 0 is the padding page
        self.block_size = block_size

    def process(self, prompt: str | list[int] | dict, params: SamplingParams,
                prompt_text: str | None = None) -> tuple[list[int], str | None, int]:
        """(token ids, prompt text, max_tokens) of a request, or a RequestValidationError.
        A prompt is text, token ids, or vLLM's prompt dicts: {"prompt": text} (TextPrompt) or
        {"prompt_token_ids": ids} (TokensPrompt)."""
        if not isinstance(params, SamplingParams):
            raise RequestValidationError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, dict):
            prompt = prompt_from_dict(prompt)
        if isinstance(prompt, str):
            prompt_text = prompt
            token_ids = self.tokenizer(prompt).input_ids
        else:
            token_ids = integer_ids(prompt)
        return token_ids, prompt_text, self.check(token_ids, params)

    def check(self, token_ids: list[int], params: SamplingParams) -> int:
        """Every rule of a request with these token ids; its max_tokens."""
        if params.selected_sampler not in registry.names():  # unregistered since the params were made
            raise RequestValidationError(f"sampler {params.selected_sampler!r} is not registered "
                                         f"(registered: {registry.names()})", param="sampler")
        if not token_ids:
            raise RequestValidationError("prompt must not be empty: it needs at least one token", param="prompt")
        check_token_ids(token_ids, self.vocab_size, "prompt")
        # Never generated, and past int32 it would break the step's packed arrays.
        check_token_ids(params.stop_token_ids or (), self.vocab_size, "stop_token_ids")
        max_tokens = check_context(len(token_ids), params.max_tokens, self.max_model_len)
        if params.min_tokens and len(params.stop_token_ids or ()) + len(self.eos_token_ids) > self.banned_width:
            raise RequestValidationError(
                f"stop_token_ids may hold at most {self.banned_width - len(self.eos_token_ids)} ids when "
                f"min_tokens is set, got {len(params.stop_token_ids)}", param="stop_token_ids")
        pages = -(-(len(token_ids) + max_tokens) // self.block_size)
        if pages > self.usable_pages:
            raise RequestValidationError(
                f"prompt plus max_tokens needs {pages} KV pages but the cache has {self.usable_pages}: "
                "raise kv_cache_memory or lower max_tokens", param="max_tokens")
        return max_tokens
