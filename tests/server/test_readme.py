"""Every curl example in the README's Serving section runs as written (pointed at the test server)
and gets a successful answer."""
from __future__ import annotations

import os
import re
import subprocess

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def readme_curl_commands() -> list[str]:
    text = open(README).read()
    section = text.split("## Serving", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("curl "):
                commands.append(command)
    return commands


def test_readme_curl_examples_work(server):
    commands = readme_curl_commands()
    routes = {re.search(r"8000(/\S*)", c).group(1).rstrip("'") for c in commands}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat",
            "/api/tags", "/metrics"} <= routes
    for command in commands:
        command = command.replace("http://127.0.0.1:8000", server.url).replace("curl ", "curl -sS --fail-with-body ", 1)
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stdout[-500:], done.stderr[-500:])
        out = done.stdout
        assert out.strip() and '"error"' not in out, (command, out[-500:])
        if "stream\": true" in command:
            assert out.rstrip().endswith("data: [DONE]")


def test_readme_python_client_example_works(server, capsys):
    text = open(README).read()
    section = text.split("## Serving", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(code.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # both answers printed (sampled text may hold blank lines)
