"""Parity tests of the head kernel (kernels/conv2d_head.py) and of the fused ops' out_dtype.

The specification is the eager conv on the shifted input (F.conv2d), in float64 for the truth.
Tolerances:
- float32 image in, float32 out: max |fused - ref64| <= 1e-6 * max(1, max |ref64|). Measured for
  the 3xTF32 split on 0..255 images (bench/results/2026-12-02_issue13_upsampler_head.md): max abs
  error 9.9e-5 on outputs up to ~400, 2.4e-7 of the largest (eager fp32 F.conv2d: 8.3e-5, 2.0e-7).
  The bound is 4x that and 100x under tests/parity.py's fp32 1e-4: a split without its lo terms
  (plain tf32, ~2^-11 per product) or a bf16 hi+lo split (measured 6e-6 of the largest output)
  fails it, so the test checks the split's arithmetic, not only a widened dot.
- low-precision outputs and inputs: tests/parity.py's bound (2 x the eager low-precision error +
  atol), where "eager" is what the model did before the head wrote bf16 itself: the conv in x's
  dtype, then a cast.
Fresh seeded random inputs (images in 0..255, never zeros), NaN-poisoned outputs, odd sizes,
batch 1 and 3. On CPU the kernel runs under the Triton interpreter, which computes the same
tf32 split as the GPU (integer rounding on the bits; products of tf32 values are exact in fp32).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastsr.kernels.conv2d import pack_weight
from fastsr.kernels.conv2d_head import conv2d_head_nhwc, head_conv_supported, pad_image_nhwc
from fastsr.kernels.conv2d_wgrad import conv2d_wgrad_nhwc
from fastsr.ops.conv2d import conv2d
from fastsr.ops.reference import conv2d_ref
from parity import assert_parity
from testenv import TRITON_DEVICE

DIV2K_MEAN = (0.4488, 0.4371, 0.4040)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_HEAD_TOL = 1e-6  # of max(1, max |ref64|): see the module docstring
# The head's weight gradient (fp32 image x fp32 gradient, 3xTF32), of max |ref64| (dW's and db's
# own): measured 1.0e-7..2.6e-7 over these cases and a 2x24x24 one, eager fp32 on CPU 3.6e-7..1.6e-6
# (bench/results/2026-12-03_issue13_head_operand.md); plain tf32 products (~2^-11 each) would be ~1e-4.
FP32_HEAD_WGRAD_TOL = 2e-6


def _nhwc_ref(x, weight, bias, shift, ks, relu, res_scale, dtype):
    """The head's spec in `dtype`: NHWC in, NHWC out."""
    xc = x.to(dtype).permute(0, 3, 1, 2)
    if shift is not None:
        xc = xc - shift.to(dtype).view(1, -1, 1, 1)
    y = F.conv2d(xc, weight.to(dtype), None if bias is None else bias.to(dtype), padding=ks // 2)
    if relu:
        y = F.relu(y)
    return (y * res_scale).permute(0, 2, 3, 1).contiguous()


# (id, N, H, W, Cin, Cout, ks, options): the EDSR/MDSR head (3 -> F, 3x3, the mean shifted out),
# a gray image's heads (K = 9 pads to 16, K = 25), a 1x1 on 3 channels, the epilogues.
CASES = [
    ("edsr_head_3to64_13x11", 1, 13, 11, 3, 64, 3, dict(bias=True, shift=True)),
    ("edsr_head_3to64_b3_7x9", 3, 7, 9, 3, 64, 3, dict(bias=True, shift=True)),
    ("head_3to24_b3_1x1_relu", 3, 1, 1, 3, 24, 3, dict(bias=True, shift=True, relu=True)),
    ("gray_1to16_k3_scale", 1, 9, 17, 1, 16, 3, dict(bias=True, res_scale=0.5)),
    ("gray_1to8_k5_nobias", 3, 5, 7, 1, 8, 5, dict(shift=True)),
    ("rgb_3to136_k1", 1, 7, 5, 3, 136, 1, dict(bias=True, shift=True)),  # three N blocks (interpreter: 64)
]


def _inputs(name, n, h, w, c_in, c_out, ks, opt, x_dtype, device):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.rand(n, h, w, c_in, generator=gen) * 255
    if zlib.crc32(name.encode()) % 2:
        x = x.round()  # 8-bit images as well as resampled ones
    weight = torch.randn(c_out, c_in, ks, ks, generator=gen) / math.sqrt(c_in * ks * ks)
    bias = torch.randn(c_out, generator=gen) if opt.get("bias") else None
    shift = (torch.tensor(DIV2K_MEAN[:c_in]) * 255 if c_in == 3 else torch.rand(c_in, generator=gen) * 128) \
        if opt.get("shift") else None
    to = dict(device=device)
    return (x.to(dtype=x_dtype, **to), weight.to(dtype=x_dtype, **to), None if bias is None else bias.to(**to),
            None if shift is None else shift.to(**to))


@pytest.mark.parametrize("out_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_image_head_parity(case, out_name, device):
    """fp32 image in (3xTF32), any output dtype."""
    name, n, h, w, c_in, c_out, ks, opt = case
    out_dtype = DTYPES[out_name]
    x, weight, bias, shift = _inputs(name, n, h, w, c_in, c_out, ks, opt, torch.float32, device)
    relu, res_scale = opt.get("relu", False), opt.get("res_scale", 1.0)
    out = torch.full((n, h, w, c_out), float("nan"), dtype=out_dtype, device=device)
    got = conv2d_head_nhwc(x, pack_weight(weight), bias, ks, in_shift=shift, relu=relu, res_scale=res_scale,
                           out_dtype=out_dtype, out=out)
    assert got is out
    ref64 = _nhwc_ref(x, weight, bias, shift, ks, relu, res_scale, torch.float64)
    if out_dtype == torch.float32:
        assert torch.isfinite(got).all()
        scale = max(1.0, ref64.abs().max().item())
        err = (got.double() - ref64).abs().max().item()
        assert err <= FP32_HEAD_TOL * scale, f"{name}: max |fused - ref64| = {err:.3g} > {FP32_HEAD_TOL * scale:.3g}"
    else:
        eager = _nhwc_ref(x, weight, bias, shift, ks, relu, res_scale, torch.float32).to(out_dtype)
        assert_parity(got, ref64, eager, out_dtype, f"head[{name}, fp32 -> {out_name}]")


@pytest.mark.parametrize("x_name", ["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:5], ids=[c[0] for c in CASES[:2] + CASES[3:5]])
def test_low_precision_image_head_parity(case, x_name, device):
    """A bf16/fp16 image: one MMA in its dtype, x - shift rounded to it as eager does."""
    name, n, h, w, c_in, c_out, ks, opt = case
    dtype = DTYPES[x_name]
    x, weight, bias, shift = _inputs(name, n, h, w, c_in, c_out, ks, opt, dtype, device)
    relu, res_scale = opt.get("relu", False), opt.get("res_scale", 1.0)
    out = torch.full((n, h, w, c_out), float("nan"), dtype=dtype, device=device)
    got = conv2d_head_nhwc(x, pack_weight(weight), bias, ks, in_shift=shift, relu=relu, res_scale=res_scale, out=out)
    ref64 = _nhwc_ref(x, weight, bias, shift, ks, relu, res_scale, torch.float64)
    try:
        eager = _nhwc_ref(x, weight, bias, shift, ks, relu, res_scale, dtype)
    except RuntimeError:  # a torch without the fp16 CPU conv: fp32 on the rounded inputs, one rounding fewer
        eager = _nhwc_ref(x.float(), weight.float(), bias, None if shift is None else shift.to(dtype).float(), ks,
                          relu, res_scale, torch.float32).to(dtype)
    assert_parity(got, ref64, eager, dtype, f"head[{name}, {x_name}]")


@pytest.mark.parametrize("x_name", ["fp32", "bf16"])
def test_pad_image_layout(x_name, device):
    """The head's padded copy, element for element: x - in_shift (in x's dtype) inside, zeros in
    the border and the spare channels (16 bytes per pixel: fp32 4 channels, bf16 8)."""
    dtype = DTYPES[x_name]
    x, _, _, shift = _inputs("pad_" + x_name, 3, 5, 7, 3, 8, 3, dict(shift=True), dtype, device)
    got = pad_image_nhwc(x, 3, shift)
    c_x = 4 if dtype == torch.float32 else 8
    want = torch.zeros(3, 7, 9, c_x, dtype=dtype)
    want[:, 1:-1, 1:-1, :3] = (x.cpu().float() - shift.cpu()).to(dtype)  # eager `x - mean` in x's dtype
    assert got.shape == want.shape and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("g_name", ["fp32", "bf16_valued"])
@pytest.mark.parametrize("n,h,w", [(1, 13, 11), (3, 7, 9)])
def test_head_wgrad_fp32_tight(n, h, w, g_name, device):
    """The head's dW/db (fp32 0..255 image with the mean shifted out, 3xTF32 on the padded copy)
    against float64 at fp32-level accuracy; bf16-valued gradients are what bf16 training hands it."""
    name = f"wgrad_{n}x{h}x{w}_{g_name}"
    x, _, _, shift = _inputs(name, n, h, w, 3, 64, 3, dict(shift=True), torch.float32, device)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
    g = torch.randn(n, h, w, 64, generator=gen)
    if g_name != "fp32":
        g = g.bfloat16().float()
    g = g.to(device)
    dw_out = torch.full((64, 3, 3, 3), float("nan"), device=device)
    db_out = torch.full((64,), float("nan"), device=device)
    dw, db = conv2d_wgrad_nhwc(x, g, 3, in_shift=shift, res_scale=0.5, dw_out=dw_out, db_out=db_out)
    xs = (x.double() - shift.double()).permute(0, 3, 1, 2).cpu()
    ref_w = 0.5 * torch.nn.grad.conv2d_weight(xs, (64, 3, 3, 3), g.double().permute(0, 3, 1, 2).cpu(), padding=1)
    ref_b = 0.5 * g.double().sum((0, 1, 2)).cpu()
    for got, ref, what in ((dw, ref_w, "dW"), (db, ref_b, "db")):
        err = (got.cpu().double() - ref).abs().max().item()
        assert err <= FP32_HEAD_WGRAD_TOL * ref.abs().max().item(), f"{name} {what}: max |fused - ref64| = {err:.3g}"


def test_head_rejects_what_it_does_not_take(device):
    x, weight, bias, shift = _inputs("reject", 1, 4, 5, 3, 16, 3, dict(bias=True, shift=True), torch.float32, device)
    wp = pack_weight(weight)
    with pytest.raises(ValueError, match="KS\\*KS\\*Cin <= 32"):
        conv2d_head_nhwc(torch.zeros(1, 4, 5, 4, device=device), pack_weight(torch.randn(16, 4, 3, 3).to(device)),
                         bias, 3)
    with pytest.raises(TypeError, match="out_dtype must be"):
        conv2d_head_nhwc(x, wp, bias, 3, out_dtype=torch.float64)
    with pytest.raises(TypeError, match="w_packed must have x's dtype"):
        conv2d_head_nhwc(x, wp.to(torch.bfloat16), bias, 3)
    with pytest.raises(ValueError, match="in_shift must have 3 elements"):
        conv2d_head_nhwc(x, wp, bias, 3, in_shift=bias)
    with pytest.raises(TypeError, match="out must be torch.bfloat16"):
        conv2d_head_nhwc(x, wp, bias, 3, out_dtype=torch.bfloat16, out=torch.empty(1, 4, 5, 16, device=device))
    assert conv2d_head_nhwc(x[:0], wp, bias, 3, out_dtype=torch.bfloat16).shape == (0, 4, 5, 16)
    assert head_conv_supported(3, 3) and head_conv_supported(1, 5) and not head_conv_supported(4, 3)
    assert not head_conv_supported(3, 3, shuffle=2) and not head_conv_supported(3, 3, skip=x)


def test_op_out_dtype_forward_and_weight_gradients():
    """fastsr::conv2d with out_dtype on the Triton backend (the head kernel) and the reference:
    the same bf16 features, and the same weight/bias gradients as eager autograd through
    conv_ref(...).to(bf16) (the image needs none: it takes no gradient)."""
    dev = TRITON_DEVICE
    gen = torch.Generator().manual_seed(11)
    x = (torch.rand(2, 3, 7, 9, generator=gen) * 255).to(dev).contiguous(memory_format=torch.channels_last)
    w0 = (torch.randn(16, 3, 3, 3, generator=gen) / math.sqrt(27)).to(dev)
    b0 = torch.randn(16, generator=gen).to(dev)
    shift = (torch.tensor(DIV2K_MEAN) * 255).to(dev)
    g = torch.randn(2, 16, 7, 9, generator=gen).to(dev).to(torch.bfloat16)

    def run(fn):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(w, b)
        y.backward(g)
        return y.detach(), w.grad, b.grad

    got = run(lambda w, b: conv2d(x, w, b, in_shift=shift, out_dtype=torch.bfloat16, backend="triton"))
    ref = run(lambda w, b: conv2d_ref(x, w, b, in_shift=shift).to(torch.bfloat16))
    assert got[0].dtype == torch.bfloat16 and got[0].is_contiguous(memory_format=torch.channels_last)
    # Both round the same fp32-accurate value to bf16: at most one bf16 ulp apart.
    assert ((got[0].float() - ref[0].float()).abs() <= ref[0].float().abs() * 2.0**-7 + 1e-6).all()
    for a, b in zip(got[1:], ref[1:]):  # fp32 gradients of the same bf16 output gradient
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    by_ref = conv2d(x, w0, b0, in_shift=shift, out_dtype=torch.bfloat16, backend="reference")
    assert by_ref.dtype == torch.bfloat16 and torch.equal(by_ref, ref[0])
    with pytest.raises(TypeError, match="out_dtype must be"):
        conv2d(x, w0, b0, out_dtype=torch.int32, backend="triton")
