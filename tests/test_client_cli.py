"""`jaxserve ps / stop / pull` against an in-process fake server answering Ollama's routes with
recorded bodies: the exact lines printed, the requests sent, the errors and exit statuses. The same
commands against a real `jaxserve serve` are in tests/server/test_model_pool_api.py."""
from __future__ import annotations

import datetime
import http.server
import io
import json
import threading

import pytest

from jaxserve import cli
from jaxserve.client_cli import Progress, processor, ps_table, server_url, until

NOW = datetime.datetime(2026, 1, 10, 12, 0, tzinfo=datetime.timezone.utc)
MB = 1_048_576
PS = {"models": [  # /api/ps of a server with its own model and two loaded on demand
    {"name": "tiny:latest", "model": "tiny:latest", "size": 98_362_432, "digest": "3f2a9c1d5e7b" + "0" * 52,
     "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0, "context_length": 128},
    {"name": "second:latest", "model": "second:latest", "size": 4_700_000_000, "digest": "a1b2c3d4e5f6" + "1" * 52,
     "expires_at": "2026-01-10T12:04:30Z", "size_vram": 4_700_000_000, "context_length": 128},
    {"name": "ns/third:q8", "model": "ns/third:q8", "size": 1_000_000, "digest": "sha256:" + "9" * 64,
     "expires_at": "2026-01-10T13:00:00Z", "size_vram": 250_000, "context_length": 128}]}
PULL = [{"status": "pulling manifest"}] + [
    {"status": "pulling 5a3c1f0e9d2b", "digest": "sha256:5a3c1f0e9d2b" + "2" * 52, "total": MB, "completed": done}
    for done in (0, 100_000, 150_000, 530_000, MB)] + [
    {"status": "verifying sha256 digest"}, {"status": "writing manifest"}, {"status": "success"}]


class FakeServer(http.server.BaseHTTPRequestHandler):
    """Answers the route's recorded (status, NDJSON objects); records each request's body."""
    answers: dict[str, tuple[int, list[dict]]] = {}
    requests: list[tuple[str, str, dict | None]] = []
    authorization: list[str | None] = []
    port = 0

    def log_message(self, *args):
        pass

    def _answer(self, body):
        self.requests.append((self.command, self.path, body))
        self.authorization.append(self.headers.get("Authorization"))
        status, lines = self.answers.get(self.path, (404, [{"error": "no such route"}]))
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-ndjson" if len(lines) > 1 else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer(None)

    def do_POST(self):
        self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))


@pytest.fixture
def server(monkeypatch):
    FakeServer.answers, FakeServer.requests, FakeServer.authorization = {}, [], []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    FakeServer.port = srv.server_address[1]
    monkeypatch.setenv("JAXSERVE_HOST", f"127.0.0.1:{FakeServer.port}")
    yield FakeServer
    srv.shutdown()
    srv.server_close()


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ps_prints_ollama_s_columns(server, capsys):
    server.answers["/api/ps"] = (200, [PS])
    code, out, err = _run(capsys, "ps")
    assert (code, err) == (0, "") and server.requests == [("GET", "/api/ps", None)]
    assert out == (  # now is past the two loaded on demand: they are unloading
        "NAME             ID              SIZE      PROCESSOR          UNTIL\n"
        "tiny:latest      3f2a9c1d5e7b    98 MB     100% CPU           Forever\n"
        "second:latest    a1b2c3d4e5f6    4.7 GB    100% GPU           Stopping...\n"
        "ns/third:q8      999999999999    1 MB      75%/25% CPU/GPU    Stopping...\n")
    assert ps_table(PS["models"], NOW) == (
        "NAME             ID              SIZE      PROCESSOR          UNTIL\n"
        "tiny:latest      3f2a9c1d5e7b    98 MB     100% CPU           Forever\n"
        "second:latest    a1b2c3d4e5f6    4.7 GB    100% GPU           4 minutes from now\n"
        "ns/third:q8      999999999999    1 MB      75%/25% CPU/GPU    About an hour from now")
    server.answers["/api/ps"] = (200, [{"models": []}])
    assert _run(capsys, "ps") == (0, "NAME    ID    SIZE    PROCESSOR    UNTIL\n", "")


@pytest.mark.parametrize("size,vram,text", [(10, 0, "100% CPU"), (10, 10, "100% GPU"), (10, 3, "70%/30% CPU/GPU"),
                                            (10, 11, "Unknown"), (0, 5, "Unknown")])
def test_processor(size, vram, text):
    assert processor(size, vram) == text


def test_until():
    assert until("2026-01-10T12:00:30Z", NOW) == "30 seconds from now"
    assert until("2026-01-10T11:59:59Z", NOW) == "Stopping..."
    assert until("2318-01-01T00:00:00Z", NOW) == "Forever"


def test_stop_unloads_silently_and_names_a_missing_model(server, capsys):
    server.answers["/api/generate"] = (200, [{"model": "second", "response": "", "done": True,
                                              "done_reason": "unload"}])
    server.answers["/api/ps"] = (200, [{"models": PS["models"][:1]}])
    assert _run(capsys, "stop", "second") == (0, "", "")
    assert server.requests == [("POST", "/api/generate", {"model": "second", "keep_alive": 0}),
                               ("GET", "/api/ps", None)]
    assert _run(capsys, "stop", "tiny") == (
        1, "", "jaxserve: error: tiny:latest is still loaded: the model `jaxserve serve` was started with stays, "
               "and so does a model while it answers requests (its keep_alive then applies)\n")
    server.answers["/api/generate"] = (404, [{"error": 'model "gone" not found, try pulling it first'}])
    assert _run(capsys, "stop", "gone") == (1, "", 'jaxserve: error: couldn\'t find model "gone" to stop\n')


def test_pull_prints_plain_progress_lines_when_not_on_a_terminal(server, capsys):
    server.answers["/api/pull"] = (200, PULL)
    code, out, err = _run(capsys, "pull", "hf.co/tester/Tiny-GGUF:Q8_0")
    assert server.requests == [("POST", "/api/pull", {"model": "hf.co/tester/Tiny-GGUF:Q8_0", "stream": True})]
    assert (code, out) == (0, "")
    assert err == ("pulling manifest\n"
                   "pulling 5a3c1f0e9d2b: 0% 0 B/1.0 MB\n"
                   "pulling 5a3c1f0e9d2b: 14% 150 KB/1.0 MB\n"
                   "pulling 5a3c1f0e9d2b: 50% 530 KB/1.0 MB\n"
                   "pulling 5a3c1f0e9d2b: 100% 1.0 MB/1.0 MB\n"
                   "verifying sha256 digest\nwriting manifest\nsuccess\n")


def test_pull_draws_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    progress = Progress(term)
    for line in PULL[:3] + PULL[-3:]:
        progress.show(line)
    progress.end()
    bar = "pulling 5a3c1f0e9d2b:   9% ▕██                       ▏ 100 KB/1.0 MB"
    assert term.getvalue() == (
        "pulling manifest\n"
        "\r\x1b[Kpulling 5a3c1f0e9d2b:   0% ▕                         ▏ 0 B/1.0 MB"
        f"\r\x1b[K{bar}\n"
        "verifying sha256 digest\nwriting manifest\nsuccess\n")


def test_pull_fails_with_the_server_s_error(server, capsys):
    server.answers["/api/pull"] = (502, [{"error": "cannot reach the Hugging Face hub for tester/Tiny-GGUF "
                                                   "within 10 s"}])
    assert _run(capsys, "pull", "hf.co/tester/Tiny-GGUF") == (
        1, "", "jaxserve: error: cannot reach the Hugging Face hub for tester/Tiny-GGUF within 10 s\n")
    server.answers["/api/pull"] = (200, PULL[:3] + [{"error": "sha256 mismatch"}])  # an error mid-stream
    assert _run(capsys, "pull", "hf.co/tester/Tiny-GGUF") == (
        1, "", "pulling manifest\npulling 5a3c1f0e9d2b: 0% 0 B/1.0 MB\njaxserve: error: sha256 mismatch\n")


@pytest.mark.parametrize("argv", [["ps"], ["stop", "x"], ["pull", "x"]])
def test_no_server_is_a_clear_error(argv, capsys, monkeypatch):
    monkeypatch.delenv("JAXSERVE_HOST", raising=False)
    monkeypatch.setenv("JAXSERVE_PORT", "9")  # discard: nothing listens there
    assert _run(capsys, *argv) == (
        1, "", "jaxserve: error: could not connect to jaxserve at http://127.0.0.1:9 ([Errno 111] Connection "
               "refused); is `jaxserve serve` running?\n")


@pytest.mark.parametrize("host,url", [
    ("127.0.0.1", "http://127.0.0.1:8000"), ("0.0.0.0", "http://0.0.0.0:8000"), ("gpu-box", "http://gpu-box:8000"),
    ("gpu-box:11434", "http://gpu-box:11434"), ("http://gpu-box:9000", "http://gpu-box:9000"),
    ("http://gpu-box", "http://gpu-box:80"), ("https://gpu-box", "https://gpu-box:443"),
    ("https://gpu-box:8443/jax/", "https://gpu-box:8443/jax"), ("::1", "http://[::1]:8000"),
    ("[::1]:9000", "http://[::1]:9000"), ("", "http://127.0.0.1:8000")])
def test_server_url_takes_ollama_host_s_forms(host, url):
    assert server_url(host, 8000) == url


def test_flags_over_the_environment_and_the_api_key(server, capsys, monkeypatch):
    server.answers["/api/ps"] = (200, [{"models": []}])
    monkeypatch.setenv("JAXSERVE_HOST", "127.0.0.1")
    monkeypatch.setenv("JAXSERVE_PORT", "9")
    assert _run(capsys, "ps", "--port", str(server.port))[0] == 0
    monkeypatch.setenv("JAXSERVE_API_KEY", "sesame")  # the variable `serve --api-key` reads
    assert _run(capsys, "ps", "--host", f"http://127.0.0.1:{server.port}")[0] == 0
    assert server.authorization == [None, "Bearer sesame"]
    server.answers["/api/ps"] = (401, [{"error": {"message": "invalid API key", "code": "invalid_api_key"}}])
    assert _run(capsys, "ps", "--port", str(server.port)) == (1, "", "jaxserve: error: invalid API key\n")
    assert _run(capsys, "ps", "--host", "ftp://x") == (
        2, "", "jaxserve: error: --host 'ftp://x': the scheme must be http or https\n")
