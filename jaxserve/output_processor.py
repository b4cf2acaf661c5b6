"""Output processing: a step's sampled tokens -> the requests' outputs (vLLM v1's OutputProcessor).

Owns each user request's state on the way out: its n completions, their detokenizers and what
DELTA outputs have carried so far; applies the stop rules (EOS, stop token ids, stop strings with
the hold-back of a tail that could still become one, max_tokens, the context length); builds the
logprob entries; takes a speculative row's accepted tokens in order, dropping those after a
stop; and makes one RequestOutput per request per step in the shape its
RequestOutputKind asks for. The engine hands it each step's scheduler output and sampler result;
finishing a request (its pages back to the pool) is the scheduler's, through ``finish``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from jaxserve.detokenizer import IncrementalDetokenizer, add_tokens, decoding_for, find_stop
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.request import Request, RequestStatus
from jaxserve.runner import StepResult
from jaxserve.sampling.registry import DEFAULT_SAMPLER
from jaxserve.sampling_params import RequestOutputKind
from jaxserve.scheduler import SchedulerOutput


@dataclass(slots=True)
class RequestState:
    """One user request on the way out: its n completions share the prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # DELTA: per completion, the text, tokens and logprobs its outputs carried so far.
    sent: list[list[int]] = field(default_factory=list)
    decodes_live: bool = True     # text is read before the end (outputs each step, or stop strings)
    single: bool = True           # n == 1: its output is made in process's pass over the rows
    # output_kind as flags the per-row pass reads (an enum-class attribute costs ~80 ns a lookup)
    outputs_every_step: bool = True  # not FINAL_ONLY
    delta: bool = False           # DELTA
    streams_pieces: bool = False  # DELTA, one completion, no stop strings: OutputProcessor._piece_output
    sent_any: bool = False        # streams_pieces: an output went out (prompt_logprobs ride the first)
    # The stop rules of the common request, read without `_stop_status`: no stop strings, no stop
    # token ids, min_tokens at most 1 (each output token is at least the first), so only EOS and
    # the length end it.
    plain_stops: bool = False
    stop_ids: tuple[int, ...] = ()  # plain_stops: the ids that end it (EOS unless ignore_eos)
    token_limit: int = 0            # plain_stops: outputs at which it ends (max_tokens or the context)


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int, finish: Callable[[Request, RequestStatus], None]):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._finish = finish
        self.states: dict[str, RequestState] = {}
        decoding_for(tokenizer).byte_level()  # built now, not in the first request's time to first token

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], children: list[Request]) -> None:
        params = children[0].params
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                                         spaces_between_special_tokens=params.spaces_between_special_tokens)
                  for _ in children]
        kind = params.output_kind
        self.states[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, children, detoks, kind, [[0, 0, 0] for _ in children],
            decodes_live=kind is not RequestOutputKind.FINAL_ONLY or bool(params.stop), single=len(children) == 1,
            outputs_every_step=kind is not RequestOutputKind.FINAL_ONLY, delta=kind is RequestOutputKind.DELTA,
            streams_pieces=kind is RequestOutputKind.DELTA and len(children) == 1 and not params.stop,
            plain_stops=not params.stop and not params.stop_token_ids and params.min_tokens <= 1,
            stop_ids=() if params.ignore_eos else children[0].eos_token_ids,
            token_limit=min(children[0].max_tokens, self.max_model_len - len(prompt_token_ids)))

    def abort(self, request_id: str) -> list[Request]:
        """Forget a request; its completions, for the scheduler to finish ([] if unknown)."""
        state = self.states.pop(request_id, None)
        return state.children if state is not None else []

    def process(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        """Take a step's results; the outputs of the requests that advanced (finished ones last time).

        One pass over the sampled rows, after one batched detokenising call. A request with one
        completion gets its output in that pass: streamed as DELTA without stop strings (what the
        server streams), from this step's token and text piece alone. Requests with n > 1 get
        theirs after it, once all their completions took their tokens."""
        if result.prompt_logprobs is not None:
            self._store_prompt_logprobs(sched, result)
        now = time.monotonic()
        # Python lists once, not a numpy scalar per row.
        tokens, logprobs = result.tokens.tolist(), result.logprobs.tolist()
        # Speculative steps: each row's accepted drafts past its first token (none: all rejected).
        accepted = result.num_accepted.tolist() if result.num_accepted is not None else None
        states = self.states
        sampled: list[tuple[int, Request, RequestState, IncrementalDetokenizer | None]] = []
        live_detoks, live_tokens, live_rows = [], [], []
        for i, seq in enumerate(sched.seqs):
            if seq.samples:
                req = seq.request
                state = states[req.group_id]
                # Text is decoded now only where someone reads it before the end: outputs every
                # step, or stop strings to look for. The others' detokenizers are not touched
                # until they finish, and then take all their output ids at once (after a CPU
                # step each object touched per row is a cache miss).
                if state.decodes_live:
                    detok = state.detokenizers[req.sample_index]
                    live_detoks.append(detok)
                    live_tokens.append(tokens[i])
                    live_rows.append(len(sampled))
                    sampled.append((i, req, state, detok))
                else:
                    sampled.append((i, req, state, None))
        pieces = [""] * len(sampled)
        for k, piece in zip(live_rows, add_tokens(live_detoks, live_tokens)):
            pieces[k] = piece
        outputs: list[RequestOutput] = []
        touched: dict[str, RequestState] = {}
        for (i, req, state, detok), piece in zip(sampled, pieces):
            token = tokens[i]
            req.output_token_ids.append(token)
            if req.sampler_name != DEFAULT_SAMPLER:  # e.g. mirostat's mu, for the next step
                req.sampler_state = result.sampler_state[i].copy()
            req.cumulative_logprob += logprobs[i]
            if req.first_token_time is None:
                req.first_token_time = now
            entry = None
            if req.logprobs is not None:
                entry = self._logprob_entry(req.params.logprobs, token, logprobs[i],
                                            result.top_ids[i], result.top_logprobs[i])
                req.logprobs.append(entry)
            if state.plain_stops:  # _stop_status, inline for the common request
                status = (RequestStatus.FINISHED_STOPPED if token in state.stop_ids else
                          RequestStatus.FINISHED_LENGTH if len(req.output_token_ids) >= state.token_limit else None)
            else:
                status = self._stop_status(req, token, detok, len(piece))
            emitted = None  # the step's tokens, where the output carries them alone (DELTA) or drafts add some
            if accepted is not None and accepted[i] and status is None:
                emitted = [token]
                status, piece = self._take_accepted(req, state, result.spec_tokens[i, 1:accepted[i] + 1].tolist(),
                                                    piece, emitted)
            if req.matcher is not None and status is None:
                # Structured output: the grammar takes the token; once it is complete (or, a bug,
                # refuses one) the request ends as if at EOS.
                if not req.matcher.consume_token(token) or req.matcher.is_stopped():
                    status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                if detok is None:  # not decoding live: its text is made now, from all its output ids
                    detok = state.detokenizers[req.sample_index]
                    detok.defer(req.output_token_ids)
                piece += detok.flush()  # an unfinished character at the very end
                req.finish_time = now
                self._finish(req, status)
            if state.streams_pieces:
                outputs.append(self._piece_output(state, req, emitted or [token], piece, entry, status is not None))
            elif state.single:
                if status is not None:
                    self.states.pop(state.request_id, None)
                    outputs.append(self._single_output(state, req, detok, status._value_))
                elif state.outputs_every_step:
                    outputs.append(self._single_output(state, req, detok, None))
            else:
                touched[state.request_id] = state
        outputs.extend(out for out in map(self._output, touched.values()) if out is not None)
        return outputs

    def _take_accepted(self, req: Request, state: RequestState, drafts: list[int], piece: str,
                       emitted: list[int]) -> tuple[RequestStatus | None, str]:
        """A speculative row's accepted tokens after its first, each through the stop rules in
        order (those after a stop are dropped; such rows have no logprobs or grammar) ->
        (status, the step's text piece). Appends them to `emitted`."""
        detok = state.detokenizers[req.sample_index]
        for token in drafts:
            # A stream not decoding live takes its output ids when it finishes (process).
            new = detok.add_token(token) if state.decodes_live else ""
            req.output_token_ids.append(token)
            emitted.append(token)
            piece += new
            status = self._stop_status(req, token, detok, len(new))
            if status is not None:
                return status, piece
        return None, piece

    def _piece_output(self, state: RequestState, req: Request, tokens: list[int], piece: str,
                      entry: dict | None, finished: bool) -> RequestOutput:
        """The DELTA output of a single completion without stop strings: this step's tokens and
        text piece (a stop string's hold-back and cut need the whole text: `_output`)."""
        first = not state.sent_any
        state.sent_any = True
        if finished:
            self.states.pop(state.request_id, None)
        logprobs = req.logprobs is not None
        # Positional arguments: keywords cost a dataclass __init__ about three times as much.
        return RequestOutput(
            state.request_id, state.prompt, state.prompt_token_ids,
            [CompletionOutput(0, piece, tokens, req.cumulative_logprob if logprobs else None,
                              [entry] if logprobs else None, req.finish_reason, req.stop_reason)],
            finished, req.prompt_logprobs if first else None, req.num_cached_tokens,
            {"arrival_time": req.arrival_time, "scheduled_time": req.scheduled_time,
             "first_token_time": req.first_token_time})

    def _logprob_entry(self, num_top: int, token: int, logprob: float, top_ids, top_logprobs) -> dict[int, Logprob]:
        """vLLM's per-position logprobs: the chosen token, then the top ``num_top`` by rank."""
        top_ids = top_ids[:num_top].tolist()
        entry = {token: Logprob(float(logprob), top_ids.index(token) + 1 if token in top_ids else None,
                                self.tokenizer.decode([token]))}
        for rank, (tid, lp) in enumerate(zip(top_ids, top_logprobs[:num_top].tolist()), start=1):
            if tid not in entry:
                entry[tid] = Logprob(float(lp), rank, self.tokenizer.decode([tid]))
        return entry

    def _store_prompt_logprobs(self, sched: SchedulerOutput, result: StepResult) -> None:
        lps, top_ids, top_lps = result.prompt_logprobs
        offset = 0
        for seq in sched.seqs:
            req = seq.request
            if req.prompt_logprobs is not None:
                # Flat row offset + i scores prompt token start + i + 1 (recomputation overwrites alike).
                for i in range(max(0, min(seq.num_tokens, req.num_prompt_tokens - 1 - seq.start))):
                    pos = seq.start + i + 1
                    req.prompt_logprobs[pos] = self._logprob_entry(
                        req.params.prompt_logprobs, req.prompt_token_ids[pos], lps[offset + i],
                        top_ids[offset + i], top_lps[offset + i])
            offset += seq.num_tokens

    def _stop_status(self, req: Request, token: int, detok: IncrementalDetokenizer,
                     num_new_chars: int) -> RequestStatus | None:
        p = req.params
        num_out = len(req.output_token_ids)
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if p.stop_token_ids and token in p.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if p.stop and num_new_chars:
                found = find_stop(detok.text, num_new_chars, p.stop)
                if found is not None:
                    at, stop = found
                    req.stop_reason = stop
                    req.final_text = detok.text[:at + len(stop) if p.include_stop_str_in_output else at]
                    return RequestStatus.FINISHED_STOPPED
        if num_out >= req.max_tokens or num_out + len(req.prompt_token_ids) >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _single_output(state: RequestState, req: Request, detok: IncrementalDetokenizer,
                       finish_reason: str | None) -> RequestOutput:
        """`_output` of a request with one completion (its only one, `req`), without its passes
        over the completions; the caller knows whether it finished and whether its kind wants an
        output now."""
        if state.delta:
            prompt_logprobs = req.prompt_logprobs if not state.sent[0][1] else None
            completion = _completion(req, detok, finish_reason, state.sent[0])
        else:
            prompt_logprobs, completion = req.prompt_logprobs, _completion(req, detok, finish_reason)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion],
                             finish_reason is not None,
                             prompt_logprobs, req.num_cached_tokens,
                             {"arrival_time": req.arrival_time, "scheduled_time": req.scheduled_time,
                              "first_token_time": req.first_token_time})

    def _output(self, state: RequestState) -> RequestOutput | None:
        """The request's output after a step it advanced in (None: its kind wants none yet)."""
        children = state.children
        finished = all(req.is_finished for req in children)
        if finished:
            self.states.pop(state.request_id, None)
        elif not state.outputs_every_step:
            return None
        first = children[0]
        prompt_logprobs = first.prompt_logprobs
        if state.delta:
            prompt_logprobs = prompt_logprobs if not state.sent[0][1] else None
            outputs = [_completion(req, detok, req.finish_reason, sent) for req, detok, sent in
                       zip(children, state.detokenizers, state.sent)]
        else:
            outputs = [_completion(req, detok, req.finish_reason) for req, detok in zip(children, state.detokenizers)]
        first_token = (first.first_token_time if len(children) == 1 else
                       min((r.first_token_time for r in children if r.first_token_time is not None), default=None))
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs, finished,
                             prompt_logprobs, first.num_cached_tokens,
                             {"arrival_time": first.arrival_time, "scheduled_time": first.scheduled_time,
                              "first_token_time": first_token})


def _completion(req: Request, detok: IncrementalDetokenizer, finish_reason: str | None,
                sent: list[int] | None = None) -> CompletionOutput:
    """One completion (`finish_reason`: its own, None while it runs): all of it so far
    (CUMULATIVE), or with `sent` (DELTA: [text chars, tokens, logprobs] already carried, moved
    on here) only what is new."""
    text = detok.text
    if finish_reason is not None:
        text = text if req.final_text is None else req.final_text
    elif req.params.stop:
        # While running, hold back a tail that could still turn out to be a stop string.
        hold = req.params.max_stop_len - 1
        text = text[:max(0, len(text) - hold)] if hold else text
    tokens, logprobs = req.output_token_ids, req.logprobs
    if sent is None:
        tokens, logprobs = list(tokens), list(logprobs) if logprobs is not None else None
    else:
        num_chars, num_tokens = len(text), len(tokens)
        text, tokens = text[sent[0]:], tokens[sent[1]:]
        if logprobs is not None:
            num_logprobs, logprobs = len(logprobs), logprobs[sent[2]:]
            sent[2] = num_logprobs
        sent[0], sent[1] = num_chars, num_tokens
    return CompletionOutput(req.sample_index, text, tokens,
                            req.cumulative_logprob if req.logprobs is not None else None,
                            logprobs, finish_reason, req.stop_reason)
