"""Shared tolerance check of the kernel tests (flash-attention style)."""
import torch


def assert_parity(fused, ref64, eager, dtype, what):
    """fp32: |fused - ref64| <= 1e-4 * scale; low precision: <= 2 * |eager - ref64| + 1e-5 * scale.

    ref64 is the float64 truth, eager the same computation in eager torch at `dtype`.
    """
    assert fused.dtype == dtype, f"{what}: dtype {fused.dtype}, expected {dtype}"
    assert tuple(fused.shape) == tuple(ref64.shape), f"{what}: shape {tuple(fused.shape)} vs {tuple(ref64.shape)}"
    assert torch.isfinite(fused).all(), f"{what}: non-finite result (an element left unwritten?)"
    scale = max(1.0, ref64.abs().max().item())
    err = (fused.double() - ref64).abs().max().item()
    if dtype == torch.float32:
        tol = 1e-4 * scale
        assert err <= tol, f"{what}: max |fused - ref64| = {err:.3g} > {tol:.3g}"
    else:
        eager_err = (eager.double() - ref64).abs().max().item()
        tol = 2 * eager_err + 1e-5 * scale
        assert err <= tol, (
            f"{what}: max |fused - ref64| = {err:.3g} > 2 * max |eager {dtype} - ref64| "
            f"({eager_err:.3g}) + atol"
        )
