"""Registered fused ops (fastsr::conv2d, fastsr::resblock): parity with the eager
reference for every backend that can run here, opcheck, dispatch and input checks.

The "triton" backend runs on CPU tensors under the Triton interpreter (conftest sets
TRITON_INTERPRET=1), so its shapes here stay small; tests/test_kernels.py covers the
kernels' full shape/dtype matrix.
"""
import pytest
import torch

import fastsr
from fastsr.errors import BackendUnavailable
from fastsr.ops.conv2d import conv2d, conv2d_op
from fastsr.ops.resblock import resblock, resblock_op
from fastsr.ops.dispatch import choose_backend, unsupported_reasons
from fastsr.ops.reference import conv2d_ref, resblock_ref

CL = torch.channels_last
BACKENDS = ["cpu", "triton"]
LOW = [torch.bfloat16, torch.float16]


def rand(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def conv_case(n, cin, cout, h, w, k, dtype=torch.float32, device="cpu", seed=0):
    x = rand(n, cin, h, w, seed=seed, dtype=dtype, device=device)
    wt = rand(cout, cin, k, k, seed=seed + 1, device=device) / (cin * k * k) ** 0.5
    b = rand(cout, seed=seed + 2, device=device)
    return x, wt.to(dtype), b


def check_lowprec(out, ref64, eager_low, atol):
    """flash-attention's bound: fused error <= 2x the eager low-precision error + atol."""
    err = (out.double() - ref64).abs().max().item()
    bound = 2 * (eager_low.double() - ref64).abs().max().item() + atol
    assert err <= bound, f"fused error {err:.4g} > bound {bound:.4g}"


def skip_if_unavailable(backend, x):
    reasons = unsupported_reasons(backend, x)
    if reasons:
        pytest.skip("; ".join(reasons))


EPILOGUES = [
    dict(),
    dict(relu=True),
    dict(res_scale=0.1, skip=True),
    dict(skip=True),
    dict(in_shift=True),
    dict(shuffle=2),
    dict(shuffle=3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epi", EPILOGUES, ids=lambda e: "-".join(e) or "bias")
@pytest.mark.parametrize("n,cin,cout,h,w,k", [(1, 3, 18, 1, 1, 3), (3, 16, 36, 7, 9, 3), (2, 17, 9, 13, 11, 5)])
def test_conv2d_fp32_matches_reference(backend, epi, n, cin, cout, h, w, k, device):
    x, wt, b = conv_case(n, cin, cout, h, w, k, device=device)
    skip_if_unavailable(backend, x)
    shuffle = epi.get("shuffle", 1)
    if cout % (shuffle * shuffle):
        pytest.skip("channel count not divisible by shuffle^2")
    kw = dict(relu=epi.get("relu", False), res_scale=epi.get("res_scale", 1.0), shuffle=shuffle,
              skip=rand(n, cout, h, w, seed=9, device=device) if epi.get("skip") else None,
              in_shift=rand(cin, seed=7, device=device) if epi.get("in_shift") else None)
    out = conv2d(x.contiguous(memory_format=CL), wt, b, backend=backend, **kw)
    ref = conv2d_ref(x, wt, b, **kw)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_conv2d_low_precision_bound(backend, dtype):
    x, wt, b = conv_case(3, 16, 16, 7, 9, 3)
    skip_if_unavailable(backend, x.to(dtype))
    skip = rand(3, 16, 7, 9, seed=5)
    ref64 = conv2d_ref(x.double(), wt.double(), b.double(), res_scale=0.1, skip=skip.double(), relu=True)
    eager_low = conv2d_ref(x.to(dtype), wt.to(dtype), b, res_scale=0.1, skip=skip.to(dtype), relu=True)
    out = conv2d(x.to(dtype), wt.to(dtype), b, res_scale=0.1, skip=skip.to(dtype), relu=True, backend=backend)
    assert out.dtype == dtype
    check_lowprec(out, ref64, eager_low, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,h,w,k,res_scale", [(1, 16, 1, 1, 3, 1.0), (3, 16, 7, 9, 3, 0.1), (1, 7, 13, 11, 5, 1.0)])
def test_resblock_fp32_matches_reference(backend, n, c, h, w, k, res_scale, device):
    x, w1, b1 = conv_case(n, c, c, h, w, k, device=device)
    _, w2, b2 = conv_case(n, c, c, h, w, k, seed=10, device=device)
    skip_if_unavailable(backend, x)
    out = resblock(x, w1, b1, w2, b2, res_scale, backend=backend)
    torch.testing.assert_close(out, resblock_ref(x, w1, b1, w2, b2, res_scale), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
def test_resblock_low_precision_bound(backend, dtype):
    x, w1, b1 = conv_case(2, 16, 16, 7, 9, 3)
    _, w2, b2 = conv_case(2, 16, 16, 7, 9, 3, seed=10)
    skip_if_unavailable(backend, x.to(dtype))
    ref64 = resblock_ref(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), 0.1)
    eager_low = resblock_ref(x.to(dtype), w1.to(dtype), b1, w2.to(dtype), b2, 0.1)
    out = resblock(x.to(dtype), w1.to(dtype), b1, w2.to(dtype), b2, 0.1, backend=backend)
    check_lowprec(out, ref64, eager_low, atol=1e-2)


def test_strided_and_nchw_inputs_give_the_same_answer():
    x, wt, b = conv_case(2, 8, 8, 9, 11, 3)
    wide = rand(2, 8, 9, 22)[..., ::2]  # a non-contiguous view
    for inp in (x, x.contiguous(memory_format=CL), wide):
        torch.testing.assert_close(conv2d(inp, wt, b, relu=True), conv2d_ref(inp, wt, b, relu=True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x, wt, b = conv_case(2, 8, 8, 5, 6, 3)
    skip_if_unavailable(backend, x)
    x = x.contiguous(memory_format=CL).requires_grad_()
    skip = rand(2, 8, 5, 6, seed=3).contiguous(memory_format=CL)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    conv_impl, block_impl = {"cpu": ("cpu", "cpu"), "triton": ("triton_conv", "triton_block")}[backend]
    torch.library.opcheck(conv2d_op, (x, wt, b, None, skip, True, 0.5, 1, conv_impl, backend), test_utils=tests)
    torch.library.opcheck(conv2d_op, (x, rand(32, 8, 3, 3), b.repeat(4), rand(8), None, False, 1.0, 2, conv_impl,
                                      "auto"), test_utils=tests)
    torch.library.opcheck(resblock_op, (x, wt, b, wt.clone(), b.clone(), 0.1, block_impl, backend), test_utils=tests)


@pytest.mark.parametrize("backend", ["cpu"])
def test_backward_matches_eager_autograd(backend):
    x, w1, b1 = conv_case(2, 8, 8, 5, 7, 3)
    _, w2, b2 = conv_case(2, 8, 8, 5, 7, 3, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    resblock(*leaves, 0.1, backend=backend).square().sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    resblock_ref(*ref_leaves, 0.1).square().sum().backward()
    for a, r in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-4)


def test_gradcheck_float64_cpu_backend():
    x, wt, b = conv_case(1, 3, 8, 4, 5, 3, dtype=torch.float64)
    args = [t.double().requires_grad_() for t in (x, wt, b)]
    skip = rand(1, 2, 8, 10, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d(x, w, b, relu=True, shuffle=2), args)
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: conv2d(x, w.repeat(1, 1, 1, 1)[:2], b[:2], res_scale=0.3, skip=s[:, :, :4, :5]),
        args + [skip])


def test_named_backend_fails_loudly_with_reasons():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="float32/float16/bfloat16"):
        choose_backend(x, "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend(x, "cudnn")
    assert choose_backend(torch.randn(1, 3, 4, 4)) == "cpu"


def test_bad_inputs_are_named():
    x, wt, b = conv_case(1, 8, 8, 5, 5, 3)
    with pytest.raises(ValueError, match="x must be \\(N, C, H, W\\)"):
        conv2d(x[0], wt, b)
    with pytest.raises(ValueError, match="x has 8 channels but weight expects Cin=4"):
        conv2d(x, wt[:, :4], b)
    with pytest.raises(TypeError, match="floating point"):
        conv2d(x.long(), wt, b)
    with pytest.raises(ValueError, match="k in 1/3/5"):
        conv2d(x, rand(8, 8, 4, 4), b)
    with pytest.raises(ValueError, match="skip cannot be combined"):
        conv2d(x, rand(32, 8, 3, 3), None, skip=x, shuffle=2)
    with pytest.raises(ValueError, match="bias must be \\(8,\\)"):
        conv2d(x, wt, b[:3])
    with pytest.raises(ValueError, match="C -> C"):
        resblock(x, rand(4, 8, 3, 3), None, rand(4, 8, 3, 3), None)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on cuda"):
            conv2d(x, wt.cuda(), b)


def test_empty_batch_returns_empty():
    x, wt, b = conv_case(0, 8, 8, 5, 5, 3)
    assert conv2d(x, wt, b).shape == (0, 8, 5, 5)
    assert resblock(x, wt, b, wt, b).shape == (0, 8, 5, 5)


_ONEDNN_PROBE = r"""
import sys, torch, fastsr
torch.manual_seed(0)
model = fastsr.EDSR(2, n_resblocks=2, n_feats=16, fused=True, backend="cpu", dtype=DTYPE).eval()
x = torch.rand(1, 3, 12, 10) * 255
with torch.no_grad():
    model(x)
    print("=== second forward", flush=True)  # oneDNN's verbose lines go to stdout too
    model(x)
"""


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_cpu_convs_are_one_onednn_primitive_with_their_epilogue_and_no_reorder(dtype):
    """ONEDNN_VERBOSE of a second forward: every conv one primitive, the blocks' ReLU and skip
    add as post-ops, and no weight reorder (the weights were packed once)."""
    import re
    import subprocess
    import sys

    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    proc = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE.replace("DTYPE", dtype)], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "ONEDNN_VERBOSE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split("=== second forward")[1].splitlines()
    execs = [line for line in lines if line.startswith("onednn_verbose") and ",exec," in line]
    kinds = [line.split(",")[5] for line in execs]
    posts = [m.group(1) if (m := re.search(r"attr-post-ops:([a-z_]+)", line)) else "-" for line in execs]
    assert kinds == ["convolution"] * 8, kinds  # head, 2 x 2 block convs, body conv, upsampler, tail: no reorder
    assert posts == ["-", "eltwise_relu", "binary_add", "eltwise_relu", "binary_add", "binary_add", "-", "-"], posts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_packed_weights_under_inference_mode_and_after_an_update(dtype):
    """The packed-weight cache under torch.inference_mode (the plan's tensors there are
    inference tensors, without version counters) and after an in-place weight update."""
    torch.manual_seed(0)
    model = fastsr.EDSR(2, n_resblocks=2, n_feats=8, fused=True, backend="cpu",
                        dtype=None if dtype == torch.float32 else dtype).eval()
    x = torch.rand(1, 3, 7, 9) * 255
    with torch.no_grad():
        want = model(x)
    with torch.inference_mode():
        first, second = model(x), model(x)
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    with torch.no_grad():
        model.body[0].body[0].weight.mul_(0.5)  # in place: the version counter moves
        eager = fastsr.EDSR(2, n_resblocks=2, n_feats=8).eval()
        eager.load_state_dict(model.state_dict())
        tol = 1e-3 if dtype == torch.float32 else 2.0
        torch.testing.assert_close(model(x), eager(x), rtol=0, atol=tol)


@pytest.mark.parametrize("r", [2, 3])
def test_cpu_shuffle_from_reordered_channels_matches_reference_and_follows_updates(r):
    """The aten backend runs an upsampler conv with its output channels in shuffle order and
    shuffles by a copy of contiguous runs; the result is PixelShuffle's under no_grad,
    inference_mode and grad, for plain and inference weights (reordered once outside
    autograd), and an in-place update (a version bump) is seen by the next call."""
    x, wt, b = conv_case(2, 5, 8 * r * r, 7, 9, 3)
    x = x.contiguous(memory_format=CL)
    with torch.inference_mode():
        frozen = wt.clone()  # an inference tensor, like the fused plan's weights: reordered once
    for w in (wt, frozen):
        for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
            with mode():
                for _ in range(2):
                    out = conv2d(x, w, b, shuffle=r, backend="cpu")
                    assert out.is_contiguous(memory_format=CL)
                    torch.testing.assert_close(out, conv2d_ref(x, wt, b, shuffle=r), rtol=1e-4, atol=1e-4)
    param = torch.nn.Parameter(wt.clone())
    with torch.no_grad():
        conv2d(x, param, b, shuffle=r, backend="cpu")
        param.mul_(-0.5)  # in place: the reordered copy made by the call above is stale now
        torch.testing.assert_close(conv2d(x, param, b, shuffle=r, backend="cpu"),
                                   conv2d_ref(x, param.detach(), b, shuffle=r), rtol=1e-4, atol=1e-4)
