"""The head conv on tensor cores: a conv on a narrow input (KS*KS*Cin <= 32: the image).

EDSR/MDSR's head maps the image (Cin = 3, float32 in 0..255, the DIV2K mean subtracted on load)
to F features with a 3x3 kernel: K = 27. The general kernel (conv2d.py) walks 9 taps of a
16-padded channel chunk, 16/3 = 5.3x the FLOPs, and for float32 it has no tensor-core path (IEEE
fp32 dot = FFMA). Here one small pass (`pad_image_nhwc`) first writes the image, shifted, into a
bordered copy of C_X channels a pixel (16 bytes: fp32 4, bf16/fp16 8; the spare channels and the
P-pixel border zero, the border being the conv's padding), so every (pixel, tap) of A is one
aligned 16-byte load with no bounds mask. The taps then run in unrolled K steps of whole taps
(`head_k_steps`: fp32 RGB 3x3: 8 taps in K = 32, then tap 8 in K = 16):

    out[p, co] = round_out(res_scale * act(sum_k A[p, k] * Wp[k, co] + bias[co]))
    A[p, k]    = xpad[p + offset(tap(k)), c(k)]       (k = tap*C_X + c)
    Wp[k, co]  = w_packed[tap*Cin + c, co] for c < Cin, else 0 (masked rows of `pack_weight`'s)

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

Per output pixel (F = 64, bf16 out): reads 16 B of the copy (the 9 taps re-read neighbours
from L1/L2), writes 64*2 B; 3 MMA passes (fp32 in) of 2*48*64 FLOP (K = 32 + 16) against 2*27*64 useful.
Memory-bound: a 540x960 image is 6.2 MB in, 8.35 MB of copy written and read, 66 MB out.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
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
from ._jit import _mma, _mma_3xtf32, _round_to
from .pad import pad_bordered_nhwc, vector_channels

__all__ = ["HEAD_MAX_K", "conv2d_head_nhwc", "head_conv_supported", "pad_image_nhwc"]

HEAD_MAX_K = 32  # KS*KS*Cin at most this: a narrow input (the image), its taps in a few unrolled K steps


@triton.jit
def _head_step(acc, a_base, w_ptr, offs_n, n_mask, W_P,
               TAP0: tl.constexpr, NT: tl.constexpr, K_STEP: tl.constexpr,
               C_IN: tl.constexpr, C_X: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr,
               SPLIT: tl.constexpr, INTERP: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr):
    """acc += A @ B over taps TAP0 .. TAP0 + NT - 1 in one K_STEP-wide step: column k is tap
    TAP0 + k // C_X, channel k % C_X of the padded image, so each (pixel, tap) is one aligned
    C_X*e = 16-byte vector, and no image load needs a bounds mask (the copy's border is the
    padding) except the slots past the NT taps (k >= NT*C_X). B row k is packed weight row
    tap*C_IN + c for c < C_IN, and zero for the copy's spare channels (masked per row: the mask
    is constant along the contiguous N axis, so the weight loads stay 16 bytes wide)."""
    P: tl.constexpr = KS // 2
    k = tl.arange(0, K_STEP)
    tap = TAP0 + k // C_X
    c = k % C_X
    a_off = ((tap // KS - P) * W_P + tap % KS - P) * C_X + c
    b_ptrs = w_ptr + (tap * C_IN + c)[:, None] * C_OUT + offs_n[None, :]
    b_ok = (c < C_IN) & (k < NT * C_X)
    if NT * C_X < K_STEP:
        a = tl.load(a_base + a_off[None, :], mask=(k < NT * C_X)[None, :], other=0.0)
    else:
        a = tl.load(a_base + a_off[None, :])
    b = tl.load(b_ptrs, mask=b_ok[:, None] & n_mask[None, :], other=0.0)
    if SPLIT:
        # fp32 image: 3xTF32 (_jit._mma_3xtf32; see the module docstring).
        acc = _mma_3xtf32(a, b, acc, INTERP, USE_INPUT_PRECISION)
    else:
        if INTERP:
            # The interpreter cannot multiply bf16 (see _jit._conv_mainloop): widening is exact,
            # and products of bf16/fp16 values are exact in fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = _mma(a, b, acc, "tf32", USE_INPUT_PRECISION)
    return acc


@triton.jit
def _conv2d_head_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    H, W, res_scale,
    C_IN: tl.constexpr, C_X: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, SPLIT: tl.constexpr,
    INTERP: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_REM: tl.constexpr,
):
    # x is the padded, shifted image (`pad_image_nhwc`: (N, H + 2P, W + 2P, C_X), the image's
    # C_IN channels then zeros; C_IN only names the launch). A tile =
    # BLOCK_M pixels of one image row (1-D grid, channel blocks fastest): the row and image are
    # per-program scalars, so no pixel pays a division by W or H.
    NUM_N_BLOCKS: tl.constexpr = (C_OUT + BLOCK_N - 1) // BLOCK_N
    P: tl.constexpr = KS // 2
    TPS: tl.constexpr = BLOCK_K // C_X  # whole taps per full K step
    FULL: tl.constexpr = (KS * KS) // TPS  # full steps; then one K_REM-wide step for the rest
    pid = tl.program_id(0)
    pid_n = pid % NUM_N_BLOCKS
    t = pid // NUM_N_BLOCKS
    tiles_w = tl.cdiv(W, BLOCK_M)
    row = t // tiles_w  # n * H + oh
    img = row // H
    oh = row - img * H
    ow = (t - row * tiles_w) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = ow < W
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_OUT
    W_P = W + 2 * P
    # Rows past the image's right edge (ow >= W) read pixel W - 1's taps (inside the copy; their
    # outputs are masked). 64-bit only in the row's base pointer.
    centre = (img * (H + 2 * P) + oh + P).to(tl.int64) * W_P + P
    a_base = x_ptr + centre * C_X + (tl.minimum(ow, W - 1) * C_X)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in tl.static_range(FULL):
        acc = _head_step(acc, a_base, w_ptr, offs_n, n_mask, W_P, step * TPS, TPS, BLOCK_K, C_IN, C_X, C_OUT, KS,
                         SPLIT, INTERP, USE_INPUT_PRECISION)
    if K_REM > 0:
        acc = _head_step(acc, a_base, w_ptr, offs_n, n_mask, W_P, FULL * TPS, KS * KS - FULL * TPS, K_REM, C_IN,
                         C_X, C_OUT, KS, SPLIT, INTERP, USE_INPUT_PRECISION)

    # ---- epilogue in fp32: one rounding, at the store, to out's dtype ----
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = acc * res_scale
    pix0 = row.to(tl.int64) * W
    out_off = (ow * C_OUT)[:, None] + offs_n[None, :]
    tl.store(out_ptr + pix0 * C_OUT + out_off, _round_to(acc, out_ptr, INTERP), mask=m_mask[:, None] & n_mask[None, :])


def _head_configs():
    # No loop to pipeline (num_stages 1): FULL + 1 unrolled K steps. BLOCK_M pixels x BLOCK_N (64
    # at F = 64) fp32 accumulators: 32 (64 x 64 on 4 warps) to 64 registers per thread (256 rows
    # on 8 warps); the A gather (KS*KS 16-byte vectors per pixel row, L1-resident neighbours) is
    # spread over the program's threads.
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
            for bm, w in [(64, 4), (128, 4), (128, 8), (256, 8)]]


_conv2d_head_tuned = triton.autotune(
    configs=_head_configs(), key=["C_IN", "C_X", "C_OUT", "KS", "SPLIT", "BLOCK_K", "K_REM"],  # + the tensor dtypes
)(_conv2d_head_kernel)

def head_k_steps(c_x: int, kernel_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_K, K_REM) of the head's unrolled K steps over the KS*KS taps of C_X channels each:
    full steps of BLOCK_K = 128 bytes of K (fp32 32 = 8 taps, bf16/fp16 64 = 8 taps; fewer when
    all taps fit a smaller power of two), then one K_REM-wide step (>= 16, 0 for none) for the
    remaining taps. The RGB 3x3 head, fp32: 32 + 16 (36 used: 27 real + 9 zero channels)."""
    taps = kernel_size * kernel_size
    cap = 128 // torch.empty((), dtype=dtype).element_size()
    block_k = max(16, c_x, min(_next_pow2(taps * c_x), cap))
    rem = taps % (block_k // c_x)
    return block_k, (max(16, _next_pow2(rem * c_x)) if rem else 0)


def pad_image_nhwc(x, kernel_size: int, in_shift=None) -> torch.Tensor:
    """The copy the head kernels (forward and wgrad) read: (N, H + 2P, W + 2P, C_X), P = KS // 2,
    C_X = `pad.vector_channels` (fp32 RGB 4, bf16/fp16 8): x - in_shift (in x's dtype, as eager
    computes it) inside, 0 in the border (the conv's zero padding) and in the extra channels
    (`pad.pad_bordered_nhwc`; the 540x960 fp32 RGB image: 6.2 MB read, 8.35 MB written)."""
    return pad_bordered_nhwc(x, kernel_size, vector_channels(x.shape[-1], x.dtype), in_shift=in_shift)


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
    Two launches: `pad_image_nhwc` (the shifted, bordered 16-byte-pixel copy), then the conv.
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
    xp = pad_image_nhwc(x, ks, in_shift)
    c_x = xp.shape[-1]
    block_k, k_rem = head_k_steps(c_x, ks, x.dtype)
    block_n = _block_n(c_out)
    num_n_blocks = triton.cdiv(c_out, block_n)
    args = (xp, w_packed, bias if bias is not None else xp, out, h, w, float(res_scale))
    meta = dict(C_IN=c_in, C_X=c_x, C_OUT=c_out, KS=ks, HAS_BIAS=bias is not None,
                RELU=bool(relu), SPLIT=x.dtype == torch.float32, INTERP=_INTERPRET,
                USE_INPUT_PRECISION=_DOT_HAS_INPUT_PRECISION, BLOCK_N=block_n, BLOCK_K=block_k, K_REM=k_rem)

    def grid(meta_):
        return (n * h * triton.cdiv(w, meta_["BLOCK_M"]) * num_n_blocks,)

    _launch(_conv2d_head_kernel, _conv2d_head_tuned, grid, args, meta, interpret=dict(BLOCK_M=_INTERPRET_BLOCK_M),
            like=x)
    return out
