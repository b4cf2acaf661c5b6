"""`ServerConfig`: the HTTP server's own settings (bind address, auth, CORS, TLS, logging and
tracing, limits).

Built once by the CLI from flags, environment and YAML; the engine's settings live in
jaxserve.config. Frozen: handlers read it, nothing changes it while serving.
"""
from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token: method and header names


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    served_model_names: tuple[str, ...]     # names clients may pass as "model"; the first is the main one
    host: str = "127.0.0.1"                 # address to bind
    port: int = 8000                        # TCP port to bind
    api_key: str | None = None              # when set, every route but /health needs "Bearer <key>"
    chat_template: str | None = None        # Jinja template text overriding the model's own
    response_role: str = "assistant"        # role of the generated chat message
    tool_call_parser: str | None = None     # the model's tool-call format (None: from its chat template)
    reasoning_parser: str | None = None     # splits <think> text into reasoning / thinking (None: no split)
    # CORS as vLLM's (Starlette's CORSMiddleware): "*" allows any origin, method or header.
    allowed_origins: tuple[str, ...] = ("*",)  # origins whose pages may call the API
    allowed_methods: tuple[str, ...] = ("*",)  # methods a preflight may ask for
    allowed_headers: tuple[str, ...] = ("*",)  # request headers a preflight may ask for
    allow_credentials: bool = False         # browsers may send cookies and Authorization cross-origin
    ssl_keyfile: str | None = None          # serve HTTPS when both files are given
    ssl_certfile: str | None = None
    # OTLP/HTTP collector URL (http://host:4318/v1/traces; one without a path gets /v1/traces):
    # one span per engine request. None: no tracing.
    otlp_traces_endpoint: str | None = None
    max_log_len: int | None = None          # characters of the prompt shown in request logs; None = all
    log_requests: bool = True               # one log line per finished request
    log_level: str = "info"                 # root log level
    max_queue: int = 512                    # sequences allowed to wait beyond --max-num-seqs
    max_request_bytes: int = 4 << 20        # larger bodies get 413
    shutdown_timeout: float = 5.0           # seconds in-flight streams get on SIGINT/SIGTERM
    # HTTP timeouts. None of them cuts off a request the engine is serving, streamed or not: a
    # generation takes as long as it takes (as in vLLM and Ollama). They close stalled clients only.
    request_timeout: float = 60.0           # seconds without a byte while a request's head or body arrives
    keep_alive_timeout: float = 5.0         # seconds an idle keep-alive connection stays open (uvicorn's 5)
    backlog: int = 2048                     # connections the kernel queues before the server accepts them
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter exist (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING).
    allow_runtime_lora_updating: bool = False

    def __post_init__(self):
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, got {self.served_model_names!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        from jaxserve.server import reasoning, tool_calls

        if self.tool_call_parser is not None and self.tool_call_parser not in tool_calls.PARSER_NAMES:
            raise ValueError(f"tool_call_parser must be one of {', '.join(tool_calls.PARSER_NAMES)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in reasoning.PARSER_NAMES:
            raise ValueError(f"reasoning_parser must be one of {', '.join(reasoning.PARSER_NAMES)}, "
                             f"got {self.reasoning_parser!r}")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be >= 0 or None, got {self.max_log_len!r}")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile must be given together")
        for field in ("allowed_origins", "allowed_methods", "allowed_headers"):
            values = getattr(self, field)
            if not isinstance(values, tuple) or not values or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{field} must be a non-empty tuple of non-empty strings, got {values!r}")
        for field in ("allowed_methods", "allowed_headers"):  # HTTP tokens: a comma would join two
            bad = [v for v in getattr(self, field) if v != "*" and not _TOKEN.fullmatch(v)]
            if bad:
                raise ValueError(f"{field}: {bad[0]!r} is not an HTTP method or header name (or \"*\")")
        if self.otlp_traces_endpoint is not None:
            url = urllib.parse.urlsplit(self.otlp_traces_endpoint)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError(f"otlp_traces_endpoint must be an http:// or https:// URL of an OTLP/HTTP "
                                 f"collector (spans go over HTTP/protobuf, usually port 4318), "
                                 f"got {self.otlp_traces_endpoint!r}")
        for path in (self.ssl_keyfile, self.ssl_certfile):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS file {path!r} does not exist")
        for field in ("request_timeout", "keep_alive_timeout", "shutdown_timeout"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{field} must be a number of seconds > 0, got {value!r}")
        if not isinstance(self.backlog, int) or self.backlog < 1:
            raise ValueError(f"backlog must be an integer >= 1, got {self.backlog!r}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset to disable authentication)")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
