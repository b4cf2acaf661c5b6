"""LoRA adapters through `jaxserve serve` (the tiny llama with two PEFT adapters from --lora-modules, in
both of vLLM's forms): the `openai` and `ollama` clients select an adapter by model name and get
transformers + PEFT's merged greedy tokens, concurrently with base-model requests; /v1/models lists
adapters with parent and root; vLLM's load/unload routes work with
JAXSERVE_ALLOW_RUNTIME_LORA_UPDATING, refuse bad adapters in the API's error format (the server
carrying on), and are 404 on a server without it."""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import ollama
import openai
import pytest

from serverlib import running
from test_engine_parity import hf_greedy

BASE = "tiny"
PROMPTS = [[5, 17, 33, 99, 4, 250, 61, 7, 300, 12, 45], [8, 140, 141, 9, 77, 3]]
NEW_TOKENS = 10
GREEDY = dict(max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def lora_server(tiny_checkpoint, tiny_adapters, tmp_path_factory):
    folder, _ = tiny_checkpoint("llama")
    log = tmp_path_factory.mktemp("lora_server") / "serve.log"
    (attn_mlp, _), (rslora, _) = tiny_adapters["attn_mlp"], tiny_adapters["rslora"]
    with running([folder, "--served-model-name", BASE, "--max-model-len", "64", "--max-num-seqs", "4",
                 "--max-num-batched-tokens", "16", "--block-size", "4", "--enable-lora", "--max-loras", "2",
                 "--max-lora-rank", "8", "--lora-modules", f"attn_mlp={attn_mlp}",
                 json.dumps({"name": "rslora", "path": rslora, "base_model_name": "tiny-base"})],
                 log, env={"JAXSERVE_ALLOW_RUNTIME_LORA_UPDATING": "true"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(lora_server):
    return openai.OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint, tiny_adapters):
    """(model name, prompt index) -> transformers' greedy tokens as the word-level tokenizer writes them."""
    _, base = tiny_checkpoint("llama")
    models = {BASE: base, **{name: merged for name, (_, merged) in tiny_adapters.items()}}
    return {(name, i): [f"w{t}" for t in hf_greedy(model, p, NEW_TOKENS)]
            for name, model in models.items() for i, p in enumerate(PROMPTS)}


def test_models_list_adapters_with_their_parent_and_root(client, lora_server, tiny_adapters, tiny_checkpoint):
    assert [m.id for m in client.models.list().data] == [BASE, "attn_mlp", "rslora"]
    data = {m["id"]: m for m in httpx.get(f"{lora_server.url}/v1/models").json()["data"]}
    assert (data[BASE]["root"], data[BASE]["parent"]) == (tiny_checkpoint("llama")[0], None)
    assert (data["attn_mlp"]["root"], data["attn_mlp"]["parent"]) == (tiny_adapters["attn_mlp"][0], BASE)
    assert (data["rslora"]["root"], data["rslora"]["parent"]) == (tiny_adapters["rslora"][0], "tiny-base")
    assert client.models.retrieve("rslora").id == "rslora"


def test_the_openai_sdk_selects_adapters_by_name_mixed_with_base_requests(client, oracle):
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in (BASE, "attn_mlp", "rslora")] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: adapters and base rows share steps
        texts = list(pool.map(lambda job: client.completions.create(
            model=job[0], prompt=PROMPTS[job[1]], **GREEDY).choices[0].text, jobs))
    for (name, i), text in zip(jobs, texts):
        assert text.split() == oracle[name, i], (name, i)
    assert oracle["attn_mlp", 0] != oracle[BASE, 0] != oracle["rslora", 0]
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        client.completions.create(model="nope", prompt=PROMPTS[0], **GREEDY)


def test_the_ollama_client_selects_an_adapter_by_name(lora_server, oracle):
    # The prompt as token ids (`context`): the toy tokenizer does not read its own words back.
    out = ollama.Client(host=lora_server.url).generate(
        model="rslora", prompt="", context=PROMPTS[1], raw=True,
        options={"temperature": 0, "num_predict": NEW_TOKENS, "repeat_penalty": 1.0})
    assert out.response.split() == oracle["rslora", 1]


def _post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{route}", json=body, timeout=60)


def test_adapters_load_and_unload_at_runtime_and_bad_ones_are_refused(client, lora_server, tiny_adapters, oracle,
                                                                       tmp_path):
    folder = tiny_adapters["attn_mlp"][0]
    done = _post(lora_server, "load_lora_adapter", {"lora_name": "again", "lora_path": folder})
    assert (done.status_code, done.text) == (200, "Success: LoRA adapter 'again' added successfully.")
    assert "again" in [m.id for m in client.models.list().data]
    text = client.completions.create(model="again", prompt=PROMPTS[0], **GREEDY).choices[0].text
    assert text.split() == oracle["attn_mlp", 0]

    dora = tmp_path / "dora"
    shutil.copytree(folder, dora)
    with open(dora / "adapter_config.json") as f:
        config = json.load(f)
    with open(dora / "adapter_config.json", "w") as f:
        json.dump({**config, "use_dora": True}, f)
    refusals = [({"lora_name": "again", "lora_path": folder}, 400, "The lora adapter 'again' has already been loaded."),
                ({"lora_name": BASE, "lora_path": folder}, 400, "'tiny' is the name of the base model"),
                ({"lora_name": "x"}, 400, "Both 'lora_name' and 'lora_path' must be provided."),
                ({"lora_name": "x", "lora_path": str(tmp_path / "nowhere")}, 404, "no such folder"),
                ({"lora_name": "x", "lora_path": str(dora)}, 400, "uses DoRA, which jaxserve does not support")]
    for body, status, words in refusals:
        answer = _post(lora_server, "load_lora_adapter", body)
        assert answer.status_code == status and words in answer.json()["error"]["message"], (body, answer.text)
    assert "x" not in [m.id for m in client.models.list().data]

    done = _post(lora_server, "unload_lora_adapter", {"lora_name": "again"})
    assert (done.status_code, done.text) == (200, "Success: LoRA adapter 'again' removed successfully.")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="again", prompt=PROMPTS[0], **GREEDY)
    gone = _post(lora_server, "unload_lora_adapter", {"lora_name": "again"})
    assert gone.status_code == 404 and gone.json()["error"]["message"] == "The lora adapter 'again' cannot be found."
    # The server carried on: the adapters it had still answer as before.
    text = client.completions.create(model="attn_mlp", prompt=PROMPTS[1], **GREEDY).choices[0].text
    assert text.split() == oracle["attn_mlp", 1]


def test_runtime_routes_are_404_without_the_environment_variable(server):
    for route in ("load_lora_adapter", "unload_lora_adapter"):
        answer = _post(server, route, {"lora_name": "a", "lora_path": "/a"})
        assert answer.status_code == 404
        assert "JAXSERVE_ALLOW_RUNTIME_LORA_UPDATING" in answer.json()["error"]["message"]
