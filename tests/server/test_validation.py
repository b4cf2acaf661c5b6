"""The bounded JSON body parser both APIs share: every limit at its edge, the field each refusal
names, and its speed on a 4 MB body; no server."""
from __future__ import annotations

import json
import time

import pytest

from jaxserve.server.validation import (MAX_DEPTH, MAX_NUMBER_CHARS, RequestError, device_ints, get,
                                        parse_json_body)


def _refused(raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as e:
        parse_json_body(raw)
    assert e.value.status == 400 and e.value.code == "invalid_json", e.value.message
    return e.value


def _nested(depth: int) -> str:
    """A value that, under the body object, brings the nesting to `depth` levels."""
    return "[" * (depth - 1) + "]" * (depth - 1)


def test_nesting_up_to_the_limit_parses_and_one_more_is_refused_naming_the_field():
    assert parse_json_body(f'{{"prompt": {_nested(MAX_DEPTH)}}}'.encode())["prompt"]
    e = _refused(f'{{"prompt": {_nested(MAX_DEPTH + 1)}}}'.encode())
    assert e.param == "prompt" and f"more than {MAX_DEPTH} levels" in e.message


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 100_000, 1_000_000])
def test_deep_nesting_never_recurses_and_names_the_path(depth):
    raw = ('{"model": "m", "messages": [{"role": "user", "content": ' + "[" * depth + "]" * depth + "}]}").encode()
    assert _refused(raw).param == "messages[0].content"
    opened = ('{"options": ' + '{"a": ' * depth).encode()  # never closed: still too deep, not a parse error
    assert _refused(opened).param == "options.a"
    assert _refused(b"[" * depth).param is None


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = "[{" * 5_000 + '\\"]' * 10
    assert parse_json_body(json.dumps({"prompt": text}).encode())["prompt"] == text


@pytest.mark.parametrize("token, param", [
    ("9" * (MAX_NUMBER_CHARS + 1), "seed"),
    ("-" + "9" * 5_000, "seed"),
    ("1" * 50_000, "seed"),
    ("0." + "1" * MAX_NUMBER_CHARS, "seed"),
])
def test_long_numbers_are_refused_before_int_or_float_sees_them(token, param):
    e = _refused(f'{{"model": "m", "seed": {token}}}'.encode())
    assert e.param == param and str(MAX_NUMBER_CHARS) in e.message


def test_numbers_up_to_the_limit_parse_exactly():
    body = parse_json_body(f'{{"a": {"9" * MAX_NUMBER_CHARS}, "b": -{"9" * (MAX_NUMBER_CHARS - 1)}}}'.encode())
    assert body == {"a": 10 ** MAX_NUMBER_CHARS - 1, "b": -(10 ** (MAX_NUMBER_CHARS - 1) - 1)}
    assert parse_json_body(b'{"t": 1e308, "u": 5e-324, "v": -0.0}') == {"t": 1e308, "u": 5e-324, "v": -0.0}


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_refused(token):
    e = _refused(f'{{"options": {{"temperature": {token}}}}}'.encode())
    assert e.param == "options.temperature" and token in e.message


@pytest.mark.parametrize("raw, param", [
    (rb'{"prompt": "\ud800a\udc00"}', "prompt"),
    (rb'{"system": "ok \udfff"}', "system"),
    (rb'{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "\udbff"}]}',
     "messages[1].content"),
    (rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]}',
     "messages[0].content[0].text"),
    (rb'{"stop": ["a", "\ud800"]}', "stop[1]"),
    (rb'{"options": {"\udc00": 1}}', "options"),
])
def test_lone_surrogates_are_refused_naming_the_string(raw, param):
    e = _refused(raw)
    assert e.param == param and "surrogate" in e.message


def test_surrogate_pairs_and_escaped_backslashes_are_text():
    assert parse_json_body(rb'{"prompt": "\ud83d\ude00 \\ud800"}') == {"prompt": "\U0001F600 \\ud800"}


@pytest.mark.parametrize("raw", [b'{"a": "\xff"}', b'\xc0\xaf{}', b'{"a": "\xed\xa0\x80"}',
                                 '{"a": 1}'.encode("utf-16")])
def test_bodies_that_are_not_utf8_are_refused(raw):
    assert "UTF-8" in _refused(raw).message


def test_a_byte_order_mark_is_ignored_and_other_failures_are_400s():
    assert parse_json_body(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}
    for raw in (b"", b"{", b'{"a": }', b"[]", b"null", b'"text"', b"{} x", b'{"a": 1, "a": NaN, "a": 2}'):
        _refused(raw)


def test_a_4mb_body_parses_in_linear_time():
    """The checks around json.loads (depth scan, number hooks, surrogate search) stay linear: within
    a small factor of json.loads alone on the same bytes (about 10x here, from the per-number hook),
    where a pass that rescanned the text per bracket or number would be far past that. Relative, so a slow or
    busy CI host does not matter; best of three runs of each."""
    ids = [[i % 49_000 for i in range(1_000)] for _ in range(700)]  # ~3.4 MB of token ids
    text = "hello [world] {x} \" \U0001F600 " * 40_000                # ~1 MB of text with brackets
    raw = json.dumps({"model": "m", "prompt": ids, "text": text}).encode()
    assert len(raw) > 4_000_000

    def best_of_three(parse) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            parse(raw)
            times.append(time.perf_counter() - start)
        return min(times)

    assert best_of_three(parse_json_body) < 30 * best_of_three(json.loads)
    body = parse_json_body(raw)
    assert body["prompt"] == ids and body["text"] == text


def test_int_fields_are_64_bit_and_device_ints_are_bounded():
    assert get({"seed": 2 ** 63 - 1}, "seed", "int") == 2 ** 63 - 1
    for value in (2 ** 63, -2 ** 63 - 1):
        with pytest.raises(RequestError) as e:
            get({"seed": value}, "seed", "int", where="options.")
        assert e.value.param == "options.seed" and e.value.code == "invalid_value"
    with pytest.raises(RequestError) as e:
        get({"tokens": [1, 2 ** 64]}, "tokens", "int_list")
    assert e.value.param == "tokens"
    kwargs = {"top_k": 2 ** 40}
    device_ints(kwargs, str)
    assert kwargs == {"top_k": -1}  # more than any vocabulary: keep every token
    with pytest.raises(RequestError) as e:
        device_ints({"stop_token_ids": [2, 2 ** 31]}, lambda name: f"options.{name}")
    assert e.value.param == "options.stop_token_ids"
