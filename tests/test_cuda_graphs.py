"""CUDA-graph replay of the fused inference forward (fastsr.cuda_graphs), and the plan's
weight layout for the Triton kernels.

The replay tests need a CUDA device (they run in bench/gpu_check.sh); on the CPU the tests
check that graphs are never used and that nothing else changes.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fastsr
from fastsr.kernels.conv2d import pack_weight
from fastsr.models.fused import get_plan, kernel_layout
from fastsr.ops import conv2d, resblock
from testenv import TRITON_DEVICE

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _model(device: str = "cpu", **kw):
    torch.manual_seed(0)
    return fastsr.EDSR(2, 2, 16, res_scale=0.1, fused=True, **kw).to(device)


def test_graphs_need_the_fused_model():
    with pytest.raises(ValueError, match="cuda_graphs=True replays the fused forward"):
        fastsr.EDSR(2, 1, 8).prepare_for_inference(cuda_graphs=True)


def test_cpu_inputs_never_use_graphs_and_say_so_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _model().prepare_for_inference(cuda_graphs=True)
        x = torch.rand(1, 3, 6, 5) * 255
        with torch.no_grad():
            outs = [model(x) for _ in range(3)]
    said = [str(w.message) for w in caught if "cuda_graphs=True has no effect here" in str(w.message)]
    assert len(said) == 1, said  # once per model, whether prepare or the first CPU call noticed
    assert model.backend == "cpu" and not model.graphs.last_replayed
    assert model.graphs.captures == model.graphs.replays == 0
    torch.testing.assert_close(outs[2], outs[0], rtol=0, atol=0)


def test_ops_take_weights_in_the_kernels_layout_forward_and_backward():
    """The plan stores weights (k, k, Cin, Cout) in memory on CUDA: the Triton ops must give
    the same outputs and gradients as with contiguous weights (here under the interpreter
    when there is no GPU), and packing them is a view."""
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 8, 5, 7, generator=gen)).to(dev).contiguous(memory_format=torch.channels_last)
    w1, w2 = ((torch.randn(8, 8, 3, 3, generator=gen) * 0.2).to(dev) for _ in range(2))
    up = (torch.randn(32, 8, 3, 3, generator=gen) * 0.2).to(dev)
    b1 = torch.randn(8, generator=gen).to(dev)
    laid_out = kernel_layout(w1)
    assert pack_weight(laid_out).data_ptr() == laid_out.data_ptr()

    def run(layout):
        ws = [layout(t).requires_grad_() for t in (w1, w2, up)]
        xi = x.clone().requires_grad_()
        h = resblock(xi, ws[0], b1, ws[1], None, 0.1, backend="triton")
        out = conv2d(h, ws[2], None, shuffle=2, backend="triton")
        out.square().sum().backward()
        return [out.detach(), xi.grad] + [w.grad for w in ws]

    for got, want in zip(run(kernel_layout), run(lambda t: t.clone())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cuda
def test_plan_weights_are_stored_in_the_kernels_packed_layout():
    model = _model("cuda").prepare_for_inference()
    plan = get_plan(model, torch.float32, torch.float32)
    w = plan.body[0][0][0]
    packed = pack_weight(w)
    assert packed.data_ptr() == w.data_ptr()  # packing is a view: no copy kernel per call
    torch.testing.assert_close(packed, pack_weight(w.contiguous()), rtol=0, atol=0)


@needs_cuda
def test_replay_equals_the_plain_forward_and_keeps_earlier_results():
    model = _model("cuda", backend="triton").prepare_for_inference(cuda_graphs=True)
    plain = _model("cuda", backend="triton").eval()
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.rand(2, 3, 17, 23, device="cuda", generator=gen) * 255 for _ in range(4)]
    with torch.no_grad():
        outs = [model(x) for x in xs]
        refs = [plain(x) for x in xs]
    g = model.graphs
    assert g.captures == 1 and g.replays == 3 and g.last_replayed and model.backend == "triton"
    for out, ref in zip(outs, refs):  # every call's output is its own, not the static buffer
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@needs_cuda
def test_new_weights_recapture_instead_of_replaying_stale_ones():
    model = _model("cuda", backend="triton").prepare_for_inference(cuda_graphs=True)
    x = torch.rand(1, 3, 9, 9, device="cuda") * 255
    with torch.no_grad():
        for _ in range(3):
            before = model(x)
        model.body[0].body[0].weight.add_(0.05)  # an in-place update, as an optimizer step
        after = [model(x) for _ in range(3)]
        model.graphs = None
        want = model(x)
    assert not torch.equal(after[0], before)
    for out in after:
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@needs_cuda
def test_shapes_get_their_own_graphs_within_the_bound_and_grad_mode_skips_them():
    model = _model("cuda", backend="triton").prepare_for_inference(cuda_graphs=True, max_graphs=2)
    with torch.no_grad():
        for h in (8, 9, 10):
            x = torch.rand(1, 3, h, 7, device="cuda") * 255
            model(x), model(x)
    assert model.graphs.captures == 3 and len(model.graphs._graphs) == 2
    model(torch.rand(1, 3, 10, 7, device="cuda") * 255)  # gradients on: the plain forward
    assert not model.graphs.last_replayed
