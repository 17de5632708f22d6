"""Implicit-GEMM 2-D convolution on NHWC activations, with fused epilogues.

What one launch computes (stride 1, "same" zero padding, kernel size KS in {1, 3, 5}):

    y = conv(x - in_shift) + bias          # in_shift only on in-bounds taps: padding stays 0
    y = relu(y)                            # optional
    y = res_scale * y + skip               # skip optional (same shape as y)
    out = pixel_shuffle(y, r)              # optional, written straight into the upscaled layout

as one GEMM per output tile:

    M = N*H*W output pixels     (rows: BLOCK_M pixels, flattened over the batch)
    N = Cout output channels    (cols: BLOCK_N channels; BLOCK_N = Cout for F <= 128)
    K = KS*KS*Cin               (walked as KS*KS taps x ceil(Cin / BLOCK_K) chunks)

The A tile of one (tap, chunk) step is a BLOCK_M x BLOCK_K gather of shifted NHWC pixels
(one contiguous row of BLOCK_K channels per pixel, masked at image borders and at the
channel tail); the B tile is the matching BLOCK_K x BLOCK_N slice of the packed weight
(`pack_weight`: row k = (kh*KS + kw)*Cin + ci, so one tap's weights are Cin contiguous rows).
All taps and chunks run as ONE flat loop of KS*KS*ceil(Cin/BLOCK_K) steps, so the software
pipeliner has a loop long enough to overlap loads with MMAs even when Cin fits one chunk
(F = 64: 9 steps of 64-deep MMAs for a 3x3 conv). Accumulation is fp32 (`tl.dot`; fp32
inputs use input_precision="ieee", no TF32, so fp32 parity is tight).

Reads and writes, per output pixel (e = bytes per element: 2 for fp16/bf16, 4 for fp32):
- reads Cin*e of x from DRAM once; the other KS*KS-1 taps hit the same rows again from L1/L2
  (a BLOCK_M = 128 tile of a W-wide image re-reads only a (KS-1)-pixel border);
- reads KS*KS*Cin*Cout*e of weights per BLOCK_M pixels (F = 64, fp16: 73,728 B per 128
  pixels = 576 B/pixel, all from L2: the whole packed weight is 72 KiB);
- reads Cout*e of skip (if any), writes Cout*e of output (pixel shuffle moves the same bytes);
- does 2*KS*KS*Cin*Cout FLOPs.
For the EDSR body conv (3x3, F = 64, fp16) that is 73,728 FLOP against 256 B of DRAM
traffic (384 B with skip): ~288 FLOP/B, at an H100's balance point. Each epilogue fused here
(bias, ReLU, scale, skip, shuffle) is a full 2*Cout*e read+write pass that eager PyTorch
would add on top.

Block sizes come from `triton.autotune` over a small bounded list (BLOCK_M, num_warps,
num_stages), keyed on (Cin, Cout, KS, shuffle) and the tensor dtypes; BLOCK_N and BLOCK_K
follow from the channel counts. Under the Triton interpreter (TRITON_INTERPRET=1, CPU
tensors) one fixed small configuration is used and nothing is tuned; both paths launch the
same kernel body.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastsr.ops.shuffle_order import shuffle_perm

from . import _common
from ._common import (
    _INT32_MAX,
    _INTERPRET_BLOCK_M,
    _block_k,
    _block_n,
    _check_activation,
    _check_kernel_size,
    _check_out,
    _check_packed_weight,
    _check_same_device,
    _check_shuffle,
    _check_tensor,
    _check_vector,
    _conv_configs,
    _launch,
    _launch_config_args,
    pad_weight_columns,
)
from ._jit import _conv_channel, _conv_mainloop, _round_to, _shuffle_col, _tile_coords
from .conv2d_tma import conv2d_nhwc_tma, tma_conv_supported

__all__ = ["pack_weight", "conv2d_nhwc", "SUPPORTED_KERNEL_SIZES", "SUPPORTED_SHUFFLES"]

SUPPORTED_KERNEL_SIZES = _common.SUPPORTED_KERNEL_SIZES
SUPPORTED_SHUFFLES = _common.SUPPORTED_SHUFFLES


@triton.jit
def _conv2d_nhwc_kernel(
    x_ptr, w_ptr, bias_ptr, shift_ptr, skip_ptr, out_ptr,
    M, H, W, res_scale,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KS: tl.constexpr, SHUFFLE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, HAS_SKIP: tl.constexpr,
    INTERP: tl.constexpr, PREC: tl.constexpr, USE_INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_COLS: tl.constexpr,
):
    offs_m, offs_n, m_mask, n_mask, img, oh, ow = _tile_coords(M, H, W, C_OUT, BLOCK_M, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _conv_mainloop(
        acc, x_ptr, img, oh, ow, m_mask, H, W, w_ptr, offs_n, n_mask, shift_ptr,
        C_IN, C_OUT, KS, HAS_SHIFT, INTERP, PREC, USE_INPUT_PRECISION, BLOCK_K, W_COLS,
    )

    # ---- epilogue, all in fp32 registers: one rounding, at the store ----
    R = SHUFFLE
    C_SH = C_OUT // (R * R)
    if HAS_BIAS:
        if R == 1:
            bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)
        else:
            # Columns are in shuffle order (pack_weight(w, r)): column q holds conv channel
            # (q % C_SH) * R^2 + q // C_SH; the bias stays in PyTorch's order.
            bias = tl.load(bias_ptr + _conv_channel(offs_n, R, C_SH), mask=n_mask, other=0.0)
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = acc * res_scale
    mask = m_mask[:, None] & n_mask[None, :]
    if SHUFFLE == 1:
        out_off = offs_m.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
        if HAS_SKIP:
            acc += tl.load(skip_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
    else:
        # PixelShuffle: conv channel c*R*R + i*R + j goes to out[n, oh*R + i, ow*R + j, c]. The
        # packed weight puts it in column q = (i*R + j)*C_SH + c, so the C_SH columns of one
        # (i, j) group are C_SH contiguous output channels of one output pixel (128 B at
        # F = 64 bf16): the store vectorizes to 16 bytes per thread, full 32-byte sectors.
        # The address splits into a per-pixel and a per-column part: out_off = row[m] + col[q].
        W_OUT = W * R
        row = ((img * H + oh).to(tl.int64) * R * W_OUT + ow * R) * C_SH
        out_off = row[:, None] + _shuffle_col(offs_n, R, C_SH, W_OUT)[None, :]
    tl.store(out_ptr + out_off, _round_to(acc, out_ptr, INTERP), mask=mask)


def _shuffle_configs():
    """The upsampler's configs (SHUFFLE > 1, BLOCK_N up to 256: `_block_n`). Its fp32
    accumulator is BLOCK_M x 256 per program, 128 registers per thread at 64 rows per
    warpgroup: BLOCK_M = 64 on 4 warps or 128 on 8 (BLOCK_M 128 on 4 warps or 256 on 8 would
    hold 256 accumulator registers per thread: spills). One stage holds (BLOCK_M + 256) * 64 * 2 B
    of bf16 operands: 40 / 48 KiB, so 3-4 stages fit shared memory."""
    return [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bm, w, s in [(64, 4, 3), (64, 4, 4), (128, 8, 3), (128, 8, 4)]]


_BODY_CONFIGS = len(_conv_configs())


def _prune(configs, named_args, **kwargs):
    """The autotuner's early prune: the shared conv configs, or the upsampler's (BLOCK_N > 128)."""
    return configs[_BODY_CONFIGS:] if kwargs["BLOCK_N"] > 128 else configs[:_BODY_CONFIGS]


_conv2d_nhwc_tuned = triton.autotune(
    configs=_conv_configs() + _shuffle_configs(),
    key=["C_IN", "C_OUT", "KS", "SHUFFLE"],  # the autotuner adds the tensor dtypes itself
    prune_configs_by={"early_config_prune": _prune},
)(_conv2d_nhwc_kernel)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def pack_weight(weight: torch.Tensor, shuffle: int = 1) -> torch.Tensor:
    """(Cout, Cin, KH, KW) -> (KH*KW*Cin, Cout) contiguous, same dtype: the B operand of
    `conv2d_nhwc(..., shuffle=shuffle)`.

    Row k = (kh*KW + kw)*Cin + ci, so the K loop of the implicit GEMM walks one tap's Cin
    rows contiguously and each row holds all Cout weights of one input channel.

    Columns: for shuffle = 1 column co is output channel co. For shuffle r > 1 (a conv followed
    by PixelShuffle(r), the upsampler) they are in shuffle order: column q = (i*r + j)*Cout/r^2 + c
    holds conv channel co = c*r^2 + i*r + j (`fastsr.ops.shuffle_order.shuffle_perm`), the channel PixelShuffle
    writes to sub-pixel (i, j), channel c. Each (i, j) group of Cout/r^2 columns is then one
    output pixel's contiguous channels, which the kernel stores with 16-byte stores. The one
    packing of a shuffle conv's weight: conv2d_nhwc with shuffle=r expects it (its bias stays in
    PyTorch's order). A weight stored (KH, KW, Cin, Cout) in memory (fastsr.models.fused's
    kernel_layout) packs without a copy for shuffle = 1, with one gather for r > 1."""
    _check_tensor("weight", weight, rank=4)
    c_out, c_in, kh, kw = weight.shape
    packed = weight.permute(2, 3, 1, 0).reshape(kh * kw * c_in, c_out)
    if _check_shuffle(shuffle, c_out) > 1:
        return packed[:, shuffle_perm(c_out, shuffle, weight.device)]  # index_select: a contiguous copy
    return packed.contiguous()


def conv2d_nhwc(x, w_packed, bias, kernel_size: int, *, in_shift=None, relu: bool = False,
                res_scale: float = 1.0, skip=None, shuffle: int = 1, out=None) -> torch.Tensor:
    """Fused NHWC convolution (see the module docstring for what it reads and writes).

    x:        (N, H, W, Cin) contiguous, float32 / float16 / bfloat16.
    w_packed: (KS*KS*Cin, Cout) from `pack_weight(weight, shuffle)`, x's dtype (for shuffle > 1
              its columns are in shuffle order: see pack_weight).
    bias:     (Cout,) float32 or None, in PyTorch's channel order (also for shuffle > 1).
    in_shift: (Cin,) float32 or None, subtracted from every in-bounds input value on load.
    Computes with fp32 accumulation, stride 1, zero padding kernel_size // 2:
        y = conv(x - in_shift) + bias; y = relu(y) if relu; y = res_scale * y; y += skip;
        then PixelShuffle(shuffle) written straight into the (N, H*r, W*r, Cout/r^2) output.
    Returns out (x's dtype, contiguous NHWC); an `out` given is written and returned.
    skip together with shuffle > 1 is not supported.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, SUPPORTED_KERNEL_SIZES)
    n, h, w, c_in = x.shape
    if c_in < 1:
        raise ValueError("x has 0 channels")
    c_out = _check_packed_weight("w_packed", w_packed, x, ks, c_in)
    _check_shuffle(shuffle, c_out)
    if skip is not None and shuffle > 1:
        raise ValueError("skip with shuffle > 1 is not supported (add the skip after the pixel shuffle)")
    if bias is not None:
        _check_vector("bias", bias, c_out)
    if in_shift is not None:
        _check_vector("in_shift", in_shift, c_in)
    if skip is not None:
        _check_activation("skip", skip)
        if tuple(skip.shape) != (n, h, w, c_out):
            raise ValueError(f"skip must have shape {(n, h, w, c_out)}, got {tuple(skip.shape)}")
        if skip.dtype != x.dtype:
            raise TypeError(f"skip must have x's dtype {x.dtype}, got {skip.dtype}")
    _check_same_device(x, w_packed=w_packed, bias=bias, in_shift=in_shift, skip=skip, out=out)
    r = shuffle
    out = _check_out(out, (n, h * r, w * r, c_out // (r * r)), x, dict(x=x, w_packed=w_packed, skip=skip))

    m = n * h * w
    if m == 0:
        return out
    if m > _INT32_MAX:
        raise ValueError(f"x has {m} pixels; at most {_INT32_MAX} are supported")

    if tma_conv_supported(x, w_packed, out, ks, in_shift=in_shift, shuffle=r, skip=skip):
        # Hopper: operands by TMA boxes (zero-filled padding), persistent grid (conv2d_tma.py).
        return conv2d_nhwc_tma(x, w_packed, bias, ks, relu=relu, res_scale=res_scale, skip=skip, shuffle=r,
                               out=out)
    block_n = _block_n(c_out, r)
    num_n_blocks = triton.cdiv(c_out, block_n)
    wk = pad_weight_columns(w_packed, block_n)
    dummy = x  # never read: the matching HAS_* flag is False
    args = (
        x, wk,
        bias if bias is not None else dummy,
        in_shift if in_shift is not None else dummy,
        skip if skip is not None else dummy,
        out,
        m, h, w, float(res_scale),
    )
    meta = dict(
        C_IN=c_in, C_OUT=c_out, KS=ks, SHUFFLE=r,
        HAS_BIAS=bias is not None, HAS_SHIFT=in_shift is not None, RELU=bool(relu),
        HAS_SKIP=skip is not None,
        BLOCK_N=block_n, BLOCK_K=_block_k(c_in, x.dtype), W_COLS=wk.shape[1],
        **_launch_config_args(x.dtype),
    )

    def grid(meta_):
        return (triton.cdiv(m, meta_["BLOCK_M"]) * num_n_blocks,)

    _launch(_conv2d_nhwc_kernel, _conv2d_nhwc_tuned, grid, args, meta,
            interpret=dict(BLOCK_M=_INTERPRET_BLOCK_M), like=x)
    return out

