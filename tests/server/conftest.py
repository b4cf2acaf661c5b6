"""The session's `jaxserve serve` subprocess: one default server (no API key) shared by every test
that needs one, with the small engine shape so warm-up reuses the persistent compilation cache.
"""
from __future__ import annotations

import pytest

from serverlib import MODEL, running


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default server (no API key, profiling on), shared by every test that needs one."""
    folder = tmp_path_factory.mktemp("server")
    with running(["--served-model-name", MODEL, "--max-queue", "512"], folder / "serve.log",
                 env={"JAXSERVE_PROFILER_DIR": str(folder / "profiles"),
                      "JAXSERVE_MODELS": str(folder / "store"),  # an empty store: one model listed
                      "JAXSERVE_HOST_HEAP": "retain"}) as srv:  # every server test runs on the kept heap too
        yield srv

