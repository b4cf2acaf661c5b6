"""Structured output on the host: grammars compiled by llguidance, one matcher per request, and a
step's packed token bitmask.

`GrammarCompiler` turns a request's StructuredOutputsParams (a JSON schema, any JSON object, a
regex, a choice, a Lark or GBNF grammar) into llguidance's grammar, compiled against the model's
tokenizer within a time limit, and caches it by its source: a schema seen before costs a dict
lookup. The server's requests are compiled off the event loop and the engine thread before they
are queued (AsyncEngine._compile), so the engine thread only looks them up and a slow schema never
holds up its steps; the time limit counts a grammar's own compile, not its wait in line. A bad
constraint is refused with a RequestValidationError naming the field (`structured_outputs.<kind>`),
as any other bad request is. `matcher()` gives a request its own LLMatcher (a copy of the cached
one, advanced with each accepted token); `fill_bitmask` writes the allowed next tokens of a
step's constrained rows into a `[B, ceil(V / 32)]` int32 array, bit i of word w allowing token
32 w + i (ids past the tokenizer's own vocabulary, padding rows of the embedding, never allowed).
EOS is allowed only where the grammar accepts. The rows are filled in llguidance's Rust threads
without the GIL, while the device runs the step's forward graph (jaxserve/runner.py).
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import threading
from collections import OrderedDict

import numpy as np

from jaxserve.input_processor import RequestValidationError
from jaxserve.sampling_params import StructuredOutputsParams

_MAX_CACHED_GRAMMARS = 1024


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def grammar_source(so: StructuredOutputsParams) -> tuple[str, str]:
    """(field, llguidance grammar text) of a constraint, before it is checked."""
    import llguidance

    options = {}
    if so.disable_any_whitespace:
        options["whitespace_flexible"] = False
    if so.whitespace_pattern is not None:
        options["whitespace_pattern"] = so.whitespace_pattern
    if so.json is not None:
        schema = so.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise RequestValidationError(f"structured_outputs.json is not valid JSON: {e}",
                                             param="structured_outputs.json") from None
        return "json", llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options or None)
    if so.json_object:
        return "json_object", llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                             defaults=options or None)
    if so.regex is not None:
        return "regex", llguidance.LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        # Lark string literals take JSON's escapes, so any choice text is spelled exactly.
        return "choice", llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in so.choice))
    from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

    try:  # Lark as it is; GBNF / EBNF as llama.cpp writes it, converted to Lark
        text = any_to_lark(so.grammar)
    except (GbnfToLarkError, ValueError) as e:
        raise RequestValidationError(f"structured_outputs.grammar is not a valid grammar: {e}",
                                     param="structured_outputs.grammar") from None
    return "grammar", llguidance.LLMatcher.grammar_from_lark(text)


class GrammarCompiler:
    """Compiled llguidance grammars for one tokenizer, cached by their source. Safe to call from
    any thread: AsyncEngine compiles a request's constraint before queueing it, so the engine
    thread finds it here."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...] = (), *,
                 timeout_s: float):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size          # the model's (its embedding rows): the bitmask's width
        self.eos_token_ids = list(eos_token_ids)  # the model's: allowed only where the grammar accepts
        self.timeout_s = timeout_s            # --structured-outputs-timeout: longer compiles are refused
        self._tokenizer = None                # llguidance's view of it, built on first use (~0.4 s)
        self._tokenizer_lock = threading.Lock()
        # grammar text -> a matcher at its start, never advanced: each request gets a copy (a few
        # us), where building a matcher parses the grammar again (as long as compiling it).
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_lock = threading.Lock()
        # Compiling runs in a thread of its own so a grammar that takes too long is refused on
        # time; llguidance drops the GIL while it builds one.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-grammar")

    @property
    def tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                               eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def compile(self, so: StructuredOutputsParams):
        """The compiled grammar of a constraint (cached; `matcher()` starts a request on it), or
        a RequestValidationError naming its field. Waits for the compile: milliseconds for
        common schemas, `timeout_s` at most."""
        import llguidance

        field, grammar = grammar_source(so)
        with self._cache_lock:
            compiled = self._cache.get(grammar)
            if compiled is not None:
                self._cache.move_to_end(grammar)
                return compiled
        param = f"structured_outputs.{field}"
        tokenizer = self.tokenizer  # built once, on first use: not this grammar's compile time
        started = threading.Event()

        def build():
            started.set()
            return llguidance.LLMatcher(tokenizer, grammar, log_level=0)

        future = self._pool.submit(build)
        # The limit is this grammar's own compile time: time spent queued behind other requests'
        # compiles is theirs (one thread, so 32 fresh schemas at once wait in turn).
        started.wait()
        try:
            compiled = future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise RequestValidationError(f"{param} took longer than {self.timeout_s:g} s to compile "
                                         f"(--structured-outputs-timeout)", param=param) from None
        if compiled.is_error():
            raise RequestValidationError(f"{param} is not a valid constraint: {compiled.get_error()}", param=param)
        with self._cache_lock:
            self._cache[grammar] = compiled
            if len(self._cache) > _MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, compiled):
        """A request's own matcher of a compiled grammar, at its start."""
        return compiled.deep_copy()

    @functools.cached_property
    def _executor(self):
        import llguidance

        return llguidance.LLExecutor()  # Rust threads: 80% of the CPUs, at most 32

    def fill_bitmask(self, bitmask: np.ndarray, rows: list[tuple[int, object]]) -> None:
        """Write each (row, matcher)'s allowed next tokens into its row of `bitmask`: one call
        into llguidance's threads, which hold no GIL (the engine calls it while the device runs)."""
        import llguidance.numpy as llnp

        llnp.fill_next_token_bitmask_par(self._executor, [(matcher, row) for row, matcher in rows], bitmask)


def allowed_ids(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a packed bitmask row allows (for tests and debugging)."""
    bits = (bitmask_row.astype(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.flatnonzero(bits.reshape(-1)[:vocab_size])
