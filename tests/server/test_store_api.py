"""The model store through the real `ollama` client against one `jaxserve serve` of a tiny llama:
/api/create (fields and Modelfile text), /api/copy, /api/delete, /api/show, /api/tags, /v1/models,
/api/pull without a hub, /api/push; stored models over the served weights answer with their
parameters, system prompt, messages and template; names that would leave the store are refused."""
from __future__ import annotations

import json
import os
import time

import httpx
import ollama
import pytest

from serverlib import running

MODEL = "tiny"
GREEDY = {"temperature": 0, "num_predict": 6}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def with_chat_template(folder: str, dest) -> str:
    """A copy of a tiny checkpoint whose tokenizer has a plain chat template (each content and a space)."""
    import shutil

    shutil.copytree(folder, dest)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return str(dest)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    return with_chat_template(tiny_checkpoint("llama")[0], tmp_path_factory.mktemp("store-api") / "tiny")


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("store-server")
    env = {"JAXSERVE_MODELS": str(folder / "store"), "HF_HUB_OFFLINE": "0"}
    with running(["--model", tiny, "--served-model-name", MODEL, "--max-model-len", "128"], folder / "serve.log",
                 env=env) as srv:
        srv.store = folder / "store"
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


def _show_raw(server, name: str) -> dict:
    """/api/show as sent: the client's ShowResponse drops "system" and "messages"."""
    r = httpx.post(f"{server.url}/api/show", json={"model": name}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _chat(client, model, messages, **options):
    return client.chat(model=model, messages=messages, options={**GREEDY, **options}).message.content


def test_create_from_fields_and_from_a_modelfile_then_show_and_list(server, client, tiny):
    done = client.create(model="terse", from_=MODEL, system="w50 w51", parameters={"temperature": 0, "top_k": 5},
                         messages=[{"role": "user", "content": "w52"}, {"role": "assistant", "content": "w53"}],
                         license="MIT")
    assert done.status == "success"
    with httpx.stream("POST", f"{server.url}/api/create", timeout=60, json={
            "model": "ns/other:v1", "modelfile": f'FROM {tiny}\nPARAMETER stop "w7"\nPARAMETER stop w8\n'
                                                 'TEMPLATE "{{ .System }} {{ .Prompt }}"\nSYSTEM w3'}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0] == {"status": "parsing modelfile"} and lines[-1] == {"status": "success"}

    show = client.show("terse")
    assert show.parameters == f"{'temperature':<30} 0\n{'top_k':<30} 5"
    raw = _show_raw(server, "terse")
    assert raw["system"] == "w50 w51" and show.license == "MIT"
    assert raw["messages"] == [{"role": "user", "content": "w52"}, {"role": "assistant", "content": "w53"}]
    assert show.template == CHAT_TEMPLATE  # no TEMPLATE: the weights' own chat template
    assert show.modelinfo["general.architecture"] == "llama" and show.capabilities == ["completion"]
    assert show.details.family == "llama"
    assert f"\nFROM {os.path.realpath(tiny)}\n" in show.modelfile and "\nSYSTEM w50 w51\n" in show.modelfile
    assert "MESSAGE user w52\nMESSAGE assistant w53\n" in show.modelfile
    other = client.show("ns/other:v1")
    assert other.template == "{{ .System }} {{ .Prompt }}" and other.parameters.count("stop") == 2

    names = [m.model for m in client.list().models]
    assert names[0] == f"{MODEL}:latest" and set(names[1:]) == {"terse:latest", "ns/other:v1"}
    listed = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert set(listed) == {MODEL, "terse:latest", "ns/other:v1"}
    assert listed["terse:latest"]["parent"] == MODEL and listed["terse:latest"]["root"] == os.path.realpath(tiny)

    with pytest.raises(ollama.ResponseError) as e:  # the Modelfile's own errors name the line
        client.create(model="bad", from_=MODEL, parameters={"temperature": "hot"})
    assert e.value.status_code == 400 and "temperature" in e.value.error
    r = httpx.post(f"{server.url}/api/create", json={"model": "bad", "modelfile": "FROM x\nPARAMETER top_k many"})
    assert r.status_code == 400 and "line 2" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/create", json={"model": "bad", "from": "/no/such/weights"})
    assert r.status_code == 400 and "/no/such/weights" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/create", json={"model": "q", "from": MODEL, "quantize": "q4_K_M"})
    assert r.status_code == 400 and "quantiz" in r.json()["error"]
    assert "bad:latest" not in [m.model for m in client.list().models]


def test_a_stored_model_answers_with_its_parameters_system_prompt_and_messages(client):
    client.create(model="persona", from_=MODEL, system="w50 w51", parameters=GREEDY,
                  messages=[{"role": "user", "content": "w52"}, {"role": "assistant", "content": "w53"}])
    question = [{"role": "user", "content": "w60 w61"}]
    want = _chat(client, MODEL, [{"role": "system", "content": "w50 w51"}, {"role": "user", "content": "w52"},
                                 {"role": "assistant", "content": "w53"}] + question)
    # Greedy and 6 tokens come from the model's parameters: the request sends no options.
    assert client.chat(model="persona", messages=question).message.content == want
    assert want != _chat(client, MODEL, question)  # the prefix changes the answer
    # A request that starts with a system message of its own goes without the model's (Ollama's rule);
    # the model's messages still come first.
    own = [{"role": "system", "content": "w70"}] + question
    assert client.chat(model="persona", messages=own).message.content == _chat(
        client, MODEL, [{"role": "user", "content": "w52"}, {"role": "assistant", "content": "w53"}, *own])
    # The request's options override the model's: 2 tokens instead of 6.
    two = client.chat(model="persona", messages=question, options={"num_predict": 2})
    assert two.eval_count == 2 and want.startswith(two.message.content)

    words = want.split()
    client.create(model="stopper", from_="persona", parameters={"stop": [words[2]]})
    stopped = client.chat(model="stopper", messages=question).message.content
    assert stopped == want[:want.index(words[2])] and stopped.split() == words[:2]

    generated = client.generate(model="persona", prompt="w60 w61").response
    assert generated == want  # generate puts the system prompt and messages before the prompt too


def test_a_stored_template_renders_the_prompt(client):
    client.create(model="templated", from_=MODEL, template="{{ if .System }}{{ .System }} {{ end }}{{ .Prompt }}",
                  system="w3 w4", parameters=GREEDY)
    got = client.generate(model="templated", prompt="w60 w61")
    want = client.generate(model=MODEL, prompt="w3 w4 w60 w61", raw=True, options=GREEDY)
    assert got.response == want.response and got.context == want.context


def test_copy_and_delete(server, client):
    client.create(model="orig", from_=MODEL, system="w5")
    client.copy("orig", "copied:v2")
    assert _show_raw(server, "copied:v2")["system"] == "w5"
    client.copy(MODEL, "served-copy")  # the served model: a manifest of its weights
    assert client.show("served-copy").details.family == "llama"
    assert client.delete("orig").status == "success"
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("orig")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("orig", "again")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="orig", messages=[{"role": "user", "content": "w4"}])
    assert e.value.status_code == 404
    assert _show_raw(server, "copied:v2")["system"] == "w5"  # a copy outlives its source


def test_pull_without_a_hub_errors_promptly_and_push_is_refused(server, client):
    started = time.monotonic()
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("hf.co/someone/some-model-GGUF:Q4_K_M")
    assert time.monotonic() - started < 20 and e.value.status_code == 502
    assert "Hugging Face hub" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("llama3.1:8b")
    assert e.value.status_code == 400 and "hf.co/" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.push("terse")
    assert e.value.status_code == 501 and "push" in e.value.error
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert _chat(client, MODEL, [{"role": "user", "content": "w4"}])


@pytest.mark.parametrize("name", ["../escape", "../../etc/passwd", "a/b/c/d", "x/..", "..\\x", "/abs"])
def test_names_that_would_leave_the_store_are_refused(server, client, name):
    calls = [lambda: client.create(model=name, from_=MODEL), lambda: client.show(name),
             lambda: client.delete(name), lambda: client.copy("terse", name),
             lambda: client.chat(model=name, messages=[{"role": "user", "content": "w4"}]),
             lambda: client.pull(name)]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code in (400, 404), (name, e.value.status_code, e.value.error)
    outside = [p for p in server.store.parent.rglob("*") if "escape" in p.name or "passwd" in p.name]
    assert outside == []
