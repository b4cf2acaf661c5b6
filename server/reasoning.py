"""Reasoning parsers (--reasoning-parser, vLLM's names): a model's `<think>…</think>` text split
from its answer as it streams, into /v1's `reasoning` and Ollama's `thinking`.

`deepseek_r1`: the template opens the think block in the prompt, so the output is reasoning until
`</think>` (an opening `<think>` the model writes anyway is dropped). `qwen3`: reasoning only when
the output opens with `<think>` (Qwen3 skips the block when thinking is off).
"""
from __future__ import annotations

import dataclasses

START, END = "<think>", "</think>"


@dataclasses.dataclass(frozen=True)
class ReasoningFormat:
    name: str
    starts_in_reasoning: bool


REASONING_FORMATS = {"deepseek_r1": ReasoningFormat("deepseek_r1", True),
                     "qwen3": ReasoningFormat("qwen3", False)}
PARSER_NAMES = tuple(REASONING_FORMATS)


def _tag_prefix_len(text: str, tag: str) -> int:
    """Characters at the end of `text` that could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningParser:
    """Generated text -> (reasoning, content) pieces; a tag's first characters are held until known."""

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        self.state = "begin"    # begin (the opening tag may come), reasoning, content
        self.held = ""
        self.content_started = False  # the blank lines after </think> are not content

    def feed(self, text: str) -> tuple[str, str]:
        self.held += text
        reasoning = content = ""
        if self.state == "begin":
            stripped = self.held.lstrip()
            if stripped.startswith(START):
                self.held, self.state = stripped[len(START):], "reasoning"
            elif START.startswith(stripped):
                return "", ""   # may still be the opening tag
            else:
                self.state = "reasoning" if self.fmt.starts_in_reasoning else "content"
        if self.state == "reasoning":
            end = self.held.find(END)
            if end < 0:
                keep = _tag_prefix_len(self.held, END)
                reasoning, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
                return reasoning, ""
            reasoning, self.held, self.state = self.held[:end], self.held[end + len(END):], "content"
        if self.state == "content":
            content, self.held = self.held, ""
            if not self.content_started:
                content = content.lstrip()
                self.content_started = bool(content)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "reasoning":
            return held, ""
        if self.state == "begin":  # only the start of a tag, or blanks: the answer after all
            return ("", held) if not self.fmt.starts_in_reasoning else (held, "")
        return "", held
