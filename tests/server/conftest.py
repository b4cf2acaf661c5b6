"""The session's `jaxserve serve` subprocess: one default server (no API key) shared by every test
that needs one, with the small engine shape so warm-up reuses the persistent compilation cache.
"""
from __future__ import annotations

import pytest

from serverlib import MODEL, ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server (no API key, profiling on), shared by every test that needs one."""
    folder = tmp_path_factory.mktemp("server")
    srv = ServerProcess(["--served-model-name", MODEL, "--max-queue", "512"], folder / "serve.log",
                        env={"JAXSERVE_PROFILER_DIR": str(folder / "profiles")})
    try:
        srv.wait_ready()
        yield srv
    finally:
        # SIGINT, as Ctrl-C: a clean exit (the keyed server's test checks SIGTERM).
        assert srv.stop() == 0, srv.read_log()[-3000:]

