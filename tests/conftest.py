"""Fixtures shared by every test file; the shared constants live in tests/testenv.py."""
import pytest

from testenv import DEVICES, tiny_random  # first: sets TRITON_INTERPRET before any kernel is imported


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def weights_x2(tmp_path):
    """A tiny random EDSR x2 (1 block, 8 features) saved as safetensors."""
    from fastsr.checkpoints import save_safetensors
    from fastsr.models import EDSR

    return save_safetensors(tiny_random(EDSR(2, n_resblocks=1, n_feats=8)), tmp_path / "tiny_x2.safetensors")
