"""`pull` of Ollama's Hugging Face names, ``hf.co/{user}/{repo}[:{quant}]``: the repository's GGUF file
of that quantization (Q4_K_M by default, as Ollama's) downloaded through huggingface_hub into its
cache. A hub that cannot be reached is said so within ``timeout`` seconds.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os

HF_HOSTS = ("hf.co", "huggingface.co")
DEFAULT_QUANT = "Q4_K_M"


class HubError(RuntimeError):
    """The hub cannot be reached, or the repository has no such file."""


@dataclasses.dataclass(frozen=True)
class HubFile:
    repo: str       # "user/repo"
    filename: str   # the .gguf file in it
    size: int       # bytes (0 when the hub does not say)
    sha256: str     # "" when the hub does not say


def hf_repo(name: str) -> tuple[str, str] | None:
    """("user/repo", quant) of an hf.co name as written (the hub's repositories keep their case),
    None for any other name."""
    host, _, rest = name.partition("/")
    if host.lower() not in HF_HOSTS or rest.count("/") != 1:
        return None
    repo, _, quant = rest.partition(":")
    return repo, (quant if quant and quant.lower() != "latest" else DEFAULT_QUANT)


def find_gguf(repo: str, quant: str, timeout: float) -> HubFile:
    """The repository's .gguf file whose name holds ``quant`` (any case). Raises HubError."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().model_info(repo, files_metadata=True, timeout=timeout)
    except RepositoryNotFoundError:
        raise HubError(f"{repo}: no such repository on the Hugging Face hub ({constants.ENDPOINT})") from None
    except Exception as e:  # offline mode, DNS, refused connection, timeout...
        raise HubError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) for {repo}: "
                       f"{type(e).__name__}: {str(e)[:200]}") from None
    ggufs = [s for s in info.siblings or () if s.rfilename.endswith(".gguf")]
    chosen = [s for s in ggufs if quant.lower() in s.rfilename.lower()]
    if not chosen:
        have = ", ".join(s.rfilename for s in ggufs) or "none"
        raise HubError(f"{repo} has no .gguf file of quantization {quant} (its .gguf files: {have})")
    s = min(chosen, key=lambda s: len(s.rfilename))
    lfs = getattr(s, "lfs", None)
    return HubFile(repo, s.rfilename, getattr(s, "size", None) or 0, getattr(lfs, "sha256", "") if lfs else "")


def downloaded_bytes(file: HubFile) -> int:
    """Bytes of the file in huggingface_hub's cache so far (its partial blob while downloading)."""
    from huggingface_hub import constants

    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + file.repo.replace("/", "--"), "blobs")
    sizes = [os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.incomplete")) if os.path.isfile(p)]
    return max(sizes, default=0)


def download(file: HubFile) -> str:
    """The file's path in the huggingface_hub cache (downloaded unless it is there)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(file.repo, file.filename)
    except Exception as e:
        raise HubError(f"downloading {file.repo}/{file.filename} failed: {type(e).__name__}: {str(e)[:200]}") from None


def verify(path: str, sha256: str) -> None:
    """The downloaded file's sha256 is the hub's (LFS files say it). Raises HubError."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise HubError(f"{path}: sha256 {digest.hexdigest()} is not the hub's {sha256}")
