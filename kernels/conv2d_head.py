"""The head conv on tensor cores: a conv whose whole K = KS*KS*Cin fits one 32-wide MMA step.

EDSR/MDSR's head maps the image (Cin = 3, float32 in 0..255, the DIV2K mean subtracted on load)
to F features with a 3x3 kernel: K = 27. The general kernel (conv2d.py) walks 9 taps of a
16-padded channel chunk, 16/3 = 5.3x the FLOPs, and for float32 it has no tensor-core path (IEEE
fp32 dot = FFMA). Here the 27 (tap, channel) pairs are one K step, tap-major like `pack_weight`'s
rows (k = (kh*KS + kw)*Cin + ci, zero-padded to K_PAD = 32):

    out[p, co] = round_out(res_scale * act(sum_k A[p, k] * Wp[k, co] + bias[co]))
    A[p, k]    = x[p + offset(tap(k)), ci(k)] - in_shift[ci(k)]    (0 outside the image: padding)

and the output is written in any of fp32 / bf16 / fp16 (`out_dtype`), so a bf16 model gets its
features from the fp32 image without a separate cast pass.

Float32 input keeps fp32-level accuracy on tensor cores by the 3xTF32 split: each operand
v = hi + lo with hi = tf32(v) and lo = tf32(v - hi) (round to nearest, ties away, as
cvt.rna.tf32.f32), and acc = lo_a*hi_w + hi_a*lo_w + hi_a*hi_w (the lo*lo term, ~2^-22 of the
product, dropped). Both parts are exact tf32 values, so the tensor core's tf32 MMA multiplies
them exactly (11 x 11 significant bits fit fp32) and the only roundings are the split's and
fp32 accumulation's. The rounding is integer arithmetic on the bits, so the interpreter computes
the same split as the GPU (its fp32 dot of those values gives the same products). Measured on
0..255 images against float64 (bench/results/2026-12-02_issue13_upsampler_head.md), F = 64: max
abs error 9.9e-5 on outputs up to ~400 (2.4e-7 of the largest), eager fp32 F.conv2d 8.3e-5;
a bf16 hi+lo split (3 bf16 MMAs, lo*lo dropped: ~2^-16 per product) measured 2.5e-3, 25x more,
and was not kept (the 3 tf32 MMAs cost nothing that binds: this kernel is DRAM-bound).
bf16 / fp16 input: one MMA in that dtype, x - in_shift rounded to it first (as eager does).

Per output pixel (F = 64, bf16 out): reads 3*4 B of image (the 9 taps re-read neighbours from
L1/L2), writes 64*2 B; 3 MMAs of 2*32*64 FLOP (fp32 in) against 2*27*64 useful. DRAM-bound:
a 540x960 image is 6.2 MB in, 66 MB out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    _INT32_MAX,
    _INTERPRET_BLOCK_M,
    SUPPORTED_DTYPES,
    _block_n,
    _check_activation,
    _check_kernel_size,
    _check_packed_weight,
    _check_same_device,
    _check_vector,
    _launch,
    _next_pow2,
    _result,
    _DOT_HAS_INPUT_PRECISION,
    _INTERPRET,
)
from ._jit import _mma, _round_to

__all__ = ["HEAD_MAX_K", "conv2d_head_nhwc", "head_conv_supported"]

HEAD_MAX_K = 32  # the one K step: KS*KS*Cin must fit it


@triton.jit
def _tf32_rna(v):
    """fp32 -> the nearest tf32 value (10 stored mantissa bits; ties away from zero, as
    cvt.rna.tf32.f32), kept in fp32. Integer ops on the bits: the GPU and the interpreter
    compute the same value. Finite inputs only (the image and its weights)."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + 0x1000) & 0xFFFFE000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _conv2d_head_kernel(
    x_ptr, w_ptr, bias_ptr, shift_ptr, out_ptr,
    H, W, res_scale,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, SPLIT: tl.constexpr,
    INTERP: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K_PAD: tl.constexpr,
):
    # A tile = BLOCK_M pixels of one image row (1-D grid, channel blocks fastest): the row and
    # image are per-program scalars, so no pixel pays a division by W or H, and the vertical
    # border test is one per column of A.
    NUM_N_BLOCKS: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_n = pid % NUM_N_BLOCKS
    t = pid // NUM_N_BLOCKS
    tiles_w = tl.cdiv(W, BLOCK_M)
    row = t // tiles_w  # n * H + oh
    oh = row % H
    ow = (t - row * tiles_w) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = ow < W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_OUT
    K: tl.constexpr = KS * KS * C_IN
    PAD: tl.constexpr = KS // 2
    # Column k of A is tap k // C_IN, channel k % C_IN (pack_weight's row order).
    k = tl.arange(0, K_PAD)
    tap = k // C_IN
    ci = k % C_IN
    dh = tap // KS - PAD
    dw = tap % KS - PAD
    k_ok = (k < K) & (oh + dh >= 0) & (oh + dh < H)
    # One unsigned compare per element for 0 <= iw < W. Rows past the image's right edge
    # (ow >= W, m_mask False) may read in-image neighbours: harmless, their outputs are masked.
    iw = ow[:, None] + dw[None, :]
    ok = k_ok[None, :] & (iw.to(tl.uint32) < W)
    # 64-bit only in the row's base pointers; per element a 32-bit offset within the row's
    # neighbourhood (the gather's address work is most of this kernel's instructions).
    pix0 = row.to(tl.int64) * W
    a_off = (ow * C_IN)[:, None] + ((dh * W + dw) * C_IN + ci)[None, :]
    a = tl.load(x_ptr + pix0 * C_IN + a_off, mask=ok, other=0.0)
    b = tl.load(w_ptr + k[:, None] * C_OUT + offs_n[None, :], mask=(k < K)[:, None] & n_mask[None, :], other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT:
        # fp32 image: 3xTF32 (see the module docstring). a - shift in fp32, as eager does.
        a = a.to(tl.float32)
        if HAS_SHIFT:
            s = tl.load(shift_ptr + ci, mask=k < K, other=0.0)
            a = tl.where(ok, a - s[None, :], 0.0)
        b = b.to(tl.float32)
        a_hi = _tf32_rna(a)
        a_lo = _tf32_rna(a - a_hi)
        b_hi = _tf32_rna(b)
        b_lo = _tf32_rna(b - b_hi)
        # Small terms first; each MMA's products are exact (tf32 x tf32 fits fp32). Under the
        # interpreter "ieee" (its fp32 dot) computes the same products of the same values.
        acc = _mma(a_lo, b_hi, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)
        acc = _mma(a_hi, b_lo, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)
        acc = _mma(a_hi, b_hi, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)
    else:
        # bf16 / fp16 image: one MMA in its dtype.
        if HAS_SHIFT:
            # (x - shift) rounded to x's dtype, like eager `x - mean` in that dtype.
            s = tl.load(shift_ptr + ci, mask=k < K, other=0.0)
            a = _round_to(tl.where(ok, a.to(tl.float32) - s[None, :], 0.0), x_ptr, INTERP)
        if INTERP:
            # The interpreter cannot multiply bf16 (see _jit._conv_mainloop): widening is exact,
            # and products of bf16/fp16 values are exact in fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _mma(a, b, acc, "ieee" if INTERP else "tf32", USE_INPUT_PRECISION)

    # ---- epilogue in fp32: one rounding, at the store, to out's dtype ----
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = acc * res_scale
    out_off = (ow * C_OUT)[:, None] + offs_n[None, :]
    tl.store(out_ptr + pix0 * C_OUT + out_off, _round_to(acc, out_ptr, INTERP), mask=m_mask[:, None] & n_mask[None, :])


def _head_configs():
    # One K step, no loop to pipeline (num_stages 1). BLOCK_M pixels x BLOCK_N (64 at F = 64)
    # fp32 accumulators: 32 (64 x 64 on 4 warps) to 64 registers per thread (256 rows on 8 warps);
    # the A gather (up to 32 scalar loads per pixel row, L1-resident neighbours) is spread over
    # the program's threads.
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
            for bm, w in [(64, 4), (128, 4), (128, 8), (256, 8)]]


_conv2d_head_tuned = triton.autotune(
    configs=_head_configs(), key=["C_IN", "C_OUT", "KS", "SPLIT"],  # + the tensor dtypes
)(_conv2d_head_kernel)


def head_conv_supported(c_in: int, kernel_size: int, *, skip=None, shuffle: int = 1) -> bool:
    """Whether `conv2d_head_nhwc` takes this conv: KS*KS*Cin <= 32 (the head: 3x3 on 3 channels,
    27; a gray image's 9 or 25), no skip, no pixel shuffle."""
    return kernel_size * kernel_size * c_in <= HEAD_MAX_K and skip is None and shuffle == 1


def conv2d_head_nhwc(x, w_packed, bias, kernel_size: int, *, in_shift=None, relu: bool = False,
                     res_scale: float = 1.0, out_dtype: torch.dtype | None = None, out=None) -> torch.Tensor:
    """The head conv: y = res_scale * act(conv(x - in_shift) + bias), written in out_dtype.

    x:         (N, H, W, Cin) contiguous NHWC, float32 / float16 / bfloat16 (the image, 0..255 for
               EDSR); KS*KS*Cin <= 32.
    w_packed:  (KS*KS*Cin, Cout) from `conv2d.pack_weight`, x's dtype.
    bias:      (Cout,) float32 or None; in_shift: (Cin,) float32 or None (subtracted from every
               in-bounds input value; the zero padding stays zero).
    out_dtype: float32 / float16 / bfloat16, default x's dtype.
    Returns out (N, H, W, Cout) contiguous in out_dtype (an `out` given is checked, written and
    returned). fp32 x: 3xTF32 on tensor cores (fp32-level error: see the module docstring);
    bf16/fp16 x: one MMA in its dtype. Accumulation fp32, one rounding at the store.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, (1, 3, 5))
    n, h, w, c_in = x.shape
    if c_in < 1:
        raise ValueError("x has 0 channels")
    if ks * ks * c_in > HEAD_MAX_K:
        raise ValueError(f"conv2d_head_nhwc takes KS*KS*Cin <= {HEAD_MAX_K}, got {ks}*{ks}*{c_in} = "
                         f"{ks * ks * c_in} (use conv2d.conv2d_nhwc)")
    c_out = _check_packed_weight("w_packed", w_packed, x, ks, c_in)
    if bias is not None:
        _check_vector("bias", bias, c_out)
    if in_shift is not None:
        _check_vector("in_shift", in_shift, c_in)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    _check_same_device(x, w_packed=w_packed, bias=bias, in_shift=in_shift, out=out)
    out = _result("out", out, (n, h, w, c_out), out_dtype, x.device, dict(x=x, w_packed=w_packed))
    m = n * h * w
    if m == 0:
        return out
    if m > _INT32_MAX // max(c_in, 1):
        raise ValueError(f"x has {m} pixels; at most {_INT32_MAX // c_in} are supported")
    block_n = _block_n(c_out)
    num_n_blocks = triton.cdiv(c_out, block_n)
    dummy = x  # never read: the matching HAS_* flag is False
    args = (x, w_packed, bias if bias is not None else dummy, in_shift if in_shift is not None else dummy, out,
            h, w, float(res_scale))
    meta = dict(C_IN=c_in, C_OUT=c_out, KS=ks, HAS_BIAS=bias is not None, HAS_SHIFT=in_shift is not None,
                RELU=bool(relu), SPLIT=x.dtype == torch.float32, INTERP=_INTERPRET,
                USE_INPUT_PRECISION=_DOT_HAS_INPUT_PRECISION, BLOCK_N=block_n,
                K_PAD=max(16, _next_pow2(ks * ks * c_in)))

    def grid(meta_):
        return (n * h * triton.cdiv(w, meta_["BLOCK_M"]) * num_n_blocks,)

    _launch(_conv2d_head_kernel, _conv2d_head_tuned, grid, args, meta, interpret=dict(BLOCK_M=_INTERPRET_BLOCK_M),
            like=x)
    return out
