"""Test setup shared by every test file.

The Triton kernels run on CPU tensors under Triton's interpreter. `TRITON_INTERPRET` is
read when a kernel is decorated, so it is set here, before anything imports the kernels.
"""
import os
from pathlib import Path

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the imports below
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTSR_DATA", REPO_ROOT.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if _HAS_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def shared_set(name: str) -> Path:
    """Path of a benchmark set under ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present (../shared/data is only beside the project on dev/CI machines)")
    return path
