"""Weights by name: the files shipped in this folder, the official release, a path, or the Hub.

`resolve_weights(spec, arch)` turns what a user writes into a local file:

- ``"default"``: the EDSR-baseline x2/x3/x4 files shipped inside the package
  (`edsr_baseline_x{2,3,4}.safetensors`, written by `fastsr.checkpoints.save_safetensors`).
- ``"official"``: the EDSR-PyTorch release for that architecture and scale, downloaded once
  into torch.hub's cache (``$TORCH_HOME/hub/checkpoints``) and checked against the SHA-256
  prefix its file name carries (``edsr_baseline_x2-1bc95232.pt``: ``1bc95232``), on download
  and again on every use, so a damaged or tampered file is refused, never loaded.
  ``FASTSR_WEIGHTS_URL`` replaces the release's address (a mirror; the tests' local server).
- ``"hf://owner/repo[/file]"``: a file of a Hugging Face Hub repository through
  ``huggingface_hub`` (the optional extra ``fastsr[hub]``).
- anything else: a path to a checkpoint file.

Nothing is downloaded unless "official" or "hf://" is asked for by name.
"""
from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
from pathlib import Path

from fastsr.errors import CheckpointError

WEIGHTS_DIR = Path(__file__).resolve().parent
WEIGHT_WORDS = ("default", "official")

# The addresses EDSR-PyTorch's own code loads (src/model/edsr.py, mdsr.py), by the
# architecture tag fastsr's models report (`model.arch`).
OFFICIAL_BASE_URL = "https://cv.snu.ac.kr/research/EDSR/models/"
OFFICIAL_FILES = {
    "r16f64x2": "edsr_baseline_x2-1bc95232.pt",
    "r16f64x3": "edsr_baseline_x3-abf2a44e.pt",
    "r16f64x4": "edsr_baseline_x4-6b446fab.pt",
    "r32f256x2": "edsr_x2-0edfb8a3.pt",
    "r32f256x3": "edsr_x3-ea3ef2c6.pt",
    "r32f256x4": "edsr_x4-4f62e9ef.pt",
    "mdsr-r16f64": "mdsr_baseline-a00cab12.pt",
    "mdsr-r80f64": "mdsr-4a78bedf.pt",
}
_SHIPPED = {"r16f64x2": 2, "r16f64x3": 3, "r16f64x4": 4}


def default_weights(scale: int) -> Path | None:
    """Path of the shipped EDSR-baseline weights for `scale`, or None when not shipped."""
    path = WEIGHTS_DIR / f"edsr_baseline_x{int(scale)}.safetensors"
    return path if path.is_file() else None


def resolve_weights(spec: str | os.PathLike, arch: str | None = None) -> Path:
    """A local checkpoint file for `spec` ("default", "official", "hf://...", or a path).

    arch: the architecture tag the file must be for (`model.arch`, e.g. "r16f64x2" or
    "mdsr-r16f64"); needed by "default" and "official", ignored for paths and hf://.
    Raises CheckpointError with one line saying what is missing and what to do instead.
    """
    text = os.fspath(spec)
    if text == "default":
        if arch not in _SHIPPED:
            raise CheckpointError(f"weights='default': fastsr ships EDSR-baseline x2/x3/x4 weights only, not {arch}; "
                                  "use weights='official' or a file")
        path = default_weights(_SHIPPED[arch])
        if path is None:
            raise CheckpointError(f"weights='default': the shipped file for {arch} is missing from {WEIGHTS_DIR}")
        return path
    if text == "official":
        if arch not in OFFICIAL_FILES:
            raise CheckpointError(f"weights='official': EDSR-PyTorch released no weights for {arch} "
                                  f"(released: {', '.join(OFFICIAL_FILES)})")
        return official_weights(arch)
    if text.startswith("hf://"):
        return hub_weights(text)
    return Path(text)


def official_url(arch: str) -> str:
    """Where the official file for `arch` is downloaded from (FASTSR_WEIGHTS_URL overrides the base)."""
    base = os.environ.get("FASTSR_WEIGHTS_URL") or OFFICIAL_BASE_URL
    return base.rstrip("/") + "/" + OFFICIAL_FILES[arch]


def _hash_prefix(file_name: str) -> str:
    """'edsr_x2-0edfb8a3.pt' -> '0edfb8a3' (torch.hub's convention: a SHA-256 prefix)."""
    return file_name.rsplit(".", 1)[0].rsplit("-", 1)[1]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def official_weights(arch: str, progress: bool | None = None) -> Path:
    """The official checkpoint for `arch` in torch.hub's cache, downloaded if absent.

    The file's SHA-256 must start with the prefix in its name, checked after download and
    before every use (a cached file that fails is downloaded again). progress: a download
    bar on stderr (default: when stderr is a terminal).
    """
    import torch.hub

    name = OFFICIAL_FILES[arch]
    prefix = _hash_prefix(name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if cached.is_file() and _sha256(cached).startswith(prefix):
        return cached
    url = official_url(arch)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Writes to a temporary file beside `cached`, checks the hash, then renames: an
        # interrupted or corrupted download never leaves a file under the final name.
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=prefix,
                                       progress=sys.stderr.isatty() if progress is None else progress)
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"could not download {url}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e.strerror or e
        raise CheckpointError(f"could not download {url}: no network or server unreachable ({reason}); "
                              f"download it elsewhere and pass the file (weights=PATH, --weights PATH)") from None
    except RuntimeError as e:  # torch.hub: 'invalid hash value (expected "...", got "...")'
        raise CheckpointError(f"{url}: refused: the downloaded file fails its SHA-256 check ({e}); "
                              "it is damaged or not the released file") from None
    return cached


def hub_weights(spec: str) -> Path:
    """'hf://owner/repo[/file]' -> the file, downloaded through huggingface_hub's cache.

    Without a file name the repository must hold exactly one .safetensors, .pt or .pth file.
    """
    parts = spec[len("hf://"):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise CheckpointError(f"weights={spec!r}: expected hf://owner/repo or hf://owner/repo/file")
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"weights={spec!r} needs huggingface_hub: pip install 'fastsr[hub]'") from None
    repo, file_name = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        if not file_name:
            files = [f for f in huggingface_hub.list_repo_files(repo)
                     if f.lower().endswith((".safetensors", ".pt", ".pth"))]
            if len(files) != 1:
                found = ", ".join(files) if files else "none"
                raise CheckpointError(f"weights={spec!r}: name the file (hf://{repo}/FILE); "
                                      f"checkpoint files in the repository: {found}")
            file_name = files[0]
        return Path(huggingface_hub.hf_hub_download(repo, file_name))
    except CheckpointError:
        raise
    except Exception as e:  # offline, no such repository or file, gated: the library says which
        raise CheckpointError(f"weights={spec!r}: could not get it from the Hugging Face Hub "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
