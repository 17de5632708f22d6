"""The bordered, channel-padded operand copy that the narrow convs read with 16-byte loads.

A tensor of few channels (the image's 3 in the head and its wgrad, the tail's 3-channel gradient
in dgrad and wgrad) has pixels 3*e bytes apart: no 16-byte vector or TMA box fits a pixel, and a
tap's operand tile becomes a 2- or 4-byte gather. One pass (`pad_bordered_nhwc`) first writes it
as (N, H + 2P, W + 2P, C_PAD): C_PAD channels a pixel (a power of two, 16 bytes or more: fp32 RGB
4, bf16/fp16 RGB 8, or a conv's whole BLOCK tile), the values inside the image, zero in the
P-pixel border (the conv's zero padding) and in the spare channels, with the op's prologue
applied on the way (in_shift subtracted, or the ReLU mask). Then one (pixel, tap) is one aligned
vector and the conv's loads need no bounds masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import _INT32_MAX, _INTERPRET, _device_ctx, _next_pow2
from ._jit import _round_to

__all__ = ["pad_bordered_nhwc", "vector_channels"]

_PAD_BLOCK_P = 256  # pixels per program: 4 KiB of output at 16 bytes a pixel


@triton.jit
def _pad_bordered_kernel(
    x_ptr, shift_ptr, mask_ptr, out_ptr,
    TOTAL, H, W,
    C_IN: tl.constexpr, C_PAD: tl.constexpr, KS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, IN_MASK: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[n, h', w', c] = x[n, h' - P, w' - P, c] inside the image and c < C_IN (minus in_shift[c]
    with HAS_SHIFT, rounded to out's dtype as eager `x - mean`; zero where mask is zero with
    IN_MASK), 0 in the P = KS // 2 pixel border and in channels C_IN..C_PAD-1. out is
    (N, H + 2P, W + 2P, C_PAD): every element written, one C_PAD-wide vector per pixel."""
    P: tl.constexpr = KS // 2
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # pixels of out
    c = tl.arange(0, C_PAD)
    w_p = offs % (W + 2 * P)
    t = offs // (W + 2 * P)
    h_p = t % (H + 2 * P)
    img = t // (H + 2 * P)
    inside = (offs < TOTAL) & (h_p >= P) & (h_p < H + P) & (w_p >= P) & (w_p < W + P)
    src = ((img * H + h_p - P) * W + w_p - P).to(tl.int64) * C_IN
    ok = inside[:, None] & (c < C_IN)[None, :]
    # Through fp32 (exact for the copy itself): the interpreter has no arithmetic on bf16.
    v = tl.load(x_ptr + src[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        v = tl.where(ok, v - tl.load(shift_ptr + c, mask=c < C_IN, other=0.0)[None, :], 0.0)
    if IN_MASK:
        keep = tl.load(mask_ptr + src[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32) != 0.0
        v = tl.where(keep, v, 0.0)
    dst = offs.to(tl.int64)[:, None] * C_PAD + c[None, :]
    tl.store(out_ptr + dst, _round_to(v, out_ptr, INTERP), mask=(offs < TOTAL)[:, None])


def vector_channels(c: int, dtype: torch.dtype) -> int:
    """Channels per pixel of a padded copy of c channels: a power of two of at least 16 bytes
    (fp32 RGB: 4, bf16/fp16 RGB: 8), so one pixel is one aligned 16-byte (or wider) vector."""
    return max(16 // torch.empty((), dtype=dtype).element_size(), _next_pow2(c))


def pad_bordered_nhwc(x: torch.Tensor, kernel_size: int, c_pad: int, *, in_shift=None, mask=None) -> torch.Tensor:
    """x (N, H, W, C) contiguous -> (N, H + 2P, W + 2P, c_pad) in x's dtype, P = kernel_size // 2:
    x - in_shift (in_shift float32 (C,), optional) where mask (x's shape and dtype, optional) is
    nonzero, inside the image; zero in the border and in channels C..c_pad-1. One pass: reads
    N*H*W*C*e (+ the mask), writes N*(H+2P)*(W+2P)*c_pad*e."""
    n, h, w, c_in = x.shape
    p = kernel_size // 2
    out = torch.empty((n, h + 2 * p, w + 2 * p, c_pad), device=x.device, dtype=x.dtype)
    total = n * (h + 2 * p) * (w + 2 * p)
    if total * c_pad > _INT32_MAX:
        raise ValueError(f"the padded copy would have {total * c_pad} elements; at most {_INT32_MAX} are supported")
    if total == 0:
        return out
    grid = (triton.cdiv(total, _PAD_BLOCK_P),)
    with _device_ctx(x):
        _pad_bordered_kernel[grid](x, in_shift if in_shift is not None else x, mask if mask is not None else x, out,
                                   total, h, w, C_IN=c_in, C_PAD=c_pad, KS=kernel_size,
                                   HAS_SHIFT=in_shift is not None, IN_MASK=mask is not None, INTERP=_INTERPRET,
                                   BLOCK_P=_PAD_BLOCK_P)
    return out
