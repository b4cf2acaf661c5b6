"""`jaxserve serve` option precedence (flag > environment > --config > default) and `jaxserve run`,
one-shot and interactive, against the offline API's greedy chat."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxserve import SamplingParams
from jaxserve.cli import build_parser, resolve_options_for

JAXSERVE = os.path.join(os.path.dirname(sys.executable), "jaxserve")
QUESTION = "What is the capital of France?"


def _resolve(argv, env=None):
    return resolve_options_for(build_parser().parse_args(["serve", *argv]), environ=env or {})


def test_flag_beats_environment_beats_config_beats_default(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("port: 9001\nhost: 0.0.0.0\nmax_num_seqs: 4\napi-key: file\nenable-prefix-caching: false\n"
                      "served-model-name: [a, b]\nmodel: smollm2\n")
    o = _resolve(["--config", str(config)])
    assert (o["port"], o["host"], o["max_num_seqs"], o["api_key"]) == (9001, "0.0.0.0", 4, "file")
    assert o["enable_prefix_caching"] is False and o["served_model_name"] == ("a", "b") and o["model"] == "smollm2"
    assert o["max_queue"] == 512 and o["log_level"] == "info"  # defaults
    env = {"JAXSERVE_PORT": "9002", "JAXSERVE_API_KEY": "env", "JAXSERVE_LOGGING_LEVEL": "debug",
           "JAXSERVE_ALLOWED_ORIGINS": "http://a.example, http://b.example"}
    o = _resolve(["--config", str(config)], env)
    assert (o["port"], o["api_key"], o["log_level"], o["host"]) == (9002, "env", "debug", "0.0.0.0")
    assert o["allowed_origins"] == ("http://a.example", "http://b.example")
    assert (o["allowed_methods"], o["allowed_headers"], o["allow_credentials"], o["otlp_traces_endpoint"]) == (
        ("*",), ("*",), False, None)
    o = _resolve(["--config", str(config), "--port", "9003", "--enable-prefix-caching", "my-model"], env)
    assert (o["port"], o["api_key"], o["enable_prefix_caching"], o["model"]) == (9003, "env", True, "my-model")


def test_bad_config_and_environment_are_reported(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("max-num-seq: 4\n")
    with pytest.raises(ValueError, match="unknown key 'max-num-seq'"):
        _resolve(["--config", str(config)])
    config.write_text("port: eighty\n")
    with pytest.raises(ValueError, match="port must be an integer"):
        _resolve(["--config", str(config)])
    with pytest.raises(ValueError, match="JAXSERVE_PORT"):
        _resolve([], {"JAXSERVE_PORT": "x"})
    done = subprocess.run([JAXSERVE, "serve", "--config", str(tmp_path / "missing.yaml")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "missing.yaml" in done.stderr and "Traceback" not in done.stderr
    with socket.create_server(("127.0.0.1", 0)) as busy:  # refused before the model loads
        port = str(busy.getsockname()[1])
        done = subprocess.run([JAXSERVE, "serve", "--port", port], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and f"127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_serve_help_groups_the_flags():
    done = subprocess.run([JAXSERVE, "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for group in ("server:", "logging:", "model and engine:"):
        assert group in done.stdout
    for flag in ("--api-key", "--served-model-name", "--max-queue", "--no-enable-prefix-caching", "--ssl-certfile",
                 "--kv-cache-memory", "--gpu-memory-utilization", "--disable-log-requests", "--max-log-len"):
        assert flag in done.stdout


def test_run_with_a_prompt_prints_the_answer_and_without_one_chats(smollm2_llm):
    want = smollm2_llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0, max_tokens=12),
                            use_tqdm=False)[0].outputs[0].text
    args = ["--temperature", "0", "--max-tokens", "12", "--max-model-len", "512"]
    done = subprocess.run([JAXSERVE, "run", "smollm2", QUESTION, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip("\n") == want
    chat = subprocess.run([JAXSERVE, "run", *args, "--verbose"], input=f"{QUESTION}\nAnd of Italy?\n/bye\n",
                          capture_output=True, text=True, timeout=600)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.startswith(f">>> {want}\n>>> ") and chat.stdout.count(">>> ") == 3
    assert chat.stderr.count("\neval rate:") == 2 and chat.stderr.count("prompt eval count:") == 2


def test_run_format_constrains_the_answer():
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                         "additionalProperties": False})
    done = subprocess.run([JAXSERVE, "run", "smollm2", "Is Paris in France?", "--format", schema, "--temperature",
                           "0", "--max-tokens", "30", "--max-model-len", "512"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(json.loads(done.stdout)) == ["ok"]


def test_list_flags_take_several_values_or_vllms_json_list():
    o = _resolve(["--allowed-origins", '["http://a.example", "http://b.example"]', "--allowed-methods", "GET", "POST",
                  "--allow-credentials", "--otlp-traces-endpoint", "http://127.0.0.1:4318"])
    assert o["allowed_origins"] == ("http://a.example", "http://b.example")
    assert o["allowed_methods"] == ("GET", "POST") and o["allow_credentials"] is True
    assert o["otlp_traces_endpoint"] == "http://127.0.0.1:4318"
    o = _resolve([], {"JAXSERVE_ALLOWED_HEADERS": '["Content-Type", "Authorization"]'})
    assert o["allowed_headers"] == ("Content-Type", "Authorization")
    with pytest.raises(ValueError, match="allowed-origins must be a list of strings"):
        _resolve(["--allowed-origins", '["http://a.example", 3]'])
    with pytest.raises(ValueError, match="allowed-origins must be a list of strings"):
        _resolve(["--allowed-origins", '["unclosed'])
