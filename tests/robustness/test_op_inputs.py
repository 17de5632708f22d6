"""The fused ops' input checks, fuzzed: every call either computes the right answer or raises
a ValueError / TypeError naming an argument at fault.

The oracle is independent of fastsr's checks: `_expected_faults` derives from the arguments
alone which ones (if any) are invalid, and a valid call must match F.conv2d in float64. Empty
batches are valid (empty output, and zero gradients for the weights); an empty image (no
channel, row or column) is not. The Triton launchers' own checks (dtype, contiguity, `out`
aliasing an input) are exercised on the interpreter with a fixed table, since each launch
there costs a second.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fastsr
from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight
from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc
from fastsr.kernels.resblock import resblock_nhwc
from fastsr.ops import conv2d, resblock
from testenv import TRITON_DEVICE

CL = torch.channels_last
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int64]


def _expected_faults(xs, ws, x_dtype, bias_len, bias_dtype, shuffle) -> set[str]:
    """The arguments a conv2d call must be rejected for (any one may be named); empty: valid."""
    cout, wcin, k = ws
    faults = set()
    if len(xs) != 4:
        return {"x"}  # nothing else is checkable against a tensor of the wrong rank
    n, cin, h, w = xs
    if x_dtype == torch.int64 or min(cin, h, w) == 0:
        faults.add("x")
    if k not in (1, 3, 5) or wcin != cin:
        faults.add("weight")
    if bias_len is not None and (bias_len != cout or bias_dtype == torch.int64):
        faults.add("bias")
    if shuffle not in (1, 2, 3) or cout % (shuffle * shuffle):
        faults.add("shuffle")
    return faults


@st.composite
def conv_calls(draw):
    rank = draw(st.sampled_from([4, 4, 4, 3, 5]))
    n, cin, h, w = (draw(st.sampled_from([0, 1, 2])), draw(st.sampled_from([0, 1, 3, 4])),
                    draw(st.sampled_from([0, 1, 5, 7])), draw(st.sampled_from([0, 1, 6])))
    xs = (n, cin, h, w)[:rank] if rank <= 4 else (n, cin, h, w, 2)
    cout = draw(st.sampled_from([1, 3, 4, 8, 9, 12]))
    wcin = draw(st.sampled_from([cin, cin, cin + 1]))
    k = draw(st.sampled_from([3, 3, 1, 5, 2]))
    bias_len = draw(st.sampled_from([None, cout, cout, cout + 1]))
    return dict(
        xs=xs, ws=(cout, wcin, k), x_dtype=draw(st.sampled_from(DTYPES)),
        bias_len=bias_len, bias_dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.int64])),
        shuffle=draw(st.sampled_from([1, 1, 2, 3, 4])), relu=draw(st.booleans()),
        backend=draw(st.sampled_from(["cpu", "reference"])),
    )


def _tensor(shape, dtype, gen):
    t = torch.randn(shape, generator=gen) * 3
    return t.to(dtype)


@given(conv_calls(), st.integers(0, 2**31 - 1))
def test_conv2d_is_right_or_names_the_bad_argument(call, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _tensor(call["xs"], call["x_dtype"], gen)
    weight = torch.randn(*call["ws"][:2], call["ws"][2], call["ws"][2], generator=gen) * 0.2
    bias = None if call["bias_len"] is None else _tensor((call["bias_len"],), call["bias_dtype"], gen)
    faults = _expected_faults(call["xs"], call["ws"], call["x_dtype"], call["bias_len"], call["bias_dtype"],
                            call["shuffle"])
    run = lambda: conv2d(x, weight, bias, relu=call["relu"], shuffle=call["shuffle"], backend=call["backend"])
    if faults:
        with pytest.raises((ValueError, TypeError)) as err:
            run()
        assert any(re.search(rf"\b{f}\b", str(err.value)) for f in faults), (faults, str(err.value))
        return
    out = run()
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=call["ws"][2] // 2)
    if call["relu"]:
        ref = ref.relu()
    ref = F.pixel_shuffle(ref, call["shuffle"])
    assert out.shape == ref.shape and out.dtype == x.dtype
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 0.1
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item() if ref.numel() else 1))


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_empty_batch_is_empty_forward_and_backward(backend):
    """N = 0: empty outputs, an empty input gradient and all-zero weight gradients."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(0, 4, 5, 3, device=dev).contiguous(memory_format=CL).requires_grad_()
    w1, w2 = (torch.randn(4, 4, 3, 3, device=dev, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.randn(4, device=dev, requires_grad=True) for _ in range(2))
    up = torch.randn(16, 4, 3, 3, device=dev, requires_grad=True)
    h = resblock(x, w1, b1, w2, b2, 0.1, backend=backend)
    out = conv2d(h, up, None, shuffle=2, backend=backend)
    assert h.shape == (0, 4, 5, 3) and out.shape == (0, 4, 10, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape
    for t in (w1, w2, b1, b2, up):
        assert t.grad is not None and not t.grad.any()


@pytest.mark.parametrize("fused", [True, False])
def test_model_empty_batch_and_empty_image(fused):
    model = fastsr.EDSR(2, 1, 4, fused=fused)
    assert model(torch.rand(0, 3, 4, 4)).shape == (0, 3, 8, 8)
    for shape in [(1, 3, 0, 4), (1, 3, 4, 0)]:
        with pytest.raises(ValueError, match=r"input must have at least one row and column"):
            model(torch.rand(shape))


def test_mixed_devices_and_meta_tensors_are_named():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        conv2d(x, torch.randn(4, 4, 3, 3, device="meta"), None)
    with pytest.raises(ValueError, match=r"skip is on meta but x is on cpu"):
        conv2d(x, torch.randn(4, 4, 3, 3), None, skip=torch.randn(1, 4, 5, 5, device="meta"))
    # Meta tensors alone are shape inference: they pass the checks (no autocast on meta).
    assert conv2d(x.to("meta"), torch.randn(8, 4, 3, 3, device="meta"), None, shuffle=2).shape == (1, 2, 10, 10)


def _nhwc(shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


# (name, call): each must raise a ValueError / TypeError whose message matches the pattern.
_x, _w, _b = _nhwc((1, 5, 4, 8)), pack_weight(torch.randn(8, 8, 3, 3)), torch.randn(8)
_big = torch.randn(2, 5, 4, 8)
LAUNCHER_FAULTS = [
    ("x_rank", lambda: conv2d_nhwc(_x[0], _w, _b, 3), r"x must be a 4-D tensor"),
    ("x_f64", lambda: conv2d_nhwc(_x.double(), _w, _b, 3), r"x must be float32, float16 or bfloat16"),
    ("x_strided", lambda: conv2d_nhwc(_x.permute(0, 2, 1, 3), _w, _b, 3), r"x must be a contiguous"),
    ("w_dtype", lambda: conv2d_nhwc(_x, _w.bfloat16(), _b, 3), r"w_packed must have x's dtype"),
    ("bias_dtype", lambda: conv2d_nhwc(_x, _w, _b.double(), 3), r"bias must be float32"),
    ("ksize", lambda: conv2d_nhwc(_x, _w, _b, 4), r"kernel_size must be one of"),
    ("out_is_x", lambda: conv2d_nhwc(_x, _w, _b, 3, out=_x), r"out must not share memory with x"),
    ("out_overlaps_skip", lambda: conv2d_nhwc(_x, _w, _b, 3, skip=_big[:1], out=_big.view(-1)[10:10 + _x.numel()].view(_x.shape)),
     r"out must not share memory with skip"),
    ("out_dtype", lambda: conv2d_nhwc(_x, _w, _b, 3, out=torch.empty(1, 5, 4, 8, dtype=torch.bfloat16)), r"out must have x's dtype"),
    ("block_out_is_x", lambda: resblock_nhwc(_x, _w, _b, _w, _b, 3, out=_x), r"out must not share memory with x"),
    ("dw_out_shape", lambda: conv2d_backward_nhwc(_x.clone(), _x, torch.randn(8, 8, 3, 3), _b, 3,
                                                        dx_out=None, dw_out=torch.empty(8, 8, 1, 1)), r"dw_out"),
]


@pytest.mark.parametrize("name,call,pattern", LAUNCHER_FAULTS, ids=[c[0] for c in LAUNCHER_FAULTS])
def test_triton_launchers_name_the_bad_argument(name, call, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        call()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_resblock_without_biases_forward_and_backward(backend):
    """Biases are optional in the op's schema: the one-launch kernel adds zeros for them."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(11)
    x0 = torch.randn(1, 4, 6, 5, generator=gen).to(dev).contiguous(memory_format=CL)
    w0 = [(torch.randn(4, 4, 3, 3, generator=gen) * 0.3).to(dev) for _ in range(2)]
    grads = []
    for be in (backend, "reference"):
        x = x0.clone().requires_grad_()
        w1, w2 = (w.clone().requires_grad_() for w in w0)
        out = resblock(x, w1, None, w2, None, 0.5, backend=be)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad, w1.grad, w2.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
