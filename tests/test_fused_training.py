"""Training through the fused model with the tools users train with: torch.autocast,
torch.compile, gradient accumulation, torch.utils.checkpoint and DDP.

Each test compares gradients with the eager model's on the same weights and inputs. The
"cpu" backend keeps them fast; the "triton" cases run under the interpreter on tiny shapes.
(DDP across two processes through `fastsr.train` is tests/test_train.py.)
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import fastsr
from testenv import TRITON_DEVICE
from fastsr.ops import conv2d, resblock

CL = torch.channels_last


def _device(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _pair(backend: str = "cpu", **kw):
    torch.manual_seed(0)
    eager = fastsr.EDSR(2, 2, 8, res_scale=0.5, **kw).to(_device(backend))
    fused = fastsr.EDSR(2, 2, 8, res_scale=0.5, fused=True, backend=backend, **kw).to(_device(backend))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _data(n: int = 2, h: int = 6, w: int = 5, device: str = "cpu"):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(n, 3, h, w, generator=gen) * 255, torch.rand(n, 3, 2 * h, 2 * w, generator=gen) * 255
    return x.to(device), y.to(device)


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, want: dict, rtol=1e-3, atol=1e-5) -> None:
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _l1_step(model, x, y, **kw) -> torch.Tensor:
    loss = (model(x, **kw).float() - y).abs().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_autocast_runs_the_fused_model_in_the_autocast_dtype(backend):
    """Under torch.autocast the fused ops compute in its dtype (as a model built with
    dtype=bf16 does, bit for bit), the image comes back fp32, and the gradients flow."""
    eager, fused = _pair(backend)
    dev = _device(backend)
    low = fastsr.EDSR(2, 2, 8, res_scale=0.5, fused=True, backend=backend, dtype=torch.bfloat16).to(dev)
    low.load_state_dict(eager.state_dict())
    x, y = _data(1, device=dev)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        out = fused(x)
    assert fused.backend == backend and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), low(x), rtol=0, atol=0)
        ref = eager(x)
    assert (out.detach() - ref).abs().max() < 2.0  # bf16 features, 0..255 pixels
    (out - y).abs().mean().backward()
    grads = _grads(fused)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())


def test_autocast_casts_the_ops_inputs_like_aten_conv():
    torch.manual_seed(2)
    x = torch.randn(2, 8, 7, 9).contiguous(memory_format=CL)
    w1, w2 = torch.randn(8, 8, 3, 3) * 0.1, torch.randn(8, 8, 3, 3) * 0.1
    b1, b2 = torch.randn(8), torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_conv = conv2d(x, w1, b1, relu=True, backend="cpu")
        got_block = resblock(x, w1, b1, w2, b2, 0.1, backend="cpu")
        aten = torch.nn.functional.conv2d(x, w1, b1, padding=1)
    bf = torch.bfloat16
    assert got_conv.dtype == got_block.dtype == aten.dtype == bf
    torch.testing.assert_close(got_conv, conv2d(x.to(bf), w1.to(bf), b1, relu=True, backend="cpu"), rtol=0, atol=0)
    torch.testing.assert_close(got_block, resblock(x.to(bf), w1.to(bf), b1, w2.to(bf), b2, 0.1, backend="cpu"),
                               rtol=0, atol=0)


def test_torch_compile_trains_through_the_fused_ops():
    eager, fused = _pair()
    x, y = _data()
    compiled = torch.compile(fused)
    loss_c = _l1_step(compiled, x, y)
    loss_e = _l1_step(eager, x, y)
    assert fused.backend == "cpu"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-4)
    _assert_same_grads(_grads(fused), _grads(eager))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gradient_accumulation_over_micro_batches_equals_one_batch(backend):
    _, fused = _pair(backend)
    x, y = _data(2, 5, 4, device=_device(backend))
    _l1_step(fused, x, y)
    whole = _grads(fused)
    fused.zero_grad(set_to_none=True)
    for i in range(2):  # two micro-batches of one: half the loss each, gradients accumulate
        loss = (fused(x[i:i + 1]) - y[i:i + 1]).abs().mean() / 2
        loss.backward()
    _assert_same_grads(_grads(fused), whole, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_around_the_fused_model():
    eager, fused = _pair()
    x, y = _data()
    x.requires_grad_()
    out = checkpoint(fused, x, use_reentrant=False)
    (out - y).abs().mean().backward()
    dx = x.grad.clone()
    x.grad = None
    _l1_step(eager, x, y)
    _assert_same_grads(_grads(fused), _grads(eager))
    torch.testing.assert_close(dx, x.grad, rtol=1e-3, atol=1e-7)


def test_ddp_wraps_the_fused_model(tmp_path):
    """One-rank DDP (gloo) around the fused model: its bucketed all-reduce hooks fire on the
    fused ops' parameter gradients, which equal the eager model's."""
    eager, fused = _pair()
    x, y = _data()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(fused)
        _l1_step(ddp, x, y)
    finally:
        # DDP's reducer holds the group inside reference cycles: freed first, the group's
        # worker threads are joined by destroy_process_group (as fastsr.train does).
        ddp = None
        gc.collect()
        dist.destroy_process_group()
    _l1_step(eager, x, y)
    _assert_same_grads(_grads(fused), _grads(eager))


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_on_or_off_gives_the_eager_gradients(recompute):
    """recompute=False (the CPU default) saves conv1's output instead of recomputing it;
    both choices train the same network: the eager model's gradients, fp32."""
    eager, fused = _pair(recompute=recompute)
    x, y = _data(3, 7, 5)
    torch.testing.assert_close(_l1_step(fused, x, y), _l1_step(eager, x, y), rtol=1e-5, atol=1e-4)
    _assert_same_grads(_grads(fused), _grads(eager))


def test_cpu_default_does_not_recompute_and_runs_no_reference_in_backward(monkeypatch):
    from fastsr.models import fused as fused_mod
    from fastsr.ops.backends import aten as conv_mod  # where the backward would recompute through the reference

    _, auto = _pair()
    assert auto.recompute is None and not fused_mod.recomputes(auto, "cpu")
    assert fused_mod.recomputes(auto, "triton") and fused_mod.recomputes(_pair(recompute=True)[1], "cpu")
    calls = {"ref": 0, "checkpoint": 0}
    real_ref, real_ckpt = conv_mod.conv2d_ref, fused_mod.checkpoint
    monkeypatch.setattr(conv_mod, "conv2d_ref", lambda *a, **k: (calls.__setitem__("ref", calls["ref"] + 1),
                                                                 real_ref(*a, **k))[1])
    monkeypatch.setattr(fused_mod, "checkpoint", lambda *a, **k: (calls.__setitem__("checkpoint", 1),
                                                                  real_ckpt(*a, **k))[1])
    x, y = _data()
    _l1_step(auto, x, y)
    assert calls == {"ref": 0, "checkpoint": 0}  # nothing recomputed: not the block, not the tail
    _, lean = _pair(recompute=True)
    _l1_step(lean, x, y)
    assert calls["checkpoint"] == 1


def test_relu_conv_backward_from_its_saved_output_matches_the_reference():
    """The cpu conv with a ReLU epilogue and no skip keeps its output for the mask; with a
    skip it cannot (out > 0 no longer says where conv + b > 0) and must still be right."""
    from fastsr.ops.reference import conv2d_ref

    torch.manual_seed(5)
    for skip in (False, True):
        x = torch.randn(2, 6, 7, 9).contiguous(memory_format=CL).requires_grad_()
        w = (torch.randn(6, 6, 3, 3) * 0.2).requires_grad_()
        b = torch.randn(6).requires_grad_()
        s = torch.randn(2, 6, 7, 9).contiguous(memory_format=CL) if skip else None
        g = torch.randn(2, 6, 7, 9)
        out = conv2d(x, w, b, relu=True, res_scale=0.7, skip=s, backend="cpu")
        got = torch.autograd.grad(out, (x, w, b), g)
        ref = conv2d_ref(x, w, b, relu=True, res_scale=0.7, skip=s)
        want = torch.autograd.grad(ref, (x, w, b), g)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
