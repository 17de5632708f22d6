"""Gradients of one fused NHWC convolution: its dgrad and wgrad launches put together.

The forward (kernels/conv2d.py) computes, per conv, stride 1, "same" zero padding P = KS // 2:

    y   = conv(x - in_shift) + bias             z = res_scale * act(y) + skip
    out = pixel_shuffle(z, r)                   act = relu or identity

Given g = dL/d out (the upscaled NHWC gradient when r > 1), with gz = pixel_unshuffle(g)
and gy = res_scale * gz * (y > 0 if relu else 1), the gradients are

    dx[p, ci]       = sum_{tap, co} gy[p - tap, co] * W[co, ci, tap]   dgrad: a conv of gy
    dW[co, ci, tap] = sum_p (x - in_shift)[p + tap, ci] * gy[p, co]     wgrad: a reduction over pixels
    db[co]          = sum_p gy[p, co]
    d skip = g,  d in_shift = -sum_p dx[p, :]                           (the op layer does these two)

The kernels are in conv2d_dgrad.py (dx) and conv2d_wgrad.py (dW, db); the residual block's
backward is in resblock_backward.py.
"""
from __future__ import annotations

import torch

from . import _common
from ._common import (
    _check_activation,
    _check_kernel_size,
    _check_shuffle,
    _check_vector,
    _check_weight,
)
from .conv2d import conv2d_nhwc, pack_weight
from .conv2d_dgrad import conv2d_dgrad_nhwc
from .conv2d_wgrad import conv2d_wgrad_nhwc

__all__ = ["conv2d_backward_nhwc"]


def conv2d_backward_nhwc(grad_out, x, weight, bias, kernel_size: int, *, in_shift=None, relu: bool = False,
                         res_scale: float = 1.0, shuffle: int = 1, needs=(True, True, True),
                         dw_dtype=None, db_dtype=torch.float32, dx_out=None, dw_out=None, db_out=None):
    """Gradients of `conv2d_nhwc(x, pack_weight(weight, shuffle), bias, kernel_size, in_shift=, relu=,
    res_scale=, skip=, shuffle=)` with respect to x, weight and bias.

    grad_out: (N, H*r, W*r, Cout/r^2) contiguous NHWC, x's dtype (the forward output's gradient).
    x:        (N, H, W, Cin) contiguous NHWC, float32 / float16 / bfloat16 (the forward input).
    weight:   (Cout, Cin, KS, KS) in x's dtype; bias: (Cout,) float32 or None (only read to
              recompute the ReLU mask when relu=True).
    needs:    which of (dx, dW, db) to compute; the others come back as None.
    Returns (dx (N, H, W, Cin) x's dtype, dW (Cout, Cin, KS, KS) dw_dtype (default x's dtype),
             db (Cout,) db_dtype). The skip's gradient is grad_out itself and in_shift's is
             -dx summed over pixels: the caller forms those.
    relu=True recomputes relu(conv(x) + bias) with the forward kernel for the mask (the forward
    saves nothing but its inputs): +1 forward conv. Then one dgrad and one wgrad launch (+ the
    split-K reduction); see the module docstring for FLOPs and bytes.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, _common.SUPPORTED_KERNEL_SIZES)
    _check_weight("weight", weight, x, ks, c_in=x.shape[3])
    _check_activation("grad_out", grad_out)
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out must have x's dtype {x.dtype}, got {grad_out.dtype}")
    r = _check_shuffle(shuffle, weight.shape[0])
    n, h, w, _ = x.shape
    want = (n, h * r, w * r, weight.shape[0] // (r * r))
    if tuple(grad_out.shape) != want:
        raise ValueError(f"grad_out must have shape {want}, got {tuple(grad_out.shape)}")
    if bias is not None:
        _check_vector("bias", bias, weight.shape[0])
    need_dx, need_dw, need_db = (bool(v) for v in needs)
    mask = None
    if relu and x.numel() > 0 and (need_dx or need_dw or need_db):
        mask = conv2d_nhwc(x, pack_weight(weight, r), bias, ks, in_shift=in_shift, relu=True, shuffle=r)
    dx = None
    if need_dx:
        dx = conv2d_dgrad_nhwc(grad_out, weight, ks, shuffle=r, res_scale=res_scale, grad_mask=mask, out=dx_out)
    dw, db = conv2d_wgrad_nhwc(x, grad_out, ks, shuffle=r, res_scale=res_scale, in_shift=in_shift, grad_mask=mask,
                               need_dw=need_dw, need_db=need_db, dw_dtype=dw_dtype, db_dtype=db_dtype,
                               dw_out=dw_out, db_out=db_out)
    return dx, dw, db

