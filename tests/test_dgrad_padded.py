"""dgrad of a narrow gradient (the tail's 3 channels) through the padded copy: kernels/conv2d_dgrad.py's
`pad.pad_bordered_nhwc` (bordered, channel-padded copy of g, the prologue mask applied) and the
dgrad kernel's G_PAD path (16 / G_PAD taps per 16-wide K step, unrolled, no bounds masks).

Against float64 eager (dx = res_scale * conv_transpose(g * [mask != 0], W), zeroed where the
input mask is 0), the tolerances of tests/parity.py; fresh seeded inputs, NaN-poisoned outputs,
odd sizes, batch 1 and 3. Cases: G_PAD 8 (bf16/fp16: 4 taps per 32-wide step, the last step's
last 3 slots masked dummies), 4 (fp32 RGB: 4 taps per 16-wide step), 16 (Cout 9..15: 1 tap per fp32 step), 1x1 and 5x5,
both masks. Run under the Triton interpreter on CPU (tests/conftest.py).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastsr.kernels import conv2d_dgrad
from fastsr.kernels.conv2d_dgrad import _g_pad, conv2d_dgrad_nhwc, pack_weight_dgrad
from fastsr.ops.dispatch import unsupported_reasons
from parity import assert_parity

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _needs_triton():
    reasons = unsupported_reasons("triton", torch.zeros(1))
    if reasons:
        pytest.skip("; ".join(reasons))


def _nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def _dx(g, weight, ks, res_scale, gmask, imask, dtype):
    """Eager dx in `dtype` from NCHW g / masks: the specification."""
    g = g.to(dtype)
    if gmask is not None:
        g = torch.where(gmask != 0, g, torch.zeros_like(g))
    dx = F.conv_transpose2d(g, weight.to(dtype), padding=ks // 2) * res_scale
    if imask is not None:
        dx = torch.where(imask != 0, dx, torch.zeros_like(dx))
    return dx


# (id, N, H, W, Cin, Cout, ks, res_scale, grad mask, input mask, dtype, expected G_PAD)
CASES = [
    ("tail_64to3_b3_bf16", 3, 7, 9, 64, 3, 3, 1.0, False, False, "bf16", 8),
    ("tail_17to3_b1_fp32_scale", 1, 13, 11, 17, 3, 3, 0.1, False, False, "fp32", 4),
    ("relu_20to5_b3_fp16_masks", 3, 5, 6, 20, 5, 3, 1.0, True, True, "fp16", 8),
    ("k5_16to1_b1_fp32", 1, 6, 7, 16, 1, 5, 1.0, False, False, "fp32", 4),
    ("k1_16to3_b3_bf16_inmask", 3, 4, 5, 16, 3, 1, 1.0, False, True, "bf16", 8),
    ("cout12_fp32_gmask", 1, 5, 9, 16, 12, 3, 1.0, True, False, "fp32", 16),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dgrad_padded_gradient_parity(case, monkeypatch):
    name, n, h, w, c_in, c_out, ks, res_scale, with_gmask, with_imask, dtype_name, want_pad = case
    dtype = DTYPES[dtype_name]
    assert _g_pad(c_out, 1, dtype) == want_pad
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    weight = (torch.randn(c_out, c_in, ks, ks, generator=gen) / math.sqrt(c_in * ks * ks)).to(dtype)
    g = torch.randn(n, c_out, h, w, generator=gen).to(dtype)
    # ReLU-style masks: about half zeros, the rest positive values.
    gmask = torch.relu(torch.randn(n, c_out, h, w, generator=gen)).to(dtype) if with_gmask else None
    imask = torch.relu(torch.randn(n, c_in, h, w, generator=gen)).to(dtype) if with_imask else None

    padded = []
    real_pad = conv2d_dgrad.pad_bordered_nhwc

    def spy(*args, **kwargs):
        out = real_pad(*args, **kwargs)
        padded.append(out)
        return out

    monkeypatch.setattr(conv2d_dgrad, "pad_bordered_nhwc", spy)
    out = torch.full((n, h, w, c_in), float("nan"), dtype=dtype)
    dx = conv2d_dgrad_nhwc(_nhwc(g), weight, ks, res_scale=res_scale,
                           grad_mask=None if gmask is None else _nhwc(gmask),
                           input_mask=None if imask is None else _nhwc(imask), out=out)
    assert dx is out
    ref64 = _dx(g, weight, ks, res_scale, gmask, imask, torch.float64)
    eager = None if dtype == torch.float32 else _dx(g, weight, ks, res_scale, gmask, imask, dtype)
    assert_parity(dx, _nhwc(ref64), None if eager is None else _nhwc(eager), dtype, f"padded dgrad [{name}]")

    # The copy the kernel read: border and extra channels exactly zero, the masked gradient inside.
    (gp,) = padded
    p = ks // 2
    assert gp.shape == (n, h + 2 * p, w + 2 * p, want_pad)
    want = torch.zeros(n, h + 2 * p, w + 2 * p, want_pad, dtype=dtype)
    gz = g if gmask is None else torch.where(gmask != 0, g, torch.zeros_like(g))
    want[:, p:p + h, p:p + w, :c_out] = _nhwc(gz)
    assert torch.equal(gp, want)


def test_pack_weight_dgrad_padded_layout():
    gen = torch.Generator().manual_seed(7)
    c_out, c_in, ks, g_pad = 3, 5, 3, 8
    weight = torch.randn(c_out, c_in, ks, ks, generator=gen)
    packed = pack_weight_dgrad(weight, 1, g_pad)
    assert packed.shape == (ks * ks * g_pad, c_in) and packed.is_contiguous()
    plain = pack_weight_dgrad(weight, 1)
    for tap in range(ks * ks):
        for q in range(g_pad):
            row = packed[tap * g_pad + q]
            if q < c_out:
                assert torch.equal(row, plain[tap * c_out + q])
            else:
                assert not row.any()
    with pytest.raises(ValueError, match="g_pad"):
        pack_weight_dgrad(weight, 1, 2)  # Cout 3 > g_pad 2
