"""Gradients of the fused ops: the Triton backward kernels (kernels/conv2d_{dgrad,wgrad,backward}.py, resblock_backward.py) and the
autograd of fastsr::conv2d / fastsr::resblock on the "triton" backend.

The specification is eager autograd through fastsr.ops.reference, in float64 on the same
(already rounded) input values. Tolerances, as in tests/test_kernels.py:
- float32: max |fused - ref64| <= 1e-4 * max(1, max |ref64|)  (no TF32 in the kernels);
- float16 / bfloat16 (flash-attention's bound): max |fused - ref64| <= 2 * max |eager - ref64|
  + 1e-5 * max(1, max |ref64|), where `eager` is eager autograd in the low-precision dtype.
Inputs and output gradients are fresh seeded torch.randn values; every gradient the launchers
write is a NaN-poisoned `out` tensor, so an element they forget fails the test.

The Triton kernels do not support float64, so `torch.autograd.gradcheck` (which needs it)
checks the ops on the "cpu" backend in float64, and the Triton backward is held to eager
autograd in float32 with the tight bound above (plus the float64-reference tests below).
On CPU the kernels run under the Triton interpreter (tests/conftest.py): shapes stay tiny and
the cases are picked to cover every epilogue, channel count and size, not multiplied out.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import fastsr
from testenv import TRITON_DEVICE
from fastsr.memory import activation_bytes
from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc
from fastsr.kernels.conv2d_dgrad import pack_weight_dgrad
from fastsr.kernels.conv2d_wgrad import _num_splits, conv2d_wgrad_nhwc
from fastsr.kernels.resblock_backward import resblock_backward_nhwc
from fastsr.ops.conv2d import backward_request, conv2d, conv2d_backward_op, conv2d_op
from fastsr.ops.resblock import resblock, resblock_backward_op, resblock_op
from fastsr.ops.dispatch import unsupported_reasons
from fastsr.ops.reference import conv2d_ref, resblock_ref
from parity import assert_parity

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _needs_triton():
    reasons = unsupported_reasons("triton", torch.zeros(1))
    if reasons:
        pytest.skip("; ".join(reasons))


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _weight(gen, c_out, c_in, ks):
    return _randn(gen, c_out, c_in, ks, ks, scale=1.0 / math.sqrt(c_in * ks * ks))


def _nan(shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).contiguous()


def _autograd(fn, inputs, grad_out, dtype):
    """Eager gradients of fn(*inputs) in `dtype` w.r.t. every non-None input (None for the rest)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(out, wrt, grad_out.to(dtype)))
    return [None if t is None else next(got) for t in leaves]


# --------------------------------------------------------------------------------------
# conv2d_backward_nhwc against float64 autograd
# --------------------------------------------------------------------------------------

# (id, N, H, W, Cin, Cout, ks, options, dtype). Channel counts 3 / 16 / 64 and odd 17; spatial
# 1x1, 7x9 and 13x11 (prime, non-square); batch 1 and 3; every epilogue the backward sees:
# ReLU (prologue mask), res_scale (skip's gradient is the op layer's), in_shift, shuffle 2 and 3.
CONV_CASES = [
    ("head_3to16_shift", 1, 13, 11, 3, 16, 3, dict(shift=True, image=True), "fp32"),
    ("head_3to64_shift_bf16", 3, 7, 9, 3, 64, 3, dict(shift=True, image=True), "bf16"),
    ("relu_16_b3", 3, 7, 9, 16, 16, 3, dict(relu=True), "fp32"),
    ("relu_scale_64_fp16", 1, 7, 9, 64, 64, 3, dict(relu=True, res_scale=0.1), "fp16"),
    ("scale_64", 1, 13, 11, 64, 64, 3, dict(res_scale=0.1), "fp32"),
    ("tail_64to3", 1, 7, 9, 64, 3, 3, dict(), "bf16"),
    ("shuffle2_16to64", 1, 13, 11, 16, 64, 3, dict(shuffle=2), "fp32"),
    ("shuffle2_17to68_relu_b3_1x1", 3, 1, 1, 17, 68, 3, dict(shuffle=2, relu=True), "fp32"),
    ("shuffle2_16to64_bf16", 3, 7, 9, 16, 64, 3, dict(shuffle=2), "bf16"),
    ("shuffle3_16to144", 1, 7, 9, 16, 144, 3, dict(shuffle=3), "fp32"),
    ("shuffle3_3to27_fp16", 3, 7, 9, 3, 27, 3, dict(shuffle=3, relu=True), "fp16"),
    ("odd17_k5_relu_scale_shift", 1, 13, 11, 17, 17, 5, dict(relu=True, res_scale=0.1, shift=True), "fp32"),
    ("k1_64to3_b3", 3, 7, 9, 64, 3, 1, dict(shift=True), "fp32"),
    ("k5_16_1x1_nobias", 1, 1, 1, 16, 16, 5, dict(relu=True, nobias=True), "bf16"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d_backward_parity(case):
    name, n, h, w, c_in, c_out, ks, opt, dtype_name = case
    dtype = DTYPES[dtype_name]
    gen = _gen(name)
    if opt.get("image"):
        x = torch.rand(n, c_in, h, w, generator=gen) * 255
        shift = torch.tensor(DIV2K_MEAN) * 255
    else:
        x = _randn(gen, n, c_in, h, w)
        shift = _randn(gen, c_in) if opt.get("shift") else None
    weight = _weight(gen, c_out, c_in, ks)
    bias = None if opt.get("nobias") else _randn(gen, c_out)
    relu, res_scale, r = opt.get("relu", False), opt.get("res_scale", 1.0), opt.get("shuffle", 1)
    g = _randn(gen, n, c_out // (r * r), h * r, w * r)
    x, weight, g = x.to(dtype), weight.to(dtype), g.to(dtype)  # the values both sides see

    outs = dict(dx_out=_nan((n, h, w, c_in), dtype), dw_out=_nan(weight.shape, dtype),
                db_out=None if bias is None else _nan((c_out,), torch.float32))
    dx, dw, db = conv2d_backward_nhwc(
        _nhwc(g), _nhwc(x), weight, bias, ks, in_shift=shift, relu=relu, res_scale=res_scale, shuffle=r,
        needs=(True, True, bias is not None), **outs)
    assert dx is outs["dx_out"] and dw is outs["dw_out"] and db is outs["db_out"]

    def spec(x_, w_, b_):
        s_ = None if shift is None else shift.to(x_.dtype)
        return conv2d_ref(x_, w_, b_, in_shift=s_, relu=relu, res_scale=res_scale, shuffle=r)

    ref64 = _autograd(spec, (x, weight, bias), g, torch.float64)
    eager = [None] * 3 if dtype == torch.float32 else _autograd(spec, (x, weight, bias), g, dtype)
    what = f"conv2d backward [{name}]"
    assert_parity(dx, _nhwc(ref64[0]), None if eager[0] is None else _nhwc(eager[0]), dtype, what + " dx")
    assert_parity(dw, ref64[1], eager[1], dtype, what + " dW")
    if bias is not None:
        # db is produced in fp32 (the bias's dtype): bound it like an fp32 result of dtype inputs.
        assert_parity(db.to(dtype) if dtype != torch.float32 else db, ref64[2], eager[2], dtype, what + " db")
        assert db.dtype == torch.float32


# conv2d_wgrad_nhwc's pixel walk: each split is a range of image rows (flat over the batch),
# stepped as row segments of BLOCK_P pixels (16 under the interpreter), with (row, image)
# advanced by compares, not division. Widths 37 / 19 / 33 / 21 / 18 give several segments and a
# partial last one; 16 exactly one; heights 3-7 at batch 3 put split boundaries and image
# boundaries inside one program's range. Per-tap k-blocks (Cin >= 16: 3 taps of a kernel row at
# 3x3, 1 tap at 5x5 and 1x1) and the head's all-rows block (Cin = 3); shuffle 2 and 3, in_shift,
# grad_mask, a narrow (padded) gradient. (id, N, H, W, Cin, Cout, ks, r, shift, mask, dtype)
WGRAD_CASES = [
    ("w37_b3_mask", 3, 5, 37, 16, 16, 3, 1, False, True, "fp32"),
    ("w16_b1_shift_cin17", 1, 7, 16, 17, 16, 3, 1, True, False, "fp32"),
    ("w19_b3_r2_mask_bf16", 3, 3, 19, 16, 64, 3, 2, False, True, "bf16"),
    ("w17_r3_fp16", 1, 4, 17, 16, 36, 3, 3, False, False, "fp16"),
    ("head_3to64_w33_b3_shift", 3, 3, 33, 3, 64, 3, 1, True, False, "fp32"),
    ("tail_64to3_w21_bf16", 1, 6, 21, 64, 3, 3, 1, False, False, "bf16"),
    # A narrow gradient (Cout < BLOCK_Q, no shuffle) is read from its padded copy, the mask
    # applied in the copy: the tail with a mask at batch 3, and an odd Cout at 5x5.
    ("tail_64to3_w23_b3_mask", 3, 4, 23, 64, 3, 3, 1, False, True, "fp32"),
    ("narrow_16to5_k5_b3_mask_fp16", 3, 4, 18, 16, 5, 5, 1, False, True, "fp16"),
    ("k5_w18_b3_shift_mask", 3, 4, 18, 16, 16, 5, 1, True, True, "fp32"),
    ("k1_w20_b3_r2", 3, 3, 20, 16, 32, 1, 2, False, False, "fp32"),
]


@pytest.mark.parametrize("case", WGRAD_CASES, ids=[c[0] for c in WGRAD_CASES])
def test_wgrad_row_walk_parity(case):
    name, n, h, w, c_in, c_out, ks, r, has_shift, has_mask, dtype_name = case
    dtype = DTYPES[dtype_name]
    gen = _gen(name)
    x = _randn(gen, n, c_in, h, w).to(dtype)
    g = _randn(gen, n, c_out // (r * r), h * r, w * r).to(dtype)
    shift = _randn(gen, c_in) if has_shift else None
    mask = (torch.rand(g.shape, generator=gen) > 0.4).to(dtype) if has_mask else None
    assert _num_splits(n * h, 1, torch.device("cpu"), w)[0] > 1  # split boundaries inside the batch
    outs = dict(dw_out=_nan((c_out, c_in, ks, ks), dtype), db_out=_nan((c_out,), torch.float32))
    args = (_nhwc(x), _nhwc(g), ks)
    kw = dict(shuffle=r, res_scale=0.5, in_shift=shift, grad_mask=None if mask is None else _nhwc(mask))
    dw, db = conv2d_wgrad_nhwc(*args, **kw, **outs)
    assert dw is outs["dw_out"] and db is outs["db_out"]
    again = conv2d_wgrad_nhwc(*args, **kw)
    assert torch.equal(again[0], dw) and torch.equal(again[1], db)  # bitwise: fixed splits and order

    weight = torch.zeros(c_out, c_in, ks, ks)  # wgrad does not read the weight's values
    gz = g if mask is None else g * (mask != 0).to(dtype)

    def spec(w_, b_):
        s_ = None if shift is None else shift.to(w_.dtype)
        return conv2d_ref(x.to(w_.dtype), w_, b_, in_shift=s_, res_scale=0.5, shuffle=r)

    ref64 = _autograd(spec, (weight, torch.zeros(c_out)), gz, torch.float64)
    eager = [None] * 2 if dtype == torch.float32 else _autograd(spec, (weight, torch.zeros(c_out)), gz, dtype)
    assert_parity(dw, ref64[0], eager[0], dtype, f"wgrad [{name}] dW")
    assert_parity(db.to(dtype) if dtype != torch.float32 else db, ref64[1], eager[1], dtype, f"wgrad [{name}] db")


# --------------------------------------------------------------------------------------
# resblock_backward_nhwc against float64 autograd
# --------------------------------------------------------------------------------------

# (id, N, H, W, C, ks, res_scale, dtype): 3x3 and 5x5, res_scale 1 and 0.1, C 3 / 16 / 64 / 17,
# spatial 1x1, 7x9, 13x11, batch 1 and 3.
BLOCK_CASES = [
    ("c16_k3_13x11", 1, 13, 11, 16, 3, 1.0, "fp32"),
    ("c17_k3_b3_7x9_rs", 3, 7, 9, 17, 3, 0.1, "fp32"),
    ("c17_k3_b3_7x9_rs_bf16", 3, 7, 9, 17, 3, 0.1, "bf16"),
    ("c64_k3_7x9_rs", 1, 7, 9, 64, 3, 0.1, "fp32"),
    ("c64_k3_7x9_fp16", 1, 7, 9, 64, 3, 1.0, "fp16"),
    ("c16_k5_b3_1x1_rs", 3, 1, 1, 16, 5, 0.1, "fp32"),
    ("c3_k5_13x11", 1, 13, 11, 3, 5, 1.0, "fp32"),
    ("c16_k5_7x9_rs_bf16", 1, 7, 9, 16, 5, 0.1, "bf16"),
]


def _block_inputs(gen, n, h, w, c, ks):
    x = _randn(gen, n, c, h, w)
    w1, w2 = _weight(gen, c, c, ks), _weight(gen, c, c, ks)
    b1, b2 = _randn(gen, c, scale=0.5), _randn(gen, c, scale=0.5)
    return x, w1, b1, w2, b2


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[c[0] for c in BLOCK_CASES])
def test_resblock_backward_parity(case):
    name, n, h, w, c, ks, res_scale, dtype_name = case
    dtype = DTYPES[dtype_name]
    gen = _gen(name)
    x, w1, b1, w2, b2 = _block_inputs(gen, n, h, w, c, ks)
    g = _randn(gen, n, c, h, w)
    x, w1, w2, g = x.to(dtype), w1.to(dtype), w2.to(dtype), g.to(dtype)

    outs = dict(dx_out=_nan((n, h, w, c), dtype), dw1_out=_nan(w1.shape, dtype), db1_out=_nan((c,), torch.float32),
                dw2_out=_nan(w2.shape, dtype), db2_out=_nan((c,), torch.float32))
    got = resblock_backward_nhwc(_nhwc(g), _nhwc(x), w1, b1, w2, ks, res_scale, **outs)
    assert all(a is b for a, b in zip(got, outs.values()))

    def spec(x_, w1_, b1_, w2_, b2_):
        return resblock_ref(x_, w1_, b1_, w2_, b2_, res_scale)

    ins = (x, w1, b1, w2, b2)
    ref64 = _autograd(spec, ins, g, torch.float64)
    eager = [None] * 5 if dtype == torch.float32 else _autograd(spec, ins, g, dtype)
    for i, what in enumerate(("dx", "dW1", "db1", "dW2", "db2")):
        fused, ref, eag = got[i], ref64[i], eager[i]
        if i == 0:
            ref, eag = _nhwc(ref), None if eag is None else _nhwc(eag)
        if fused.dtype != dtype:  # the fp32 bias gradients
            fused = fused.to(dtype)
        assert_parity(fused, ref, eag, dtype, f"resblock backward [{name}] {what}")


def test_backward_launchers_reject_bad_inputs():
    x = torch.randn(1, 4, 5, 8)
    w = torch.randn(16, 8, 3, 3)
    g = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        conv2d_backward_nhwc(g[..., :8].contiguous(), x, w, None, 3)
    with pytest.raises(TypeError, match="grad_out must have x's dtype"):
        conv2d_backward_nhwc(g.half(), x, w, None, 3)
    with pytest.raises(TypeError, match="weight must have x's dtype"):
        conv2d_backward_nhwc(g, x, w.half(), None, 3)
    with pytest.raises(ValueError, match="weight expects Cin=8 but x has 4"):
        conv2d_backward_nhwc(g, x[..., :4].contiguous(), w, None, 3)
    with pytest.raises(ValueError, match="divisible by 9"):
        conv2d_backward_nhwc(g, x, w, None, 3, shuffle=3)
    with pytest.raises(ValueError, match="dw_out must have shape"):
        conv2d_backward_nhwc(g, x, w, None, 3, dw_out=torch.empty(16, 8, 1, 1))
    with pytest.raises(ValueError, match="x must be a contiguous"):
        conv2d_backward_nhwc(g, x.transpose(1, 2), w, None, 3)
    with pytest.raises(ValueError, match="grad_out must be"):
        resblock_backward_nhwc(g, x, w[:8], None, w[:8], 3)


# --------------------------------------------------------------------------------------
# The registered ops' autograd on the triton backend
# --------------------------------------------------------------------------------------


def test_backward_follows_a_forced_forward_and_is_its_own_choice_otherwise():
    from fastsr.ops import dispatch

    assert backward_request(None) == "auto"  # measured separately from the forward
    assert backward_request("triton") == backward_request("triton_block") == "triton"
    x, w = torch.zeros(1, 8, 4, 4), torch.zeros(8, 8, 3, 3)
    sig = dispatch.Signature.of("conv2d_backward", x, w)
    assert dispatch.choose("conv2d_backward", sig, "cpu").name == "aten"  # the cpu forward's gradients
    assert dispatch.choose("conv2d_backward", sig, None).name == "aten"   # auto on CPU: never the interpreter
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert dispatch.choose("conv2d_backward", sig, "triton").name == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        backward_request("cudnn")


OP_EPILOGUES = [
    ("relu", 16, dict(relu=True)),
    ("scale_skip", 16, dict(res_scale=0.1, skip=True)),
    ("relu_scale_skip_shift", 16, dict(relu=True, res_scale=0.5, skip=True, in_shift=True)),
    ("shuffle2", 32, dict(shuffle=2)),
    ("shuffle3_relu", 18, dict(shuffle=3, relu=True)),
]


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("name,cout,epi", OP_EPILOGUES, ids=[e[0] for e in OP_EPILOGUES])
def test_conv2d_op_grads_match_eager_fp32(name, cout, epi, backend):
    """Every input's gradient (x, weight, bias, in_shift, skip) through autograd, fp32, tight."""
    gen = _gen(name)
    n, cin, h, w = 2, 8, 5, 7
    r = epi.get("shuffle", 1)
    x = _randn(gen, n, cin, h, w).contiguous(memory_format=CL)
    wt, b = _weight(gen, cout, cin, 3), _randn(gen, cout)
    skip = _randn(gen, n, cout, h, w) if epi.get("skip") else None
    shift = _randn(gen, cin) if epi.get("in_shift") else None
    g = _randn(gen, n, cout // (r * r), h * r, w * r)
    kw = dict(relu=epi.get("relu", False), res_scale=epi.get("res_scale", 1.0), shuffle=r)
    ins = (x, wt, b, shift, skip)
    got = _autograd(lambda x_, w_, b_, s_, k_: conv2d(x_, w_, b_, in_shift=s_, skip=k_, backend=backend, **kw),
                    ins, g, torch.float32)
    ref = _autograd(lambda x_, w_, b_, s_, k_: conv2d_ref(x_, w_, b_, in_shift=s_, skip=k_, **kw),
                    ins, g, torch.float32)
    for what, a, e in zip(("x", "weight", "bias", "in_shift", "skip"), got, ref):
        if e is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, what
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{what}: {m}")


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_op_grads_in_bf16_keep_parameter_dtypes(backend):
    """bf16 activations with fp32 master weights/bias: gradients come back in each input's dtype."""
    gen = _gen("bf16_params")
    x = _randn(gen, 1, 16, 5, 6).to(torch.bfloat16).requires_grad_()
    w1, b1, w2, b2 = (t.requires_grad_() for t in (_weight(gen, 16, 16, 3), _randn(gen, 16),
                                                    _weight(gen, 16, 16, 3), _randn(gen, 16)))
    resblock(x, w1, b1, w2, b2, 0.1, backend=backend).float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.float32 and b2.grad.dtype == torch.float32
    assert all(torch.isfinite(t.grad).all() for t in (x, w1, b1, w2, b2))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("ks,res_scale", [(3, 1.0), (5, 0.1)])
def test_resblock_op_grads_match_eager_fp32(ks, res_scale, backend):
    gen = _gen(f"block_op_{ks}")
    ins = _block_inputs(gen, 2, 5, 7, 8, ks)
    g = _randn(gen, 2, 8, 5, 7)
    got = _autograd(lambda *t: resblock(*t, res_scale, backend=backend), ins, g, torch.float32)
    ref = _autograd(lambda *t: resblock_ref(*t, res_scale), ins, g, torch.float32)
    for what, a, e in zip(("x", "w1", "b1", "w2", "b2"), got, ref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{what}: {m}")


def test_gradcheck_float64_on_the_cpu_backend():
    """gradcheck needs float64, which the Triton kernels do not take: the ops' autograd wiring is
    gradchecked on the "cpu" backend; the Triton backward is held to eager in fp32 above."""
    gen = _gen("gradcheck")
    d = torch.float64
    x = _randn(gen, 1, 3, 4, 5).to(d).requires_grad_()
    w = _weight(gen, 8, 3, 3).to(d).requires_grad_()
    b = _randn(gen, 8).to(d).requires_grad_()
    s = _randn(gen, 3).to(d).requires_grad_()
    skip = _randn(gen, 1, 8, 4, 5).to(d).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b, s, k: conv2d(x, w, b, in_shift=s, relu=True, res_scale=0.3, skip=k, backend="cpu"),
        (x, w, b, s, skip))
    # Without ReLU the gradients come from aten.convolution_backward directly.
    assert torch.autograd.gradcheck(
        lambda x, w, b, s, k: conv2d(x, w, b, in_shift=s, res_scale=0.3, skip=k, backend="cpu"),
        (x, w, b, s, skip))
    w4 = _weight(gen, 8, 3, 3).to(d).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d(x, w, b, shuffle=2, backend="cpu"), (x, w4, b))
    c = 4
    blk = [t.to(d).requires_grad_() for t in _block_inputs(gen, 1, 3, 4, c, 3)]
    assert torch.autograd.gradcheck(lambda *t: resblock(*t, 0.1, backend="cpu"), blk)


def test_opcheck_triton_autograd():
    gen = _gen("opcheck")
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    x = _randn(gen, 1, 4, 3, 5).contiguous(memory_format=CL).requires_grad_()
    w = _weight(gen, 16, 4, 3).requires_grad_()
    b = _randn(gen, 16).requires_grad_()
    s = _randn(gen, 4).requires_grad_()
    torch.library.opcheck(conv2d_op, (x, w, b, s, None, True, 0.5, 2, "triton_conv", "triton"), test_utils=tests)
    blk = [t.requires_grad_() for t in _block_inputs(gen, 1, 3, 5, 4, 3)]
    torch.library.opcheck(resblock_op, (*blk, 0.1, "triton_block", "triton"), test_utils=tests)
    # The backward ops themselves (called by the autograd formulas above).
    g = _randn(gen, 1, 4, 6, 10).contiguous(memory_format=CL)
    fwd = ("test_schema", "test_faketensor")
    args = (g, x.detach(), w.detach(), b.detach(), s.detach(), True, 0.5, 2, True, True, True)
    torch.library.opcheck(conv2d_backward_op, args, test_utils=fwd)
    bx, bw1, bb1, bw2, _ = (t.detach() for t in blk)
    torch.library.opcheck(resblock_backward_op, (bx.contiguous(memory_format=CL), bx, bw1, bb1, bw2, 0.1,
                                                 True, True, True, True, True), test_utils=fwd)


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------


def test_triton_backward_is_bitwise_deterministic():
    gen = _gen("determinism")
    n, h, w, cin, cout = 3, 7, 9, 16, 64
    assert _num_splits(n * h, 2, torch.device("cpu"), w)[0] > 1  # the split-K path is exercised
    x, wt, b = _randn(gen, n, h, w, cin), _weight(gen, cout, cin, 3), _randn(gen, cout)
    g = _randn(gen, n, 2 * h, 2 * w, cout // 4)
    kw = dict(in_shift=_randn(gen, cin), relu=True, res_scale=0.5, shuffle=2)
    first = conv2d_backward_nhwc(g, x, wt, b, 3, **kw)
    second = conv2d_backward_nhwc(g, x, wt, b, 3, **kw)
    assert all(torch.equal(a, c) for a, c in zip(first, second))
    bx, w1, b1, w2, _ = _block_inputs(gen, n, h, w, cin, 3)
    bx, bg = _nhwc(bx), _randn(gen, n, h, w, cin)
    first = resblock_backward_nhwc(bg, bx, w1, b1, w2, 3, 0.1)
    second = resblock_backward_nhwc(bg, bx, w1, b1, w2, 3, 0.1)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


_GRADS_SCRIPT = """
import hashlib, torch
from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc
torch.use_deterministic_algorithms(True)
g = torch.Generator().manual_seed(7)
x = torch.randn(4, 48, 40, 64, generator=g).cuda()
w = (torch.randn(256, 64, 3, 3, generator=g) * 0.05).cuda()
b = torch.randn(256, generator=g).cuda()
go = torch.randn(4, 96, 80, 64, generator=g).cuda()
dx, dw, db = conv2d_backward_nhwc(go, x, w, b, 3, shuffle=2)
print(hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for t in (dx, dw, db))).hexdigest())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning runs on a GPU only")
def test_deterministic_mode_gives_bitwise_equal_gradients_across_processes():
    """Each process autotunes afresh and may pick another config; with deterministic
    algorithms on, the wgrad kernel's pinned config makes the gradients' bits the same."""
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", _GRADS_SCRIPT], capture_output=True, text=True,
                              check=True, timeout=300).stdout.strip() for _ in range(2)}
    assert len(digests) == 1, digests


def test_pack_weight_dgrad_layout():
    gen = _gen("pack_dgrad")
    c_out, c_in, ks, r = 8, 3, 3, 2
    weight = _randn(gen, c_out, c_in, ks, ks)
    packed = pack_weight_dgrad(weight, r)
    assert packed.shape == (ks * ks * c_out, c_in) and packed.is_contiguous()
    c_sh = c_out // (r * r)
    for kh in range(ks):
        for kw in range(ks):
            for q in range(c_out):
                co = (q % c_sh) * r * r + q // c_sh
                assert torch.equal(packed[(kh * ks + kw) * c_out + q], weight[co, :, ks - 1 - kh, ks - 1 - kw])


# --------------------------------------------------------------------------------------
# Training parity and activation memory
# --------------------------------------------------------------------------------------


def test_training_parity_tiny_edsr(monkeypatch):
    """20 Adam steps, fused (Triton forward and backward) vs eager, same seed and data."""
    import fastsr.kernels.conv2d_backward as conv_bwd
    import fastsr.kernels.resblock_backward as block_bwd

    calls = {"conv2d_backward_nhwc": 0, "resblock_backward_nhwc": 0}
    for mod, fn_name in ((conv_bwd, "conv2d_backward_nhwc"), (block_bwd, "resblock_backward_nhwc")):
        def counted(*args, _fn=getattr(mod, fn_name), _name=fn_name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(mod, fn_name, counted)
    torch.manual_seed(0)
    eager = fastsr.EDSR(2, 2, 8, res_scale=0.5)
    fused = fastsr.EDSR(2, 2, 8, res_scale=0.5, fused=True, backend="triton")
    fused.load_state_dict(eager.state_dict())
    # eps 1e-6, not Adam's 1e-8: the L1 loss's gradients are +-1/N, so a bias gradient can be
    # exactly 0 (as many signs each way), and Adam turns the +-4e-9 that either side's
    # summation order leaves there into a full +-lr step of opposite signs. With eps 1e-6 such
    # a residue moves a parameter by ~lr * 4e-3 while real gradients (~0.05) still take lr.
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, eps=1e-6) for m in (eager, fused)]
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        lr_img = torch.rand(1, 3, 4, 5, generator=gen) * 255
        hr_img = torch.rand(1, 3, 8, 10, generator=gen) * 255
        losses = []
        for model, opt in zip((eager, fused), opts):
            opt.zero_grad()
            loss = (model(lr_img) - hr_img).abs().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert fused.backend == "triton"
        assert math.isclose(losses[0], losses[1], rel_tol=1e-5), f"step {step}: losses {losses}"
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # The gradients came from the Triton kernels: per step 4 convs (head, body, upsampler,
    # tail) and 2 blocks.
    assert calls == {"conv2d_backward_nhwc": 20 * 4, "resblock_backward_nhwc": 20 * 2}, calls


class _SavedBytes:
    """Bytes of distinct activation storages autograd saves for backward (4-D, batch-sized
    tensors; parameters and folded weights are not activations)."""

    def __init__(self, batch: int):
        self.batch, self.storages, self.tensors = batch, {}, []

    def _pack(self, t):
        self.tensors.append(t)
        if t.dim() == 4 and t.shape[0] == self.batch:
            st = t.untyped_storage()
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def test_fused_block_saves_only_its_inputs():
    gen = _gen("saved")
    x, w1, b1, w2, b2 = (t.requires_grad_() for t in _block_inputs(gen, 2, 5, 6, 8, 3))
    x_cl = x.contiguous(memory_format=CL)
    with _SavedBytes(batch=2) as saved:
        out = resblock(x_cl, w1, b1, w2, b2, 0.1, backend="triton")
    inputs = {t.data_ptr() for t in (x_cl, w1, b1, w2, b2)}
    assert saved.tensors and all(t.data_ptr() in inputs for t in saved.tensors)
    assert saved.nbytes == x_cl.untyped_storage().nbytes()  # the block input, and nothing else
    ref = [t for t in out.grad_fn.next_functions if t[0] is not None]
    assert ref  # still differentiable to x and the weights


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_model_activation_memory_is_at_most_half_of_eager(backend):
    """EDSR-baseline-shaped (16 blocks, x2), small: the bytes a training forward leaves alive
    for backward, fused vs eager, counted exactly (fastsr.memory.activation_bytes).

    Eager keeps two F-maps per block (the block input and relu(conv1)) plus, after the body,
    the upsampler's input, the tail's input (4 F-maps: the shuffled 2x F-map) and images.
    Fused keeps one F-map per block, the input of the conv after the blocks and the
    upsampler's input (held by the recomputation): B + 2 F-maps plus the folded head/tail
    weights, which are parameter-sized, not activation-sized."""
    torch.manual_seed(0)
    n_blocks, feats, n, h, w = 16, 8, 2, 12, 10
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    eager = fastsr.EDSR(2, n_blocks, feats).to(dev)
    # recompute=True: the default on the triton backend; the cpu backend's default saves
    # what eager saves instead (checked at the end).
    fused = fastsr.EDSR(2, n_blocks, feats, fused=True, backend=backend, recompute=True).to(dev)
    fused.load_state_dict(eager.state_dict())
    x = (torch.rand(n, 3, h, w) * 255).to(dev).contiguous(memory_format=CL)
    kept_eager = activation_bytes(lambda: eager(x))

    def fused_forward():
        out = fused(x)
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            # The interpreter keeps a reference to its last launch's arguments (here the
            # upsampler's output, which the GPU path frees): launch a 1-pixel conv to drop it.
            one = torch.ones(1, 1, 1, 1)  # (the interpreter: CPU tensors)
            conv2d(one.contiguous(memory_format=CL), one, None, backend="triton")
        return out

    kept_fused = activation_bytes(fused_forward)
    assert fused.backend == backend
    fmap = n * feats * h * w * 4  # one fp32 F-channel map at LR
    # The head and tail weights with the means folded in, and what their folding (einsum)
    # keeps for the weight gradients: a few copies of parameter-sized tensors, below one F-map.
    folded = 4 * (feats * 3 * 9 + 3 * feats * 9 + 3)
    assert (n_blocks + 2) * fmap + folded <= kept_fused <= (n_blocks + 2) * fmap + 3 * folded, (kept_fused, fmap)
    assert kept_eager >= (2 * n_blocks + 6) * fmap, (kept_eager, fmap)
    assert kept_fused / kept_eager <= 0.5, kept_fused / kept_eager
    if backend == "cpu":
        fused.recompute = None  # the cpu default: no recomputation, about eager's memory
        kept_saving = activation_bytes(lambda: fused(x))
        assert 0.9 * kept_eager <= kept_saving <= 1.1 * kept_eager, (kept_saving, kept_eager)


def test_recomputed_upsampler_gives_the_same_gradients():
    """The upsampler and tail run twice in a training step (forward, then recomputed for
    backward): the gradients equal the eager model's."""
    torch.manual_seed(3)
    eager = fastsr.EDSR(4, 1, 8).to(TRITON_DEVICE)
    fused = fastsr.EDSR(4, 1, 8, fused=True, backend="triton").to(TRITON_DEVICE)
    fused.load_state_dict(eager.state_dict())
    x = (torch.rand(1, 3, 5, 6) * 255).to(TRITON_DEVICE)
    y = (torch.rand(1, 3, 20, 24) * 255).to(TRITON_DEVICE)
    for m in (eager, fused):
        (m(x) - y).abs().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
