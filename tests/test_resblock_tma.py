"""Parity and selection tests of the TMA residual block (kernels/resblock_tma.py).

On CPU the kernel runs under the Triton interpreter (tests/testenv.py sets TRITON_INTERPRET=1),
whose host-side TensorDescriptor zero-fills box elements outside the tensor, negative
coordinates included, as the copy engine does: the border taps of phase 1 (x) and the boxes of
phase 2 that run past the workspace slot's BLOCK_M columns exercise exactly what the GPU gets.
`_common._has_tma` is patched to say yes there (the one switch `resblock_nhwc` asks); on a GPU
(TRITON_DEVICE) the same tests run through the autotuner, and skip without TMA. The
interpreter's tile is BLOCK_M 16 (TILE_W 14 at 3x3, 12 at 5x5) x TILE_H 4 with 2 programs, so the
odd sizes below have partial tiles in both directions and each program runs several tiles
(rewriting its slot). The workspace is NaN-filled under the interpreter and every output is
NaN-poisoned, so a slot element read before it is written, or an output never stored, fails.
Tolerances are tests/parity.py's (bf16/fp16: 2 x the eager low-precision error + atol, against a
float64 reference); fp32 takes the pointer kernel (tested tight here as a fallback).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import fastsr.kernels._common as common
import fastsr.kernels.resblock as resblock_mod
from fastsr.kernels.conv2d import pack_weight
from fastsr.kernels.resblock import resblock_nhwc
from fastsr.kernels.resblock_tma import tma_block_supported
from fastsr.ops.reference import conv2d_ref
from parity import assert_parity
from testenv import TRITON_DEVICE

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# tma_on (conftest.py) turns the TMA path on: patched under the interpreter, on a GPU only with TMA.

# (id, N, H, W, C, ks, res_scale): four-row steps (3x3, C 16/32/64) and one-row steps (5x5);
# W 31 = three 14-wide tiles (the last 3 wide), H 9 = three 4-row tiles (the last 1 row).
CASES = [
    ("c16_k3_b3_9x31_scale", 3, 9, 31, 16, 3, 0.1),
    ("c32_k3_b1_13x15", 1, 13, 15, 32, 3, 1.0),
    ("c64_k3_b1_5x17_scale", 1, 5, 17, 64, 3, 0.1),
    ("c16_k5_b3_7x13_scale", 3, 7, 13, 16, 5, 0.1),
    ("c64_k5_b1_1x1", 1, 1, 1, 64, 5, 1.0),
]


@pytest.fixture
def launches(count_kernel_choice):
    """Counts of the TMA block's and the pointer block kernel's launches through resblock_nhwc."""
    return count_kernel_choice(resblock_mod, "resblock_nhwc_tma", resblock_mod._resblock_nhwc_kernel)


def _inputs(name: str, n: int, h: int, w: int, c: int, ks: int, dtype: torch.dtype):
    """Fresh seeded random x (N, H, W, C), weights (C, C, ks, ks) in `dtype`, fp32 biases (C,)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dev = TRITON_DEVICE
    x = torch.randn(n, h, w, c, generator=gen).to(dev, dtype)
    w1, w2 = ((torch.randn(c, c, ks, ks, generator=gen) / math.sqrt(c * ks * ks)).to(dev, dtype) for _ in range(2))
    b1, b2 = (0.5 * torch.randn(c, generator=gen).to(dev) for _ in range(2))
    return x, w1, b1, w2, b2


def _spec(x, w1, b1, w2, b2, res_scale, dtype):
    """The block by the eager reference in `dtype` (every op rounds to it, as eager would; the
    intermediate too), NHWC on the CPU."""
    x, w1, b1, w2, b2 = (t.cpu().to(dtype) for t in (x, w1, b1, w2, b2))
    xc = x.permute(0, 3, 1, 2)
    t = conv2d_ref(xc, w1, b1, relu=True)
    return conv2d_ref(t, w2, b2, res_scale=res_scale, skip=xc).permute(0, 2, 3, 1)


def _run(x, w1, b1, w2, b2, ks, res_scale):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    got = resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, ks, res_scale, out=out)
    assert got is out
    return out


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tma_block_parity(case, dtype_name, tma_on, launches):
    name, n, h, w, c, ks, res_scale = case
    dtype = DTYPES[dtype_name]
    x, w1, b1, w2, b2 = _inputs(f"{name}/{dtype_name}", n, h, w, c, ks, dtype)
    assert tma_block_supported(x, pack_weight(w1), pack_weight(w2), x, ks)
    out = _run(x, w1, b1, w2, b2, ks, res_scale)
    assert launches == {"tma": 1, "pointer": 0}, launches
    ref64 = _spec(x, w1, b1, w2, b2, res_scale, torch.float64)
    eager = _spec(x, w1, b1, w2, b2, res_scale, dtype)
    assert_parity(out.cpu(), ref64, eager, dtype, f"resblock_tma[{name}, {dtype_name}]")


# The interpreter's default form is the four-row one at 3x3; the other two forms the GPU's
# autotuner may pick (one row per step with resident or streamed weights) on two of the cases.
FORMS = {"resident": dict(RESIDENT_W=True, ROWS=1), "one_row_streamed": dict(RESIDENT_W=False, ROWS=1)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_tma_block_other_forms(case, form, tma_on, launches, monkeypatch):
    if TRITON_DEVICE != "cpu":
        pytest.skip("on a GPU the autotuner picks the form")
    from fastsr.kernels import resblock_tma as rt

    for k, v in FORMS[form].items():
        monkeypatch.setitem(rt._INTERPRET_CONFIG, k, v)
    name, n, h, w, c, ks, res_scale = case
    x, w1, b1, w2, b2 = _inputs(f"{name}/{form}", n, h, w, c, ks, torch.bfloat16)
    out = _run(x, w1, b1, w2, b2, ks, res_scale)
    assert launches == {"tma": 1, "pointer": 0}, launches
    assert_parity(out.cpu(), _spec(x, w1, b1, w2, b2, res_scale, torch.float64),
                  _spec(x, w1, b1, w2, b2, res_scale, torch.bfloat16), torch.bfloat16, f"resblock_tma[{name}, {form}]")


def test_tma_block_matches_pointer_kernel(tma_on, monkeypatch):
    """The same call on the two block kernels: both round the intermediate to bf16 at the same
    place, so they differ only by fp32 summation order (and where that flips an intermediate's
    rounding): a few bf16 ulps of the output at most, nowhere NaN."""
    x, w1, b1, w2, b2 = _inputs("same", 2, 6, 20, 32, 3, torch.bfloat16)
    tma = _run(x, w1, b1, w2, b2, 3, 0.5)
    monkeypatch.setattr(common, "_has_tma", lambda device: False)
    pointer = _run(x, w1, b1, w2, b2, 3, 0.5)
    ulp = pointer.float().abs().clamp_min(1.0) * 2.0**-7
    assert ((tma.float() - pointer.float()).abs() <= 4 * ulp).all()


@pytest.mark.parametrize("why, kw", [
    ("no TMA on the device", dict(tma=False)),
    ("fp32 keeps the pointer path (IEEE fp32 MMA)", dict(dtype=torch.float32)),
    ("C not a power of two", dict(c=24)),
    ("C above one K step", dict(c=128)),
])
def test_selection_falls_back_to_the_pointer_kernel(why, kw, tma_on, monkeypatch, launches):
    if not kw.get("tma", True):
        monkeypatch.setattr(common, "_has_tma", lambda device: False)
    dtype = kw.get("dtype", torch.bfloat16)
    x, w1, b1, w2, b2 = _inputs(why, 1, 3, 5, kw.get("c", 16), 3, dtype)
    out = _run(x, w1, b1, w2, b2, 3, 0.1)
    assert launches == {"tma": 0, "pointer": 1}, (why, launches)
    ref64 = _spec(x, w1, b1, w2, b2, 0.1, torch.float64)
    eager = None if dtype == torch.float32 else _spec(x, w1, b1, w2, b2, 0.1, dtype)
    assert_parity(out.cpu(), ref64, eager, dtype, why)  # fp32: the tight bound


def test_misaligned_out_falls_back_to_the_pointer_kernel(tma_on, launches):
    """An `out` view 2 bytes into its buffer cannot be a descriptor's base: the pointer kernel
    writes it (correctly) instead."""
    x, w1, b1, w2, b2 = _inputs("misaligned", 1, 3, 5, 16, 3, torch.bfloat16)
    buf = torch.full((x.numel() + 1,), float("nan"), dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    resblock_nhwc(x, pack_weight(w1), b1, pack_weight(w2), b2, 3, 1.0, out=out)
    assert launches == {"tma": 0, "pointer": 1}, launches
    assert_parity(out.cpu(), _spec(x, w1, b1, w2, b2, 1.0, torch.float64),
                  _spec(x, w1, b1, w2, b2, 1.0, torch.bfloat16), torch.bfloat16, "misaligned")


def test_autotune_prune():
    """Resident weights (both convs' taps unrolled) and four-row steps only for 3x3; every
    one-row streamed config kept."""
    from fastsr.kernels import resblock_tma as rt

    def one_row_streamed(cfgs):
        return sum(not c.kwargs["RESIDENT_W"] and c.kwargs["ROWS"] == 1 for c in cfgs)

    assert any(c.kwargs["ROWS"] == 4 for c in rt._CONFIGS)
    for ks, c, three_by_three in [(3, 64, True), (3, 16, True), (5, 64, False)]:
        kept = rt._prune(rt._CONFIGS, {}, KS=ks, C=c)
        assert any(k.kwargs["RESIDENT_W"] for k in kept) == three_by_three, (ks, c)
        assert any(k.kwargs["ROWS"] == 4 for k in kept) == three_by_three, (ks, c)
        assert one_row_streamed(kept) == one_row_streamed(rt._CONFIGS) > 0
