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


@pytest.fixture
def tma_on(monkeypatch):
    """The TMA path on: patched under the interpreter; on a GPU only where it has TMA."""
    import torch

    import fastsr.kernels._common as common
    from testenv import TRITON_DEVICE

    if TRITON_DEVICE == "cpu":
        monkeypatch.setattr(common, "_has_tma", lambda device: True)
    elif not common._has_tma(torch.device(TRITON_DEVICE)):
        pytest.skip("this GPU has no TMA (compute capability < 9.0)")


@pytest.fixture
def count_kernel_choice(monkeypatch):
    """count_kernel_choice(module, tma_name, pointer_kernel) -> {"tma": n, "pointer": n}: counts,
    updated as the test runs, of the calls a launcher in `module` makes to its TMA launcher
    `module.<tma_name>` and of its `_launch`es of the pointer kernel (any other kernel fails)."""
    def count(module, tma_name: str, pointer_kernel) -> dict:
        counts = {"tma": 0, "pointer": 0}
        tma, launch = getattr(module, tma_name), module._launch

        def count_tma(*a, **k):
            counts["tma"] += 1
            return tma(*a, **k)

        def count_pointer(kernel, *a, **k):
            assert kernel is pointer_kernel
            counts["pointer"] += 1
            return launch(kernel, *a, **k)

        monkeypatch.setattr(module, tma_name, count_tma)
        monkeypatch.setattr(module, "_launch", count_pointer)
        return counts
    return count
