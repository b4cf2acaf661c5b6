"""The commands that talk to a running ``jaxserve serve``, as Ollama's do to ``ollama serve``:
``jaxserve ps`` (/api/ps), ``stop NAME`` (an empty /api/generate with keep_alive 0) and ``pull NAME``
(/api/pull's progress lines). The server is ``--host``/``--port`` (JAXSERVE_HOST, JAXSERVE_PORT), the
address ``serve`` binds; ``--host`` also takes OLLAMA_HOST's forms: ``host:port``, ``http(s)://host:port``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from jaxserve.engine_args import add_arguments, option, options_of, resolve_options
from jaxserve.model_store import InvalidModelName, parse_name
from jaxserve.server.config import ServerConfig
from jaxserve.store_cli import human_bytes, human_time, table

# Seconds to wait for the server's answer; a pull may go this long between its progress lines
# (verifying a large file's sha256 sends none).
TIMEOUT = 60.0
PULL_TIMEOUT = 600.0


def _server_default(name: str):
    """`serve`'s own default, so that the client finds a server started without flags."""
    return ServerConfig.__dataclass_fields__[name].default


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    """Where the server is: the same options (and variables) as `serve`'s --host and --port."""
    host: str = option(_server_default("host"), "the server: a host, host:port or http(s)://host:port "
                                                "(Ollama's OLLAMA_HOST forms)", group="server")
    port: int = option(_server_default("port"), "the server's port when --host names none", group="server",
                       minimum=0)
    api_key: str | None = option(None, "send 'Authorization: Bearer KEY' (the server's --api-key)", group="server")


CLIENT_OPTIONS = options_of(ClientOptions)


class ServerError(Exception):
    """The server could not be reached or answered an error: the message says which."""


def add_parsers(sub) -> None:
    """Add the client's subcommands to ``sub`` (COMMANDS runs them)."""
    ps = sub.add_parser("ps", help="list the models a running server has loaded")
    stop = sub.add_parser("stop", help="unload a model from a running server")
    stop.add_argument("name")
    pull = sub.add_parser("pull", help="have a running server pull a model (hf.co/{user}/{repo}:{quant})")
    pull.add_argument("name")
    for p in (ps, stop, pull):
        add_arguments(p, CLIENT_OPTIONS)


def server_url(host: str, port: int) -> str:
    """The base URL of `host` in OLLAMA_HOST's forms (host, host:port, [v6]:port, scheme://host:port);
    a host without a port gets `port`, a URL without one its scheme's (80, 443) as Ollama's."""
    scheme, sep, rest = host.strip().partition("://")
    if not sep:
        scheme, rest = "http", host.strip()
    elif scheme not in ("http", "https"):
        raise ValueError(f"--host {host!r}: the scheme must be http or https")
    else:
        port = 443 if scheme == "https" else 80
    hostport, _, path = rest.partition("/")
    if hostport.count(":") > 1 and not hostport.startswith("["):  # a bare IPv6 address
        hostport = f"[{hostport}]"
    parts = urllib.parse.urlsplit(f"//{hostport}")
    try:
        port = parts.port if parts.port is not None else port
    except ValueError:
        raise ValueError(f"--host {host!r}: the port must be an integer in [0, 65535]") from None
    name = parts.hostname or "127.0.0.1"
    name = f"[{name}]" if ":" in name else name
    return f"{scheme}://{name}:{port}" + (f"/{path.strip('/')}" if path.strip("/") else "")


class Client:
    """Ollama's routes of one server, over urllib (no client library needed)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def open(self, method: str, path: str, body: dict | None = None, timeout: float = TIMEOUT):
        """The response of a successful request; a ServerError with the server's message otherwise."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise ServerError(_error_of(e.read(), f"{method} {path}: HTTP {e.code} {e.reason}")) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"could not connect to jaxserve at {self.url} ({reason}); "
                              f"is `jaxserve serve` running?") from None

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        with self.open(method, path, body) as response:
            return json.loads(response.read() or b"{}")

    def lines(self, path: str, body: dict):
        """The NDJSON objects of a streamed answer, as they come; an {"error": ...} raises."""
        with self.open("POST", path, body, timeout=PULL_TIMEOUT) as response:
            try:
                for line in response:
                    if line.strip():
                        obj = json.loads(line)
                        if "error" in obj:
                            raise ServerError(str(obj["error"]))
                        yield obj
            except OSError as e:  # the server went away mid-stream
                raise ServerError(f"the connection to jaxserve at {self.url} broke: {e}") from None


def _error_of(body: bytes, fallback: str) -> str:
    """The message of Ollama's {"error": "..."} or OpenAI's {"error": {"message": ...}} body."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return fallback
    return error.get("message", fallback) if isinstance(error, dict) else str(error)


def _client(args: argparse.Namespace, environ=os.environ) -> Client:
    names = {o.name for o in CLIENT_OPTIONS}
    values = resolve_options(CLIENT_OPTIONS, {k: v for k, v in vars(args).items() if k in names},
                             environ=environ, config={}, defaults={})
    return Client(server_url(values["host"], values["port"]), values["api_key"])


# ---- jaxserve ps ---------------------------------------------------------------------------------

def _ps(args: argparse.Namespace) -> int:
    print(ps_table(_client(args).call("GET", "/api/ps")["models"]))
    return 0


def ps_table(models: list[dict], now: datetime.datetime | None = None) -> str:
    """`ollama ps`'s table of /api/ps's models."""
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "UNTIL")]
    for m in models:
        rows.append((m["name"], m["digest"].removeprefix("sha256:")[:12], human_bytes(m["size"]),
                     processor(m["size"], m.get("size_vram", 0)), until(m["expires_at"], now)))
    return table(rows)


def processor(size: int, size_vram: int) -> str:
    """Where a model's bytes are, as `ollama ps` says it."""
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def until(expires_at: str, now: datetime.datetime | None = None) -> str:
    """"4 minutes from now"; "Forever" for a model kept until the server stops (expires_at decades
    ahead); "Stopping..." once it has passed, as `ollama ps`."""
    t = datetime.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if t <= now:
        return "Stopping..."
    if (t - now).days > 20 * 365:
        return "Forever"
    return human_time(t, now)


# ---- jaxserve stop -------------------------------------------------------------------------------

def _stop(args: argparse.Namespace) -> int:
    """Ollama's way: an empty generate with keep_alive 0; silent when it worked."""
    client = _client(args)
    try:
        client.call("POST", "/api/generate", {"model": args.name, "keep_alive": 0})
    except ServerError as e:
        if "not found" in str(e):
            raise ServerError(f"couldn't find model \"{args.name}\" to stop") from None
        raise
    try:
        name = str(parse_name(args.name))
    except InvalidModelName:  # weights named by path: /api/ps lists them under other names
        return 0
    if any(m["name"] == name for m in client.call("GET", "/api/ps")["models"]):
        raise ServerError(f"{name} is still loaded: the model `jaxserve serve` was started with stays, and so "
                          f"does a model while it answers requests (its keep_alive then applies)")
    return 0


# ---- jaxserve pull -------------------------------------------------------------------------------

def _pull(args: argparse.Namespace) -> int:
    """/api/pull's lines on stderr (as `ollama pull`): a bar redrawn in place on a terminal, a line
    per 10% otherwise."""
    progress = Progress(sys.stderr)
    try:
        for line in _client(args).lines("/api/pull", {"model": args.name, "stream": True}):
            progress.show(line)
    except KeyboardInterrupt:  # Ctrl-C: the bar's line ends, no traceback
        return 130
    finally:
        progress.end()
    return 0


class Progress:
    """Renders /api/pull's status lines: each status once; a download's completed/total as a bar."""
    BAR = 25

    def __init__(self, out):
        self.out = out
        self.tty = out.isatty()
        self.status = None      # the status line being drawn or last printed
        self.shown = -1         # the last percentage (a plain line's tenth) printed for it
        self.open_line = False  # a bar drawn without its newline yet

    def show(self, line: dict) -> None:
        status, total = line.get("status", ""), line.get("total")
        if status != self.status:
            self.end()
            self.status, self.shown = status, -1
            if not total:
                self._write(status + "\n")
        if total:
            completed = min(line.get("completed") or 0, total)
            percent = completed * 100 // total
            sizes = f"{human_bytes(completed)}/{human_bytes(total)}"
            if self.tty:
                filled = completed * self.BAR // total
                bar = "█" * filled + " " * (self.BAR - filled)
                self._write(f"\r\x1b[K{status}: {percent:3d}% ▕{bar}▏ {sizes}")
                self.open_line = True
            elif percent // 10 > self.shown:
                self.shown = percent // 10
                self._write(f"{status}: {percent}% {sizes}\n")

    def end(self) -> None:
        if self.open_line:
            self._write("\n")
            self.open_line = False

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


COMMANDS = {"ps": _ps, "stop": _stop, "pull": _pull}
