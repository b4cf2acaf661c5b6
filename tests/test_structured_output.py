"""Structured output's host half (jaxserve/structured_output.py) with SmolLM2's real tokenizer:
constraints compile and are cached by source, bad ones are refused naming their field, a
matcher's bitmask allows exactly the tokens that keep the output valid and EOS only where it
may end, and walking the bitmask greedily from random logits yields valid output."""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from jaxserve.input_processor import RequestValidationError
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams
from jaxserve.structured_output import GrammarCompiler, allowed_ids, bitmask_words

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler():
    from jaxserve.models import bundled_model_path
    from jaxserve.models.loader_gguf import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer(bundled_model_path())
    return GrammarCompiler(tokenizer, len(tokenizer), eos_token_ids=(2,), timeout_s=5.0)


def walk(compiler, so, seed, max_tokens=60):
    """Decode under the constraint from random logits (the masked argmax): the text and whether it ended."""
    rng = np.random.default_rng(seed)
    matcher = compiler.matcher(compiler.compile(so))
    ids = []
    for _ in range(max_tokens):
        mask = np.full((2, bitmask_words(compiler.vocab_size)), -1, np.int32)  # as the runner hands it over
        compiler.fill_bitmask(mask, [(1, matcher)])
        assert (mask[0] == -1).all()  # an unconstrained row is left alone
        allowed = allowed_ids(mask[1], compiler.vocab_size)
        token = int(allowed[np.argmax(rng.standard_normal(len(allowed)))])
        if token == 2:
            assert matcher.is_accepting()
            return compiler.hf_tokenizer.decode(ids), True
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    return compiler.hf_tokenizer.decode(ids), False


@pytest.mark.parametrize("so, check", [
    (StructuredOutputsParams(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    (StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True),
     lambda t: set(json.loads(t)) == {"name", "age"} and " " not in t.replace(json.loads(t)["name"], "")),
    (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    (StructuredOutputsParams(regex=r"\d{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"\d{3}-[a-z]{2,4}", t)),
    (StructuredOutputsParams(choice=["yes", "no", 'it "depends"']), lambda t: t in ("yes", "no", 'it "depends"')),
    (StructuredOutputsParams(grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]+/'),
     lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
    (StructuredOutputsParams(grammar='root ::= "x" [0-9]+ "y"'), lambda t: re.fullmatch(r"x\d+y", t)),
], ids=["json", "json-compact", "json-object", "regex", "choice", "lark", "gbnf"])
def test_walking_the_bitmask_gives_valid_output(compiler, so, check):
    for seed in range(3):
        text, ended = walk(compiler, so, seed)
        if ended or so.kind not in ("json", "json_object"):  # a random walk may run long inside a JSON string
            assert ended and check(text), text


def test_compiled_grammars_are_cached_by_source(compiler):
    first = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA))) is first


@pytest.mark.parametrize("so, param", [
    (StructuredOutputsParams(json={"type": "nonsense"}), "structured_outputs.json"),
    (StructuredOutputsParams(json="{not json"), "structured_outputs.json"),
    (StructuredOutputsParams(regex="(unclosed"), "structured_outputs.regex"),
    (StructuredOutputsParams(grammar="start: undefined_rule"), "structured_outputs.grammar"),
])
def test_bad_constraints_are_refused_naming_the_field(compiler, so, param):
    with pytest.raises(RequestValidationError) as e:
        compiler.compile(so)
    assert e.value.param == param and param in str(e.value)


def big_schema(fields: int = 300) -> dict:
    """A schema that takes llguidance tens of milliseconds or more to compile."""
    properties = {f"field_{i}": {"type": "string", "pattern": "[a-z]{3,9}-[0-9]+"} for i in range(fields)}
    return {"type": "object", "properties": properties, "required": sorted(properties)}


def test_a_constraint_that_compiles_too_long_is_refused_on_time(compiler):
    import time

    slow = GrammarCompiler(compiler.hf_tokenizer, compiler.vocab_size, timeout_s=0.001)
    slow._tokenizer = compiler.tokenizer
    start = time.perf_counter()
    with pytest.raises(RequestValidationError, match="took longer than 0.001 s to compile") as e:
        slow.compile(StructuredOutputsParams(json=big_schema()))
    assert e.value.param == "structured_outputs.json" and time.perf_counter() - start < 0.5


def test_the_time_limit_counts_the_compile_not_its_wait_in_line(compiler):
    """Compiles run one at a time: a constraint queued behind another request's compile (held
    here past the limit) is not refused for the wait."""
    import time

    queued = GrammarCompiler(compiler.hf_tokenizer, compiler.vocab_size, timeout_s=0.3)
    queued._tokenizer = compiler.tokenizer
    queued._pool.submit(time.sleep, 0.6)  # the compile thread is busy for twice the limit
    start = time.perf_counter()
    assert queued.compile(StructuredOutputsParams(regex="[a-z]+@[a-z]+"))
    assert time.perf_counter() - start >= 0.6  # it did wait its turn


def test_structured_outputs_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"json": {}})
    assert SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"])).structured_outputs.kind == "choice"


# ---------------------------------------------------------------- through the engine (SmolLM2)

PROMPT = "Describe a person as JSON with a name and an age:"


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_generate_under_a_json_schema_gives_valid_json(smollm2_llm, sampled):
    params = SamplingParams(temperature=0.8 if sampled else 0.0, seed=7, n=2 if sampled else 1, max_tokens=80,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    (out,) = smollm2_llm.generate([PROMPT], params, use_tqdm=False)
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop"


def test_constrained_and_free_requests_share_steps(smollm2_llm):
    free = SamplingParams(temperature=0.0, max_tokens=12)
    alone = smollm2_llm.generate(["The capital of France is"], free, use_tqdm=False)[0].outputs[0].token_ids
    outs = smollm2_llm.generate(
        ["The capital of France is", "Is the sky blue? Answer:", "A US zip code:"],
        [free, SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=StructuredOutputsParams(
            choice=["yes", "no"])),
         SamplingParams(temperature=0.7, seed=3, max_tokens=12, logprobs=1,
                        structured_outputs=StructuredOutputsParams(regex=r"\d{5}"))], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone  # the masked graph changes nothing for free rows
    assert outs[1].outputs[0].text in ("yes", "no")
    assert re.fullmatch(r"\d{5}", outs[2].outputs[0].text) and len(outs[2].outputs[0].logprobs) > 0


def test_a_bad_constraint_is_refused_and_the_engine_goes_on(smollm2_llm):
    engine = smollm2_llm.engine
    with pytest.raises(RequestValidationError) as e:
        engine.add_request("bad-regex", "hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")))
    assert e.value.param == "structured_outputs.regex"
    assert "bad-regex" not in engine.groups and not engine.has_unfinished_requests()


def test_constrained_requests_survive_preemption(smollm2_llm):
    """Preempted requests recompute their KV and keep their accepted tokens, so each keeps its
    matcher where it was: under page pressure the constrained outputs are the ones each request
    gives alone, and valid."""
    from jaxserve import LLM
    from testlib import SMOLLM2_ENGINE_ARGS

    cfg = smollm2_llm.loaded.config
    page_bytes = 2 * cfg.num_layers * 16 * cfg.num_kv_heads * cfg.head_dim * 4  # K+V of a 16-token fp32 page
    tight = LLM(**{**SMOLLM2_ENGINE_ARGS, "max_num_seqs": 4}, kv_cache_memory=7 * page_bytes, warmup=False)
    prompts = [f"Describe person number {i} as JSON with a long name and an age:" for i in range(4)]
    # A name of 40-60 characters: each reply needs about 3 pages, 4 at once more than the 7 there are.
    schema = {**SCHEMA, "properties": {**SCHEMA["properties"],
                                       "name": {"type": "string", "minLength": 40, "maxLength": 60}}}
    params = SamplingParams(temperature=0.0, max_tokens=64, structured_outputs=StructuredOutputsParams(json=schema))
    alone = [tight.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    assert tight.stats().num_preemptions == 0
    together = [o.outputs[0] for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.stats().num_preemptions > 0
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for c in together:
        jsonschema.validate(json.loads(c.text), schema)


def test_the_bitmask_is_filled_while_the_forward_graph_runs(smollm2_llm, monkeypatch):
    """The runner calls the engine's bitmask filler only after queueing the step's forward graph
    (its new KV cache is already the runner's), and the constrained rows still come out valid."""
    runner = smollm2_llm.engine.runner
    execute, forward_queued = runner.execute, []

    def spying_execute(sched, rows, fill_bitmask=None, *rest):
        cache_before = runner.kv_cache

        def spy(bitmask):
            forward_queued.append(runner.kv_cache is not cache_before)
            fill_bitmask(bitmask)
        return execute(sched, rows, spy if fill_bitmask is not None else None, *rest)

    monkeypatch.setattr(runner, "execute", spying_execute)
    params = SamplingParams(temperature=0.0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    (out,) = smollm2_llm.generate([PROMPT], params, use_tqdm=False)
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    assert len(forward_queued) == len(out.outputs[0].token_ids) and all(forward_queued)  # one fill per token
    assert any(r.bitmask_seconds > 0 for r in list(smollm2_llm.engine.step_log)[-len(forward_queued):])


def _serve(engine, work):
    """Run `work(async_engine)` on an AsyncEngine over `engine`, shut down after."""
    import asyncio

    from jaxserve.async_engine import AsyncEngine

    async def main():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            return await work(async_engine)
        finally:
            await async_engine.shutdown()
    return asyncio.run(main())


def test_a_slow_grammar_compile_does_not_stall_the_engine_loop(smollm2_llm):
    """AsyncEngine compiles a request's constraint before queueing it, off the engine thread:
    while one compiles (held up here), a running request keeps getting tokens; the constrained
    one then runs on the compiled grammar."""
    import asyncio
    import threading
    import uuid

    key = f"answer_{uuid.uuid4().hex[:8]}"  # a schema never seen: it must compile
    schema = {"type": "object", "properties": {key: {"type": "string", "maxLength": 16}}, "required": [key],
              "additionalProperties": False}
    release = threading.Event()

    async def work(async_engine):
        free = await async_engine.add_request("free", PROMPT, SamplingParams(temperature=0.0, max_tokens=24,
                                                                             ignore_eos=True))
        smollm2_llm.engine.grammars._pool.submit(release.wait)  # the compile thread is busy until released
        constrained = asyncio.ensure_future(async_engine.add_request(
            "constrained", PROMPT, SamplingParams(temperature=0.0, max_tokens=40,
                                                  structured_outputs=StructuredOutputsParams(json=schema))))
        async with free:
            tokens = [t async for out in free for c in out.outputs for t in c.token_ids]
        held = not constrained.done()
        release.set()
        async with await constrained as stream:
            text = "".join([c.text async for out in stream for c in out.outputs])
        return tokens, held, text

    tokens, held, text = _serve(smollm2_llm.engine, work)
    assert len(tokens) == 24 and held  # the free request finished while the compile was still held up
    jsonschema.validate(json.loads(text), schema)


def test_the_async_engine_refuses_a_bad_constraint_naming_its_field(smollm2_llm):
    from jaxserve.async_engine import RequestRefusedError

    async def work(async_engine):
        with pytest.raises(RequestRefusedError) as e:
            await async_engine.add_request("bad", PROMPT, SamplingParams(
                structured_outputs=StructuredOutputsParams(regex="(unclosed")))
        return e.value

    refusal = _serve(smollm2_llm.engine, work)
    assert refusal.param == "structured_outputs.regex" and "not a valid constraint" in str(refusal)


def test_a_tiny_structured_outputs_timeout_refuses_a_big_schema():
    """LLM(structured_outputs_timeout=...) reaches the engine's compiler: a schema that takes
    milliseconds to compile is refused, naming its field and the flag, offline and through the
    AsyncEngine (the server's 400); no step runs, so the engine skips warm-up here."""
    from jaxserve import LLM
    from jaxserve.async_engine import RequestRefusedError
    from testlib import SMOLLM2_ENGINE_ARGS

    llm = LLM(**SMOLLM2_ENGINE_ARGS, warmup=False, structured_outputs_timeout=0.001)
    params = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(json=big_schema()))
    with pytest.raises(RequestValidationError) as e:
        llm.generate([PROMPT], params, use_tqdm=False)
    assert e.value.param == "structured_outputs.json"
    assert "took longer than 0.001 s to compile (--structured-outputs-timeout)" in str(e.value)

    async def work(async_engine):
        with pytest.raises(RequestRefusedError) as refused:
            await async_engine.add_request("big", PROMPT, params)
        return refused.value

    refusal = _serve(llm.engine, work)
    assert refusal.param == "structured_outputs.json" and "--structured-outputs-timeout" in str(refusal)
    assert not llm.engine.has_unfinished_requests()
