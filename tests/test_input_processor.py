"""The request checks' one home (jaxserve/input_processor.py): each refusal names its field and
code, and the server's RequestRefusedError renames the field as its API spells it."""
import pytest

from jaxserve.async_engine import RequestRefusedError
from jaxserve.input_processor import InputProcessor, RequestValidationError, check_context, check_token_ids
from jaxserve.sampling_params import SamplingParams


def refusal(fn, *args):
    with pytest.raises(RequestValidationError) as e:
        fn(*args)
    return e.value


def test_context_check_names_the_prompt_or_max_tokens():
    assert check_context(10, 5, 16) == 5 and check_context(10, None, 16) == 6
    e = refusal(check_context, 16, None, 16)
    assert (e.param, e.code) == ("prompt", "context_length_exceeded") and "16 tokens" in str(e)
    e = refusal(check_context, 10, 7, 16)
    assert (e.param, e.code) == ("max_tokens", "context_length_exceeded") and "max_tokens must be <= 6" in str(e)


def test_token_ids_outside_the_vocabulary_name_the_first_and_the_field():
    check_token_ids([0, 99], 100)
    e = refusal(check_token_ids, [3, 100, -1], 100, "context")
    assert e.param == "context" and "holds token id 100" in str(e)


@pytest.mark.parametrize("ids, params, param, needle", [
    ([], SamplingParams(), "prompt", "must not be empty"),
    ([1, 2, 500], SamplingParams(), "prompt", "token id 500"),
    ([1] * 60, SamplingParams(max_tokens=10), "max_tokens", "max_tokens must be <= 4"),
    ([1], SamplingParams(stop_token_ids=[7, 500]), "stop_token_ids", "token id 500"),
    ([1], SamplingParams(min_tokens=2, stop_token_ids=list(range(20))), "stop_token_ids", "at most 15"),
    ([1] * 40, SamplingParams(max_tokens=20), "max_tokens", "KV pages"),
])
def test_every_rule_names_its_field(ids, params, param, needle):
    processor = InputProcessor(None, vocab_size=100, max_model_len=64, eos_token_ids=(2,), banned_width=16,
                               num_pages=4, block_size=16)  # 3 usable pages: 48 tokens
    e = refusal(processor.check, ids, params)
    assert e.param == param and needle in str(e), str(e)


def test_refusals_rename_their_field_for_the_api():
    e = RequestRefusedError("prompt has 9 tokens", "prompt", "context_length_exceeded").renamed({"prompt": "messages"})
    assert (str(e), e.param, e.code) == ("messages has 9 tokens", "messages", "context_length_exceeded")
    same = RequestRefusedError("x", "n").renamed({"prompt": "messages"})
    assert (str(same), same.param) == ("x", "n")
