"""Several models per server through the real `ollama` client: one `jaxserve serve` of a tiny llama
(at most three models loaded, OLLAMA_KEEP_ALIVE 10m) loads stored models over other tiny weights on
demand; each answers as its own LLM does, also interleaved with the served model; keep_alive 0
unloads and the next request reloads; the least recently used idle model makes room; a model that
cannot load gets an error while the others keep serving; /api/ps and /metrics follow; `jaxserve ps`,
`stop` and `pull` ask this server."""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import ollama
import pytest

from jaxserve import LLM, SamplingParams
from serverlib import free_port, running, scrape
from test_store_api import with_chat_template

MODEL = "tiny"
SHAPE = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64)
GREEDY = {"temperature": 0, "num_predict": 8, "repeat_penalty": 1.0}
PROMPTS = ["w5 w6 w7", "w40 w41", "w33 w3 w9 w80", "w57"]


@pytest.fixture(scope="module")
def folders(tiny_checkpoint, tmp_path_factory):
    """Four tiny llamas of different weights with chat templates: the served one and three others."""
    root = tmp_path_factory.mktemp("pool-models")
    kinds = {"llama": "llama", "other": "smollm2_tied", "third": "llama_linear_rope", "rope": "llama3_rope"}
    return {name: with_chat_template(tiny_checkpoint(kind)[0], root / name) for name, kind in kinds.items()}


HUB_FILE = bytes(range(256)) * 4096  # 1 MiB "GGUF" the fake hub serves
HUB_REPO, HUB_FILENAME = "tester/Tiny-GGUF", "tiny.Q8_0.gguf"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The few Hugging Face hub routes huggingface_hub's model_info and hf_hub_download use, for
    one repository holding one GGUF file."""
    sha256 = hashlib.sha256(HUB_FILE).hexdigest()

    def log_message(self, *args):
        pass

    def _file_headers(self):
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("ETag", f'"{self.sha256}"')
        self.send_header("Content-Length", str(len(HUB_FILE)))

    def do_GET(self):
        path = self.path.split("?")[0]
        if path.startswith(f"/api/models/{HUB_REPO}"):
            body = json.dumps({"id": HUB_REPO, "sha": "c" * 40, "siblings": [
                {"rfilename": "README.md", "size": 10},
                {"rfilename": HUB_FILENAME, "size": len(HUB_FILE),
                 "lfs": {"sha256": self.sha256, "size": len(HUB_FILE), "pointerSize": 130}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == f"/{HUB_REPO}/resolve/main/{HUB_FILENAME}":
            self.send_response(200)
            self._file_headers()
            self.end_headers()
            self.wfile.write(HUB_FILE)
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_HEAD(self):
        if self.path.split("?")[0] == f"/{HUB_REPO}/resolve/main/{HUB_FILENAME}":
            self.send_response(200)
            self._file_headers()
        else:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
        self.end_headers()


@pytest.fixture(scope="module")
def hub():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), FakeHub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def server(folders, hub, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool-server")
    env = {"JAXSERVE_MODELS": str(folder / "store"), "OLLAMA_KEEP_ALIVE": "10m", "OLLAMA_MAX_LOADED_MODELS": "3",
           "HF_ENDPOINT": hub, "HF_HUB_CACHE": str(folder / "hf-cache"), "HF_HUB_OFFLINE": "0"}
    with running(["--model", folders["llama"], "--served-model-name", MODEL, "--max-model-len", "128"],
                 folder / "serve.log", env=env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server, folders):
    client = ollama.Client(host=server.url)
    client.create(model="second", from_=folders["other"])
    client.create(model="second-terse", from_="second", system="w50", parameters={"num_predict": 3})
    return client


@pytest.fixture(scope="module")
def oracle(folders):
    """kind -> prompt -> that model's own greedy completion (raw, 8 tokens)."""
    answers = {}
    for kind in ("llama", "other"):
        llm = LLM(folders[kind], **SHAPE)
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        answers[kind] = {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}
        del llm
    return answers


def _loaded(client) -> dict[str, datetime.datetime]:
    return {m.model: m.expires_at for m in client.ps().models}


def _until(predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_stored_model_over_other_weights_loads_on_demand(client, oracle):
    client.generate(model="second", prompt="", keep_alive=0)  # unloaded, whatever ran before
    assert list(_loaded(client)) == [f"{MODEL}:latest"]
    got = client.generate(model="second", prompt=PROMPTS[0], raw=True, options=GREEDY)
    assert got.response == oracle["other"][PROMPTS[0]]
    loaded = client.ps().models
    assert {m.model for m in loaded} == {f"{MODEL}:latest", "second:latest", "second-terse:latest"}
    second = next(m for m in loaded if m.model == "second:latest")
    assert second.size > 0 and second.size_vram == 0 and second.details.family == "llama"
    left = (second.expires_at - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 9 * 60 < left <= 10 * 60  # OLLAMA_KEEP_ALIVE
    served = next(m for m in loaded if m.model == f"{MODEL}:latest")
    assert served.expires_at.year > 2100  # the served model stays
    # A derived model shares the loaded weights and answers with its own defaults.
    terse = client.generate(model="second-terse", prompt=PROMPTS[0], raw=True, options={"temperature": 0})
    assert terse.eval_count == 3 and client.show("second-terse").modelinfo["general.architecture"] == "llama"


def test_two_models_serve_interleaved_concurrent_requests(server, client, oracle):
    async def main():
        aclient = ollama.AsyncClient(host=server.url)
        jobs = [(model, prompt) for prompt in PROMPTS for model in (MODEL, "second")] * 2
        outs = await asyncio.gather(*(aclient.generate(model=m, prompt=p, raw=True, options=GREEDY)
                                      for m, p in jobs))
        return [(m, p, o.response) for (m, p), o in zip(jobs, outs)]

    for model, prompt, text in asyncio.run(main()):
        assert text == oracle["llama" if model == MODEL else "other"][prompt], (model, prompt)
    samples = scrape(server.url)
    labels = {k.split('model_name="')[1].split('"')[0] for k in samples if "generation_tokens" in k}
    assert MODEL in labels and any(label.endswith("/other") for label in labels)


def test_keep_alive_0_unloads_and_the_next_request_reloads(client, oracle):
    got = client.generate(model="second", prompt=PROMPTS[1], raw=True, options=GREEDY, keep_alive=0)
    assert got.response == oracle["other"][PROMPTS[1]]
    _until(lambda: "second:latest" not in _loaded(client))
    again = client.generate(model="second", prompt=PROMPTS[1], raw=True, options=GREEDY, keep_alive="-1")
    assert again.response == got.response and _loaded(client)["second:latest"].year > 2100
    unloaded = client.generate(model="second", prompt="", keep_alive=0)  # Ollama's way to unload
    assert unloaded.done_reason == "unload" and "second:latest" not in _loaded(client)
    client.chat(model="second", messages=[], keep_alive="1m")  # an empty chat loads
    left = (_loaded(client)["second:latest"] - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 0 < left <= 60
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="second", prompt="w4", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error


def test_the_least_recently_used_idle_model_makes_room(client, folders):
    client.create(model="third", from_=folders["third"])
    client.generate(model="third", prompt="w4", options=GREEDY)
    client.generate(model="second", prompt="w4", options=GREEDY)  # "third" is now the least recently used
    assert set(_loaded(client)) >= {"tiny:latest", "second:latest", "third:latest"}
    # Weights named by path; a fourth model: "third" (idle, least recently used) unloads.
    got = client.generate(model=folders["rope"], prompt="w4 w5", raw=True, options=GREEDY)
    assert got.eval_count > 0
    loaded = _loaded(client)
    assert "third:latest" not in loaded and "second:latest" in loaded and len(client.ps().models) == 4
    client.create(model="llama-again", from_=folders["llama"])  # the served weights: nothing loads
    assert client.generate(model="llama-again", prompt="w4", options=GREEDY).eval_count > 0
    assert len(client.ps().models) == 4
    # Deleting a model unloads its weights unless another stored model runs on them.
    client.create(model="rope-a", from_=folders["rope"])
    client.copy("rope-a", "rope-b")
    client.delete("rope-a")
    assert "rope-b:latest" in _loaded(client)
    client.delete("rope-b")
    assert "rope-b:latest" not in _loaded(client) and len(client.ps().models) == 3
    client.delete("llama-again")  # the served model stays
    assert "tiny:latest" in _loaded(client)


def test_a_model_that_cannot_load_gets_an_error_and_the_others_keep_serving(server, client, folders, tmp_path,
                                                                            oracle):
    broken = tmp_path / "broken"
    shutil.copytree(folders["other"], broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    client.create(model="broken", from_=str(broken))
    for _ in range(2):  # the failure is not remembered: each request tries again
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="broken", prompt="w4")
        assert e.value.status_code == 500 and "cannot load" in e.value.error
    assert "broken:latest" not in _loaded(client)
    got = client.generate(model=MODEL, prompt=PROMPTS[2], raw=True, options=GREEDY)
    assert got.response == oracle["llama"][PROMPTS[2]]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_openai_routes_answer_stored_and_loaded_models(server, client, oracle):
    url = f"{server.url}/v1"
    done = httpx.post(f"{url}/completions", timeout=60, json={
        "model": "second", "prompt": PROMPTS[3], "temperature": 0, "max_tokens": 8}).json()
    assert done["model"] == "second" and done["choices"][0]["text"] == oracle["other"][PROMPTS[3]]
    question = [{"role": "user", "content": "w60 w61"}]
    # second-terse's parameters (3 tokens) fill what the request leaves out; its system prompt comes first.
    chat = httpx.post(f"{url}/chat/completions", timeout=60, json={
        "model": "second-terse", "messages": question, "temperature": 0}).json()
    want = client.chat(model="second-terse", messages=question, options={"temperature": 0, "repeat_penalty": 1.0})
    assert chat["choices"][0]["message"]["content"] == want.message.content
    assert chat["usage"]["completion_tokens"] == 3 == want.eval_count
    assert chat["usage"]["prompt_tokens"] == want.prompt_eval_count  # "w50" then the question
    more = httpx.post(f"{url}/chat/completions", timeout=60, json={
        "model": "second-terse", "messages": question, "temperature": 0, "max_tokens": 5}).json()
    assert more["usage"]["completion_tokens"] == 5
    missing = httpx.post(f"{url}/chat/completions", json={"model": "nothing", "messages": question})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_pull_from_a_hub_streams_progress_and_stores_the_model(server, client):
    name = f"hf.co/{HUB_REPO}:Q8_0"
    lines = list(client.pull(name, stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    progress = [line for line in lines if line.total]
    assert progress[0].completed in (0, None) and progress[-1].completed == progress[-1].total == len(HUB_FILE)
    assert progress[-1].digest == f"sha256:{FakeHub.sha256}"
    assert [line.status for line in lines[-3:]] == ["verifying sha256 digest", "writing manifest", "success"]
    stored = client.show(name)
    assert "hf-cache" in stored.modelfile and stored.modelfile.rstrip().split("\n")[-1].endswith(HUB_FILENAME)
    assert "hf.co/tester/tiny-gguf:q8_0" in [m.model for m in client.list().models]
    assert client.pull(name).status == "success"  # one object; the file is in the cache now
    with pytest.raises(ollama.ResponseError) as e:  # Ollama's default quantization, Q4_K_M: none here
        client.pull(f"hf.co/{HUB_REPO}")
    assert e.value.status_code == 404 and "Q4_K_M" in e.value.error and HUB_FILENAME in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("hf.co/tester/nothing-here:Q8_0")
    assert e.value.status_code == 404 and "no such repository" in e.value.error


def test_the_cli_lists_stops_and_pulls_through_the_server(server, client):
    env = {**os.environ, "JAXSERVE_HOST": server.url}

    def jaxserve(*argv) -> tuple[int, str, str]:
        done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "jaxserve"), *argv], env=env,
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr

    client.generate(model="second", prompt="", keep_alive="10m")
    digests = {m.model: m.digest[:12] for m in client.ps().models}
    code, out, err = jaxserve("ps")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "UNTIL"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}  # NAME ID SIZE (2 words) PROCESSOR UNTIL
    assert rows["tiny:latest"][1] == digests["tiny:latest"]
    assert rows["tiny:latest"][4:] == ["100%", "CPU", "Forever"]
    assert rows["second:latest"][1] == digests["second:latest"]
    assert rows["second:latest"][4:] in (["100%", "CPU", "9", "minutes", "from", "now"],
                                         ["100%", "CPU", "10", "minutes", "from", "now"])
    assert jaxserve("stop", "second") == (0, "", "")
    assert "second:latest" not in _loaded(client)
    assert jaxserve("stop", "nothing") == (1, "", 'jaxserve: error: couldn\'t find model "nothing" to stop\n')
    code, _, err = jaxserve("stop", MODEL)
    assert code == 1 and err.startswith("jaxserve: error: tiny:latest is still loaded: the model `jaxserve serve`")

    code, out, err = jaxserve("pull", f"hf.co/{HUB_REPO}:Q8_0")
    lines = err.splitlines()
    assert (code, out, lines[0]) == (0, "", "pulling manifest")
    assert lines[-4:] == [f"pulling {FakeHub.sha256[:12]}: 100% 1.0 MB/1.0 MB", "verifying sha256 digest",
                          "writing manifest", "success"]
    code, out, err = jaxserve("pull", f"hf.co/{HUB_REPO}")
    assert code == 1 and err.startswith("jaxserve: error: ") and "Q4_K_M" in err
