"""Parity and selection tests of the TMA conv (kernels/conv2d_tma.py).

On CPU the kernel runs under the Triton interpreter (tests/testenv.py sets TRITON_INTERPRET=1),
whose host-side TensorDescriptor zero-fills box elements outside the tensor, negative
coordinates included, as the copy engine does: so the border taps here exercise exactly the
zero padding the GPU gets from TMA. There `_common._has_tma` is patched to say yes: that is the
one switch `conv2d_nhwc` asks. Where a GPU is present the same tests run on it (TRITON_DEVICE),
through the autotuner, and skip on a GPU without TMA. Tolerances are tests/parity.py's (bf16/fp16: 2 x the eager
low-precision error + atol, against a float64 reference). Fresh seeded random inputs, outputs
NaN-poisoned before the call.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

import fastsr.kernels._common as common
import fastsr.kernels.conv2d as conv2d_mod
from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight
from fastsr.kernels.conv2d_tma import tma_conv_supported
from fastsr.ops.reference import conv2d_ref
from parity import assert_parity
from testenv import TRITON_DEVICE

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# (id, N, H, W, Cin, Cout, ks, epilogue). Widths above the interpreter's 32-pixel tile (partial
# last tile, several tiles per row); resident weights (Cin = 16/32/64, ks 1/3) and streamed ones
# (Cin = 128: two K chunks; ks 5); Cout 24 (a partial channel box) and 136 (three N blocks).
CASES = [
    ("c64_k3_b3_relu", 3, 5, 37, 64, 64, 3, dict(bias=True, relu=True)),
    ("c64_k3_scale_skip", 1, 13, 11, 64, 64, 3, dict(bias=True, res_scale=0.1, skip=True)),
    ("c16to32_k3_b3_all", 3, 5, 9, 16, 32, 3, dict(bias=True, relu=True, res_scale=0.5, skip=True)),
    ("c128to64_k3_relu_nobias", 1, 5, 7, 128, 64, 3, dict(relu=True)),
    ("c32to16_k5_skip", 1, 6, 9, 32, 16, 5, dict(bias=True, skip=True)),
    ("c16to24_k1_b3_relu", 3, 4, 5, 16, 24, 1, dict(bias=True, relu=True)),
    ("c32to136_k3_scale", 1, 3, 34, 32, 136, 3, dict(bias=True, res_scale=0.25)),
    ("c64_k3_1x1", 1, 1, 1, 64, 64, 3, dict(bias=True, skip=True)),
    # Rolling rows: two chunks of 7 and 6 rows per image and column strip (chunked as for the
    # interpreter's 8 programs), the halo rows at the chunk boundary read from the other chunk.
    ("c64_k3_b2_rows", 2, 13, 37, 64, 64, 3, dict(bias=True, relu=True, res_scale=0.5, skip=True)),
    # Narrow outputs (Cout not a multiple of 8: padded weight, pointer stores): the tail's
    # 64 -> 3, and 5 channels with every epilogue op; 12 channels on the streamed 5x5 form.
    ("c64to3_k3_tail", 1, 9, 40, 64, 3, 3, dict(bias=True)),
    ("c32to5_k3_b2_all", 2, 6, 9, 32, 5, 3, dict(bias=True, relu=True, res_scale=0.5, skip=True)),
    ("c16to12_k5_skip", 1, 5, 7, 16, 12, 5, dict(bias=True, skip=True)),
    # Pixel shuffle (the upsampler): 64-column blocks in shuffle order, pointer stores into the
    # upscaled output; x2 with 4 blocks on rolling rows (64 -> 256), x3 with 9 on the 5x5 form.
    ("c64to256_k3_r2", 1, 7, 37, 64, 256, 3, dict(bias=True, shuffle=2)),
    ("c16to576_k3_r3_relu", 2, 3, 5, 16, 576, 3, dict(bias=True, relu=True, shuffle=3)),
    ("c32to256_k5_r2_scale", 1, 4, 6, 32, 256, 5, dict(bias=True, res_scale=0.5, shuffle=2)),
]
# The 3x3 resident-weight cases, which the interpreter runs in the rolling-rows form: they are
# run in the one-row form too (test_tma_conv_one_row_form_parity).
ROLL_CASES = [c for c in CASES if c[6] == 3 and c[4] in (16, 32, 64) and "shuffle" not in c[7]]


@pytest.fixture
def launches(count_kernel_choice):
    """Counts of the TMA launcher's and the pointer kernel's launches through conv2d_nhwc."""
    return count_kernel_choice(conv2d_mod, "conv2d_nhwc_tma", conv2d_mod._conv2d_nhwc_kernel)


def _inputs(name, n, h, w, c_in, c_out, ks, opt, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dev = TRITON_DEVICE
    x = torch.randn(n, h, w, c_in, generator=gen).to(dev, dtype)
    weight = (torch.randn(c_out, c_in, ks, ks, generator=gen) / math.sqrt(c_in * ks * ks)).to(dev, dtype)
    bias = torch.randn(c_out, generator=gen).to(dev) if opt.get("bias") else None
    skip = torch.randn(n, h, w, c_out, generator=gen).to(dev, dtype) if opt.get("skip") else None
    return x, weight, bias, skip


def _spec(x, weight, bias, skip, relu, res_scale, dtype, shuffle=1):
    """conv2d_ref on NCHW in `dtype` (bias and skip rounded to it, as eager would), back to NHWC,
    on the CPU."""
    x, weight, bias, skip = (None if t is None else t.cpu() for t in (x, weight, bias, skip))
    y = conv2d_ref(x.to(dtype).permute(0, 3, 1, 2), weight.to(dtype), None if bias is None else bias.to(dtype),
                   relu=relu, res_scale=res_scale,
                   skip=None if skip is None else skip.to(dtype).permute(0, 3, 1, 2), shuffle=shuffle)
    return y.permute(0, 2, 3, 1)


@pytest.fixture
def small_shuffle_rows(monkeypatch):
    """Shuffle convs on the TMA path at the test images' widths (the GPU rule wants 128 px)."""
    from fastsr.kernels import conv2d_tma as ct

    monkeypatch.setattr(ct, "_SHUFFLE_MIN_W", 1)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tma_conv_parity(case, dtype_name, tma_on, launches, small_shuffle_rows):
    name, n, h, w, c_in, c_out, ks, opt = case
    dtype = DTYPES[dtype_name]
    x, weight, bias, skip = _inputs(f"{name}/{dtype_name}", n, h, w, c_in, c_out, ks, opt, dtype)
    relu, res_scale, r = opt.get("relu", False), opt.get("res_scale", 1.0), opt.get("shuffle", 1)
    out = torch.full((n, h * r, w * r, c_out // (r * r)), float("nan"), dtype=dtype, device=TRITON_DEVICE)
    wp = pack_weight(weight, r)
    assert tma_conv_supported(x, wp, out, ks, shuffle=r, skip=skip)
    got = conv2d_nhwc(x, wp, bias, ks, relu=relu, res_scale=res_scale, skip=skip, shuffle=r, out=out)
    assert got is out
    assert launches == {"tma": 1, "pointer": 0}, launches
    ref64 = _spec(x, weight, bias, skip, relu, res_scale, torch.float64, r)
    eager = _spec(x, weight, bias, skip, relu, res_scale, dtype, r)
    assert_parity(out.cpu(), ref64, eager, dtype, f"conv2d_tma[{name}, {dtype_name}]")


@pytest.fixture
def tma_forms(monkeypatch):
    """The ROLL_ROWS flag of every TMA conv launch (the interpreter launches the kernel directly)."""
    from fastsr.kernels import conv2d_tma as ct

    seen, real = [], ct._conv2d_tma_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["ROLL_ROWS"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ct, "_conv2d_tma_kernel", Spy())
    return seen


@pytest.mark.parametrize("case", ROLL_CASES, ids=[c[0] for c in ROLL_CASES])
def test_tma_conv_one_row_form_parity(case, tma_on, tma_forms, monkeypatch):
    """The one-row resident form (what the GPU's autotuner may still pick) on the cases the
    interpreter otherwise runs with rolling rows; and that those do run rolling rows."""
    from fastsr.kernels import conv2d_tma as ct

    name, n, h, w, c_in, c_out, ks, opt = case
    dtype = torch.bfloat16
    x, weight, bias, skip = _inputs(f"{name}/one-row", n, h, w, c_in, c_out, ks, opt, dtype)
    relu, res_scale = opt.get("relu", False), opt.get("res_scale", 1.0)
    results = {}
    for roll in (True, False):
        monkeypatch.setattr(ct, "_INTERPRET_ROLL", roll)
        out = torch.full((n, h, w, c_out), float("nan"), dtype=dtype, device=TRITON_DEVICE)
        results[roll] = conv2d_nhwc(x, pack_weight(weight), bias, ks, relu=relu, res_scale=res_scale, skip=skip,
                                    out=out)
    assert tma_forms == [True, False]
    ref64 = _spec(x, weight, bias, skip, relu, res_scale, torch.float64)
    eager = _spec(x, weight, bias, skip, relu, res_scale, dtype)
    assert_parity(results[False].cpu(), ref64, eager, dtype, f"conv2d_tma one-row[{name}]")
    # The two forms sum the same fp32 products in other orders: one bf16 ulp apart at most.
    ulp = results[False].float().abs().clamp_min(2.0**-126) * 2.0**-7
    assert ((results[True].float() - results[False].float()).abs() <= ulp).all()


def test_row_chunking_gives_every_program_an_item():
    from fastsr.kernels.conv2d_tma import row_chunking

    assert row_chunking(540, 540, 960, 132, 64) == (15, 8, 68)  # 120 items, one per program
    assert row_chunking(540, 540, 960, 132, 128) == (8, 16, 34)  # 128 items
    assert row_chunking(16 * 48, 48, 48, 132, 64) == (1, 8, 6)  # training patches: 128 items
    assert row_chunking(1, 1, 5, 132, 64) == (1, 1, 1)
    for rows, h, w, programs, bm in [(540, 540, 960, 132, 64), (26, 13, 37, 8, 32), (13, 13, 11, 8, 32),
                                     (3000, 3000, 7, 132, 64)]:
        strips, chunks, chunk_rows = row_chunking(rows, h, w, programs, bm)
        assert (chunks - 1) * chunk_rows < h <= chunks * chunk_rows  # every row in one chunk, none empty


def test_tma_conv_matches_pointer_kernel(tma_on, monkeypatch):
    """The same call on the two paths: equal up to the fp32 summation order, before rounding."""
    x, weight, bias, skip = _inputs("same", 2, 6, 35, 64, 64, 3, dict(bias=True, skip=True), torch.bfloat16)
    args = (x, pack_weight(weight), bias, 3)
    kw = dict(relu=True, res_scale=0.5, skip=skip)
    tma = conv2d_nhwc(*args, **kw)
    monkeypatch.setattr(common, "_has_tma", lambda device: False)
    pointer = conv2d_nhwc(*args, **kw)
    # One bf16 ulp of the output at most (the two sum the same fp32 products in other orders).
    ulp = pointer.float().abs().clamp_min(2.0**-126) * 2.0**-7
    assert ((tma.float() - pointer.float()).abs() <= ulp).all()


@pytest.mark.parametrize("why, kw", [
    ("no TMA on the device", dict(tma=False)),
    ("fp32 keeps the pointer path (IEEE fp32 MMA)", dict(dtype=torch.float32)),
    ("input shift (the head)", dict(shift=True)),
    ("pixel shuffle with Cout not a multiple of 64", dict(c_out=32, shuffle=2)),
    ("pixel shuffle on rows narrower than 128 px", dict(c_out=64, shuffle=2)),
    ("Cout not a multiple of 8 and wider than one N tile", dict(c_out=130)),
    ("Cin not a multiple of its K step", dict(c_in=24)),
])
def test_selection_falls_back_to_the_pointer_kernel(why, kw, tma_on, monkeypatch, launches):
    if not kw.get("tma", True):
        monkeypatch.setattr(common, "_has_tma", lambda device: False)
    dtype = kw.get("dtype", torch.bfloat16)
    c_in, c_out, r = kw.get("c_in", 16), kw.get("c_out", 16), kw.get("shuffle", 1)
    x, weight, bias, _ = _inputs(why, 1, 3, 5, c_in, c_out, 3, dict(bias=True), dtype)
    shift = torch.randn(c_in).to(TRITON_DEVICE) if kw.get("shift") else None
    out = conv2d_nhwc(x, pack_weight(weight), bias, 3, in_shift=shift, shuffle=r)
    assert launches == {"tma": 0, "pointer": 1}, (why, launches)
    assert torch.isfinite(out).all()


def test_misaligned_out_falls_back_to_the_pointer_kernel(tma_on, launches):
    """A descriptor needs a 16-byte-aligned base: an `out` view 2 bytes into its buffer is
    written by the pointer kernel (correctly), not rejected."""
    x, weight, bias, _ = _inputs("misaligned", 1, 3, 5, 16, 16, 3, dict(bias=True), torch.bfloat16)
    buf = torch.full((3 * 5 * 16 + 1,), float("nan"), dtype=torch.bfloat16, device=TRITON_DEVICE)
    out = buf[1:].view(1, 3, 5, 16)
    conv2d_nhwc(x, pack_weight(weight), bias, 3, out=out)
    assert launches == {"tma": 0, "pointer": 1}, launches
    ref64 = _spec(x, weight, bias, None, False, 1.0, torch.float64)
    assert_parity(out.cpu(), ref64, _spec(x, weight, bias, None, False, 1.0, torch.bfloat16), torch.bfloat16,
                  "misaligned")


def test_autotune_prune_and_boxes():
    """What the GPU's autotuner does with the configs (the interpreter never tunes): resident
    weights only for one K chunk and KS 1/3; each config's pre-hook re-boxes A and out for its
    BLOCK_M and leaves the weight box alone."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fastsr.kernels import conv2d_tma as ct

    cfgs = ct._tma_configs()
    assert any(c.kwargs["RESIDENT_W"] for c in cfgs)
    assert all(c.kwargs["RESIDENT_W"] for c in cfgs if c.kwargs["ROLL_ROWS"])  # rolling rows need them
    for ks, c_in, block_k, resident, roll in [(3, 64, 64, True, True), (1, 16, 16, True, False),
                                              (5, 64, 64, False, False), (3, 128, 64, False, False)]:
        kept = ct._prune(cfgs, {}, KS=ks, C_IN=c_in, BLOCK_K=block_k, HAS_SKIP=True, BLOCK_N=64)
        assert kept and any(c.kwargs["RESIDENT_W"] for c in kept) == resident, (ks, c_in)
        assert any(c.kwargs["ROLL_ROWS"] for c in kept) == roll, (ks, c_in)
        assert sum(not c.kwargs["RESIDENT_W"] for c in kept) == sum(not c.kwargs["RESIDENT_W"] for c in cfgs)
        # With a skip, rolling rows only on two warpgroups (one would spill); without, both.
        assert not any(c.kwargs["ROLL_ROWS"] and c.num_warps == 4 for c in kept)
        no_skip = ct._prune(cfgs, {}, KS=ks, C_IN=c_in, BLOCK_K=block_k, HAS_SKIP=False, BLOCK_N=64)
        assert any(c.kwargs["ROLL_ROWS"] and c.num_warps == 4 for c in no_skip) == roll
        assert not any(c.kwargs["ROLL_ROWS"] and c.kwargs["BLOCK_M"] == 256 for c in no_skip)  # narrow N only
    tail = ct._prune(cfgs, {}, KS=3, C_IN=64, BLOCK_K=64, HAS_SKIP=False, BLOCK_N=16)
    assert {(c.kwargs["BLOCK_M"], c.num_warps) for c in tail if c.kwargs["ROLL_ROWS"]} == {(64, 4), (128, 8), (256, 8)}
    x = torch.empty(1, 4, 300, 64, dtype=torch.bfloat16)
    wp = torch.empty(9 * 64, 64, dtype=torch.bfloat16)
    nargs = dict(x_desc=TensorDescriptor.from_tensor(x, [1, 1, 32, 64]),
                 out_desc=TensorDescriptor.from_tensor(x, [1, 1, 32, 64]),
                 w_desc=TensorDescriptor.from_tensor(wp, [64, 64]))
    for c in cfgs:
        c.pre_hook({**nargs, **c.kwargs})
        bm = c.kwargs["BLOCK_M"]
        assert nargs["x_desc"].block_shape == [1, 1, bm, 64] and nargs["out_desc"].block_shape == [1, 1, bm, 64]
        assert nargs["w_desc"].block_shape == [64, 64]


def test_has_tma_reads_the_capability():
    """The one capability test: CPU tensors never; a CUDA device by compute capability >= 9."""
    assert not common._has_tma(torch.device("cpu"))
    if torch.cuda.is_available():
        assert common._has_tma(torch.device("cuda")) == (torch.cuda.get_device_capability()[0] >= 9)
