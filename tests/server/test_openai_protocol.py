"""OpenAI request bodies -> SamplingParams and errors naming the field; logprobs objects; no server."""
from __future__ import annotations

import pytest

from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.server import logprobs
from jaxserve.server import openai_protocol as proto
from jaxserve.server.validation import RequestError, parse_json_body


def _error(fn, *args) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn(*args)
    return e.value


def test_completion_fields_map_onto_sampling_params():
    req = proto.parse_completion({
        "model": "m", "prompt": ["a", "b"], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 2,
        "stop": "x", "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": 2, "echo": True,
        "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
        "stop_token_ids": [9], "skip_special_tokens": False, "include_stop_str_in_output": True, "user": "ignored",
        "stream": True, "stream_options": {"include_usage": True}})
    p = req.params
    assert req.prompts == ["a", "b"] and req.echo and req.stream and req.include_usage
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (7, 0.5, 0.9, 2, ["x"], 3)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.prompt_logprobs) == (0.1, 0.2, 2, 2)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.ignore_eos) == (5, 0.05, 1.1, 2, True)
    assert p.stop_token_ids == [9] and not p.skip_special_tokens and p.include_stop_str_in_output


def test_pluggable_sampler_extras_map_onto_sampling_params():
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    p = proto.parse_chat({**chat, "typical_p": 0.8, "repeat_last_n": 16}).params
    assert (p.typical_p, p.repeat_last_n, p.selected_sampler) == (0.8, 16, "typical")
    p = proto.parse_chat({**chat, "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2}).params
    assert (p.mirostat, p.mirostat_tau, p.mirostat_eta, p.selected_sampler) == (2, 4.0, 0.2, "mirostat2")
    assert proto.parse_completion({"model": "m", "prompt": "a", "tfs_z": 0.9}).params.selected_sampler == "tfs"
    for field, value in (("typical_p", 0.0), ("mirostat", 3), ("sampler", "no-such-sampler"), ("tfs_z", "x")):
        err = _error(proto.parse_chat, {**chat, field: value})
        assert err.status == 400 and field in err.message, (field, err.message)


def test_completion_defaults_and_prompt_shapes():
    req = proto.parse_completion({"model": "m", "prompt": "hi"})
    assert req.params.max_tokens == 16 and req.params.temperature == 1.0 and not req.stream
    assert proto.parse_completion({"model": "m", "prompt": [1, 2]}).prompts == [[1, 2]]
    assert proto.parse_completion({"model": "m", "prompt": [[1], [2, 3]]}).prompts == [[1], [2, 3]]
    for bad in ([], [1, "a"], [True], 5, {"a": 1}):
        assert _error(proto.parse_completion, {"model": "m", "prompt": bad}).param == "prompt"


def test_chat_fields_and_max_completion_tokens():
    req = proto.parse_chat({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}],
                            "max_completion_tokens": 5, "max_tokens": 9, "logprobs": True, "top_logprobs": 3})
    assert req.messages == [{"role": "user", "content": "ab"}]
    assert req.params.max_tokens == 5 and req.params.logprobs == 3 and req.logprobs
    plain = proto.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert plain.params.max_tokens is None and plain.params.logprobs is None  # None: up to the context limit
    assert proto.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                             "logprobs": True}).params.logprobs == 0


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "1"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": True}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 1}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "guided_regex": 5}, "guided_regex"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "guided_regex": "a", "response_format":
      {"type": "json_object"}}, "guided_regex"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}}, "logit_bias"),
])
def test_chat_errors_name_the_field(body, param):
    err = _error(proto.parse_chat, body)
    assert err.param == param and err.status == 400
    assert param.split("[")[0] in err.message


def test_response_format_text_is_accepted():
    proto.parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "text"}})


def test_json_body_errors():
    for raw in (b"", b"{", b"[]", b"\xff"):
        assert _error(parse_json_body, raw).code == "invalid_json"
    assert parse_json_body(b'{"a": 1}') == {"a": 1}


def test_error_body_shape():
    assert proto.error_body("bad", param="n", code="invalid_value") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}}


def _entry(chosen, *ranked):
    """A logprob entry as the engine makes it: the chosen token first, then the top ones by rank."""
    entry = {chosen[0]: Logprob(chosen[1], chosen[2], chosen[3])}
    for rank, (tid, lp, text) in enumerate(ranked, start=1):
        entry.setdefault(tid, Logprob(lp, rank, text))
    return entry


def test_one_logprob_formatter_for_chat_and_ollama():
    entry = _entry((5, -0.5, 1, "Hi"), (5, -0.5, "Hi"), (6, -1.5, " yo"), (7, float("-inf"), "!"))
    items = logprobs.token_logprobs([entry], [5], 3)
    (item,) = logprobs.openai_chat(items)
    assert item["token"] == "Hi" and item["logprob"] == -0.5 and item["bytes"] == list(b"Hi")
    assert [t["token"] for t in item["top_logprobs"]] == ["Hi", " yo", "!"]
    assert item["top_logprobs"][2]["logprob"] == -9999.0  # -inf is not JSON
    assert logprobs.openai_chat(logprobs.token_logprobs([entry], [5], 0))[0]["top_logprobs"] == []
    (ollama,) = logprobs.ollama(items)
    assert ollama == {"token": "Hi", "logprob": -0.5, "top_logprobs": [
        {"token": "Hi", "logprob": -0.5}, {"token": " yo", "logprob": -1.5}, {"token": "!", "logprob": -9999.0}]}


def test_completion_logprobs_offsets_run_over_echo_and_pieces():
    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    b = logprobs.CompletionLogprobs(Tok(), 1)
    echo = b.piece([None, _entry((2, -0.1, 1, "<2>"), (2, -0.1, "<2>"))], [1, 2])
    assert echo["tokens"] == ["<1>", "<2>"] and echo["token_logprobs"] == [None, -0.1]
    assert echo["top_logprobs"] == [None, {"<2>": -0.1}] and echo["text_offset"] == [0, 3]
    gen = b.piece([_entry((9, -2.0, 3, "ab"), (4, -0.2, "c"))], [9])
    assert gen["text_offset"] == [6] and gen["top_logprobs"] == [{"ab": -2.0, "c": -0.2}]
    merged = logprobs.merge(echo, gen)
    assert merged["tokens"] == ["<1>", "<2>", "ab"]


def test_completion_choices_echo_each_prompt_once_per_sample_with_its_logprobs():
    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    prompt_lps = [None, _entry((8, -0.3, 1, "<8>"), (8, -0.3, "<8>"))]
    choices = proto.CompletionChoices(Tok(), [([7, 8], None)], n=2, echo=True, num_top=0)
    first = RequestOutput("r", None, [7, 8], [CompletionOutput(0, "a", [1], None, [_entry((1, -1.0, 1, "a"))])],
                          False, prompt_logprobs=prompt_lps)
    # Sample 1 appears only in the second delta, which no longer carries the prompt logprobs.
    second = RequestOutput("r", None, [7, 8], [
        CompletionOutput(0, "", [], None, [], "length"),
        CompletionOutput(1, "b", [2], None, [_entry((2, -2.0, 1, "b"))], "length")], True)
    for out in (first, second):
        for c in out.outputs:
            fragment = choices.fragment(0, out, c)
            if fragment is not None:
                choices.add(fragment)
    a, b = choices.final()
    assert (a["index"], a["text"], a["finish_reason"]) == (0, "<7><8>a", "length")
    assert (b["index"], b["text"]) == (1, "<7><8>b")
    for choice, token in ((a, "a"), (b, "b")):
        assert choice["logprobs"]["tokens"] == ["<7>", "<8>", token]
        assert choice["logprobs"]["token_logprobs"][:2] == [None, -0.3]
        assert choice["logprobs"]["text_offset"] == [0, 3, 6]
    assert choices.num_generated == 2
