"""Parity tests for the Triton kernels (kernels/conv2d.py, kernels/resblock.py).

The specification is an eager reference written here from torch.nn.functional (conv2d on
NCHW, relu, pixel_shuffle), run in float64 for the "true" value. Tolerances:
- float32: max |fused - ref64| <= 1e-4 * max(1, max |ref64|)  (no TF32 in the kernels);
- float16 / bfloat16, flash-attention style: max |fused - ref64| <= 2 * max |eager - ref64|
  + 1e-5 * max(1, max |ref64|), where `eager` is the same computation done by eager PyTorch
  in the low-precision dtype (every op rounds to that dtype, as a model in that dtype would).

Inputs are fresh seeded torch.randn values (never zeros), outputs are NaN-poisoned `out`
tensors so an element the kernel forgets to write fails the test. On CPU the kernels run
under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the same tests run
unchanged on CUDA through the `device` fixture.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight
from fastsr.kernels.resblock import resblock_nhwc, resblock_supported
from parity import assert_parity

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)


# --------------------------------------------------------------------------------------
# Inputs and references
# --------------------------------------------------------------------------------------


def _randn(gen, *shape, scale=1.0):
    # Drawn on the CPU from a seeded generator, so CPU and CUDA runs see the same values.
    return torch.randn(*shape, generator=gen) * scale


def _weight(gen, c_out, c_in, ks):
    # Kaiming-like scale keeps outputs O(1), so the magnitude-relative tolerances mean something.
    return _randn(gen, c_out, c_in, ks, ks, scale=1.0 / math.sqrt(c_in * ks * ks))


def _nan_out(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _eager_lowprec(fn, dtype, *tensors):
    """Run `fn` on `tensors` in `dtype` with eager PyTorch.

    CPU F.conv2d supports bfloat16 and, in the torch versions fastsr targets (checked on
    2.13), float16 too. Should a build lack the fp16 CPU kernel, fall back to computing in
    float32 on inputs already rounded to fp16 and rounding the result: one rounding fewer
    than true fp16 eager, so the 2x bound gets slightly stricter, never looser."""
    try:
        return fn(*[t.to(dtype) if t is not None else None for t in tensors], dtype)
    except RuntimeError:
        if dtype != torch.float16:
            raise
        rounded = [t.to(dtype).float() if t is not None else None for t in tensors]
        return fn(*rounded, torch.float32).to(dtype)


def conv_ref(x, weight, bias, ks, in_shift, relu, res_scale, skip, shuffle, dtype):
    """The spec of conv2d_nhwc: NHWC in, NHWC out, every op in `dtype`."""
    xc = x.to(dtype).permute(0, 3, 1, 2)
    if in_shift is not None:
        xc = xc - in_shift.to(dtype).view(1, -1, 1, 1)  # F.conv2d then zero-pads the shifted x
    y = F.conv2d(xc, weight.to(dtype), None if bias is None else bias.to(dtype), padding=ks // 2)
    if relu:
        y = F.relu(y)
    y = y * res_scale
    if skip is not None:
        y = y + skip.to(dtype).permute(0, 3, 1, 2)
    if shuffle > 1:
        y = F.pixel_shuffle(y, shuffle)
    return y.permute(0, 2, 3, 1).contiguous()


def resblock_ref(x, w1, b1, w2, b2, ks, res_scale, dtype):
    """The spec of resblock_nhwc: x + res_scale * (conv2(relu(conv1(x) + b1)) + b2)."""
    xc = x.to(dtype).permute(0, 3, 1, 2)
    t = F.relu(F.conv2d(xc, w1.to(dtype), b1.to(dtype), padding=ks // 2))
    y = xc + res_scale * F.conv2d(t, w2.to(dtype), b2.to(dtype), padding=ks // 2)
    return y.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------
# conv2d_nhwc
# --------------------------------------------------------------------------------------

# (id, N, H, W, Cin, Cout, ks, epilogue options). Chosen to cover, not to multiply out:
# kernel sizes 1/3/5; channels 3, 16, 17, 64 and the EDSR roles (head 3->F with the mean
# shift, tail F->3, upsamplers F->4F + shuffle 2 and F->9F + shuffle 3); spatial sizes 1x1,
# 7x9, 13x11; batch 1 and 3; every epilogue alone and all together.
CONV_CASES = [
    ("head_3to16_k3_shift", 1, 13, 11, 3, 16, 3, dict(bias=True, shift=True, image=True)),
    ("tail_16to3_k3", 3, 7, 9, 16, 3, 3, dict(bias=True)),
    ("body_64_k3_relu", 3, 13, 11, 64, 64, 3, dict(bias=True, relu=True)),
    ("body_64_k3_scale_skip", 1, 7, 9, 64, 64, 3, dict(bias=True, res_scale=0.1, skip=True)),
    ("up_16to64_k3_shuffle2", 1, 13, 11, 16, 64, 3, dict(bias=True, shuffle=2)),
    ("up_16to144_k3_shuffle3", 3, 7, 9, 16, 144, 3, dict(bias=True, shuffle=3)),
    ("up_64to576_k3_shuffle3", 1, 5, 7, 64, 576, 3, dict(bias=True, shuffle=3)),  # EDSR x3 at F = 64
    ("odd_17_k5_relu_scale_skip", 1, 13, 11, 17, 17, 5, dict(bias=True, relu=True, res_scale=0.1, skip=True)),
    ("k5_16_shift_nobias", 3, 7, 9, 16, 16, 5, dict(shift=True)),
    ("pix1x1_17to16_k3_relu", 3, 1, 1, 17, 16, 3, dict(bias=True, relu=True)),
    ("pix1x1_16_k5_skip", 1, 1, 1, 16, 16, 5, dict(bias=True, skip=True)),
    ("k1_64to3_shift", 3, 7, 9, 64, 3, 1, dict(bias=True, shift=True)),
    ("k1_17to64_relu_shuffle2_nobias", 1, 13, 11, 17, 64, 1, dict(relu=True, shuffle=2)),
    ("all_but_shuffle_17to64_k3", 3, 13, 11, 17, 64, 3,
     dict(bias=True, shift=True, relu=True, res_scale=0.1, skip=True)),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_parity(case, dtype_name, device):
    name, n, h, w, c_in, c_out, ks, opt = case
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{dtype_name}".encode()))
    if opt.get("image"):
        # The EDSR head: 0..255 RGB in, the DIV2K mean (x rgb_range 255) shifted out.
        x = torch.rand(n, h, w, c_in, generator=gen) * 255
        shift = torch.tensor(DIV2K_MEAN) * 255
    else:
        x = _randn(gen, n, h, w, c_in)
        shift = _randn(gen, c_in) if opt.get("shift") else None
    weight = _weight(gen, c_out, c_in, ks)
    bias = _randn(gen, c_out) if opt.get("bias") else None
    relu = opt.get("relu", False)
    res_scale = opt.get("res_scale", 1.0)
    skip = _randn(gen, n, h, w, c_out) if opt.get("skip") else None
    r = opt.get("shuffle", 1)

    x = x.to(device=device, dtype=dtype)
    weight = weight.to(device=device, dtype=dtype)
    bias = None if bias is None else bias.to(device)
    shift = None if shift is None else shift.to(device)
    skip = None if skip is None else skip.to(device=device, dtype=dtype)

    out = _nan_out((n, h * r, w * r, c_out // (r * r)), dtype, device)
    fused = conv2d_nhwc(x, pack_weight(weight, r), bias, ks, in_shift=shift, relu=relu,
                        res_scale=res_scale, skip=skip, shuffle=r, out=out)
    assert fused is out

    def spec(x_, w_, b_, s_, k_, dt):
        return conv_ref(x_, w_, b_, ks, s_, relu, res_scale, k_, r, dt)

    ref64 = spec(x, weight, bias, shift, skip, torch.float64)
    eager = None if dtype == torch.float32 else _eager_lowprec(spec, dtype, x, weight, bias, shift, skip)
    assert_parity(fused, ref64, eager, dtype, f"conv2d[{name}, {dtype_name}]")


def test_conv2d_allocates_out_and_handles_empty_batch(device):
    gen = torch.Generator().manual_seed(1)
    x = _randn(gen, 2, 5, 6, 16).to(device)
    wp = pack_weight(_weight(gen, 64, 16, 3).to(device), 2)
    y = conv2d_nhwc(x, wp, None, 3, shuffle=2)
    assert y.shape == (2, 10, 12, 16) and y.is_contiguous() and y.dtype == x.dtype
    empty = conv2d_nhwc(x[:0], wp, None, 3, shuffle=2)
    assert empty.shape == (0, 10, 12, 16)


# --------------------------------------------------------------------------------------
# resblock_nhwc
# --------------------------------------------------------------------------------------

# (id, N, H, W, C, ks, res_scale): 3x3 and 5x5, res_scale 1 and 0.1, C 16, 17, 64,
# spatial sizes that the interpreter's 4x8 tile does not divide, 1x1, batch 1 and 3.
RESBLOCK_CASES = [
    ("c16_k3_13x11", 1, 13, 11, 16, 3, 1.0),
    ("c17_k3_b3_7x9_scale", 3, 7, 9, 17, 3, 0.1),
    ("c64_k3_7x9", 1, 7, 9, 64, 3, 1.0),
    ("c16_k5_b3_1x1_scale", 3, 1, 1, 16, 5, 0.1),
    ("c64_k5_7x9_scale", 1, 7, 9, 64, 5, 0.1),
    ("c17_k5_13x11", 1, 13, 11, 17, 5, 1.0),
]


def _resblock_inputs(gen, n, h, w, c, ks, dtype, device):
    x = _randn(gen, n, h, w, c).to(device=device, dtype=dtype)
    w1 = _weight(gen, c, c, ks).to(device=device, dtype=dtype)
    w2 = _weight(gen, c, c, ks).to(device=device, dtype=dtype)
    b1 = _randn(gen, c, scale=0.5).to(device)
    b2 = _randn(gen, c, scale=0.5).to(device)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", RESBLOCK_CASES, ids=[c[0] for c in RESBLOCK_CASES])
def test_resblock_parity(case, dtype_name, device):
    name, n, h, w, c, ks, res_scale = case
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{dtype_name}".encode()))
    x, w1, b1, w2, b2 = _resblock_inputs(gen, n, h, w, c, ks, dtype, device)

    out = _nan_out((n, h, w, c), dtype, device)
    fused = resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, ks, res_scale, out=out)
    assert fused is out

    def spec(x_, w1_, b1_, w2_, b2_, dt):
        return resblock_ref(x_, w1_, b1_, w2_, b2_, ks, res_scale, dt)

    ref64 = spec(x, w1, b1, w2, b2, torch.float64)
    eager = None if dtype == torch.float32 else _eager_lowprec(spec, dtype, x, w1, b1, w2, b2)
    assert_parity(fused, ref64, eager, dtype, f"resblock[{name}, {dtype_name}]")


@pytest.mark.parametrize("ks", [3, 5])
def test_resblock_matches_two_conv_fallback(ks, device):
    """The op layer's fallback (two conv2d_nhwc calls) computes the same block."""
    gen = torch.Generator().manual_seed(7 + ks)
    res_scale = 0.1
    x, w1, b1, w2, b2 = _resblock_inputs(gen, 2, 6, 10, 16, ks, torch.float32, device)
    fused = resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, ks, res_scale)
    t = conv2d_nhwc(x, pack_weight(w1), b1, ks, relu=True)
    two = conv2d_nhwc(t, pack_weight(w2), b2, ks, res_scale=res_scale, skip=x)
    torch.testing.assert_close(fused, two, rtol=1e-5, atol=1e-5)


def test_resblock_allocates_out_and_handles_empty_batch(device):
    gen = torch.Generator().manual_seed(2)
    x, w1, b1, w2, b2 = _resblock_inputs(gen, 1, 3, 4, 16, 3, torch.float32, device)
    y = resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, 3)
    assert y.shape == x.shape and y.is_contiguous() and torch.isfinite(y).all()
    empty = resblock_nhwc(x[:0], pack_weight(w1), b1, pack_weight(w2), b2, 3)
    assert empty.shape == (0, 3, 4, 16)


def test_resblock_supported():
    assert resblock_supported(64, 3) and resblock_supported(64, 5) and resblock_supported(17, 3)
    assert not resblock_supported(256, 3)  # compute-bound: two convs are better
    assert not resblock_supported(64, 1) and not resblock_supported(64, 4)
    assert not resblock_supported(0, 3)


# --------------------------------------------------------------------------------------
# pack_weight
# --------------------------------------------------------------------------------------


def test_pack_weight_layout(device):
    gen = torch.Generator().manual_seed(3)
    c_out, c_in, ks = 5, 3, 3
    weight = _randn(gen, c_out, c_in, ks, ks).to(device)
    packed = pack_weight(weight)
    assert packed.shape == (ks * ks * c_in, c_out) and packed.is_contiguous()
    for kh in range(ks):
        for kw in range(ks):
            for ci in range(c_in):
                assert torch.equal(packed[(kh * ks + kw) * c_in + ci], weight[:, ci, kh, kw])


@pytest.mark.parametrize("r", [2, 3])
def test_pack_weight_shuffle_order(r, device):
    """pack_weight(w, r): column q = (i*r + j)*C + c holds conv channel c*r^2 + i*r + j (C = Cout/r^2),
    and the packing is the same from the kernels' memory layout (the fused plan's)."""
    from fastsr.models.fused import kernel_layout

    gen = torch.Generator().manual_seed(30 + r)
    c, c_in, ks = 3, 2, 3
    weight = _randn(gen, c * r * r, c_in, ks, ks).to(device)
    packed = pack_weight(weight, r)
    assert packed.shape == (ks * ks * c_in, c * r * r) and packed.is_contiguous()
    plain = pack_weight(weight)
    for i in range(r):
        for j in range(r):
            for ch in range(c):
                assert torch.equal(packed[:, (i * r + j) * c + ch], plain[:, ch * r * r + i * r + j])
    assert torch.equal(pack_weight(kernel_layout(weight), r), packed)
    with pytest.raises(ValueError, match="divisible by 9"):
        pack_weight(_randn(gen, 8, c_in, ks, ks), 3)


# --------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------


def _conv_inputs(device, dtype=torch.float32, n=1, h=4, w=5, c_in=8, c_out=16, ks=3):
    gen = torch.Generator().manual_seed(4)
    x = _randn(gen, n, h, w, c_in).to(device=device, dtype=dtype)
    wp = pack_weight(_weight(gen, c_out, c_in, ks).to(device=device, dtype=dtype))
    bias = _randn(gen, c_out).to(device)
    return x, wp, bias


def test_conv2d_rejects_bad_inputs(device):
    x, wp, bias = _conv_inputs(device)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        conv2d_nhwc(x[0], wp, bias, 3)
    with pytest.raises(ValueError, match="w_packed has 72 rows"):
        conv2d_nhwc(torch.cat([x, x], dim=3), wp, bias, 3)  # 16 input channels, weight for 8
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        conv2d_nhwc(x.double(), wp.double(), bias, 3)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        conv2d_nhwc(x.to(torch.int32), wp.to(torch.int32), bias, 3)
    with pytest.raises(TypeError, match="w_packed must have x's dtype"):
        conv2d_nhwc(x, wp.half(), bias, 3)
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        conv2d_nhwc(x, wp, bias, 4)
    with pytest.raises(ValueError, match="skip with shuffle"):
        conv2d_nhwc(x, wp, bias, 3, skip=torch.zeros(1, 4, 5, 16, device=device), shuffle=2)
    with pytest.raises(ValueError, match="divisible by 9"):
        conv2d_nhwc(x, wp, bias, 3, shuffle=3)  # Cout 16
    with pytest.raises(ValueError, match="shuffle must be one of"):
        conv2d_nhwc(x, wp, bias, 3, shuffle=4)
    with pytest.raises(ValueError, match="bias must have 16 elements"):
        conv2d_nhwc(x, wp, bias[:8], 3)
    with pytest.raises(TypeError, match="bias must be float32"):
        conv2d_nhwc(x, wp, bias.half(), 3)
    with pytest.raises(ValueError, match="in_shift must have 8 elements"):
        conv2d_nhwc(x, wp, bias, 3, in_shift=bias)
    with pytest.raises(ValueError, match="x must be a contiguous"):
        conv2d_nhwc(x.transpose(1, 2), wp, bias, 3)
    with pytest.raises(ValueError, match="skip must have shape"):
        conv2d_nhwc(x, wp, bias, 3, skip=torch.zeros(1, 4, 5, 8, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        conv2d_nhwc(x, wp, bias, 3, out=torch.empty(1, 4, 5, 8, device=device))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        conv2d_nhwc(x, pack_weight(_weight(torch.Generator(), 8, 8, 3).to(device)), None, 3, out=x)
    with pytest.raises(ValueError, match="bias is on meta"):
        conv2d_nhwc(x, wp, bias.to("meta"), 3)


def test_resblock_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(5)
    x, w1, b1, w2, b2 = _resblock_inputs(gen, 1, 4, 5, 8, 3, torch.float32, device)
    p1, p2 = pack_weight(w1), pack_weight(w2)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        resblock_nhwc(x[0], p1, b1, p2, b2, 3)
    with pytest.raises(ValueError, match="w1_packed has 72 rows"):
        resblock_nhwc(torch.cat([x, x], dim=3), p1, b1, p2, b2, 3)
    with pytest.raises(ValueError, match="w2_packed must have 8 output channels"):
        resblock_nhwc(x, p1, b1, pack_weight(_weight(gen, 16, 8, 3).to(device)), b2, 3)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        resblock_nhwc(x.double(), p1.double(), b1, p2.double(), b2, 3)
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        resblock_nhwc(x, p1, b1, p2, b2, 4)
    with pytest.raises(ValueError, match="b2 must have 8 elements"):
        resblock_nhwc(x, p1, b1, p2, b2[:4], 3)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        resblock_nhwc(x, p1, b1, p2, b2, 3, out=x)


def test_a_narrow_packed_weight_is_padded_to_its_one_tile(device):
    """The tail's 3-column packed weight reaches the kernel zero-padded to its 16-column tile (so
    its rows load as 16-byte vectors; parity of those convs: tail_16to3_k3 and k1_64to3_shift
    above); a weight as wide as its tile is passed as it is, no copy."""
    from fastsr.kernels._common import pad_weight_columns

    gen = torch.Generator().manual_seed(11)
    narrow = pack_weight(_weight(gen, 3, 16, 3).to(device))
    padded = pad_weight_columns(narrow, 16)
    assert padded.shape == (144, 16) and padded.is_contiguous()
    assert torch.equal(padded[:, :3], narrow) and not padded[:, 3:].any()
    wide = pack_weight(_weight(gen, 64, 16, 3).to(device))
    assert pad_weight_columns(wide, 64) is wide
