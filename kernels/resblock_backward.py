"""Backward of the fused residual block  y = x + res_scale * (conv2(relu(conv1(x) + b1)) + b2).

the block's forward saves only x. Backward
  recomputes h = relu(conv1(x) + b1) with the forward conv kernel, then
      dW2, db2 = wgrad(h, dy) * res_scale
      dh       = dgrad(dy, W2) * res_scale, masked by h > 0 in the epilogue
      dW1, db1 = wgrad(x, dh)
      dx       = conv(dh, flip(W1)^T) + dy   (the forward kernel, its skip epilogue adds dy)
  h and dh are transient (they live only during this backward): the activation memory held between
  forward and backward is x alone, half of what eager autograd keeps (x and relu(h)).

Cost per pixel (e = bytes per element, F = C = 64, 3x3, fp16, e = 2; DRAM traffic, L2 re-reads
not counted):
  block   recompute conv1 (73,728 FLOP, 256 B), wgrad2 + dgrad2 + wgrad1 + dgrad1 (4 x 73,728 FLOP):
          ~369 kFLOP and ~1.5 KiB of DRAM traffic per pixel, against eager's 4 convs (no recompute,
          +25% FLOPs here) plus separate ReLU-backward, scale and add passes.
"""
from __future__ import annotations

import torch

from ._common import (
    _check_activation,
    _check_kernel_size,
    _check_same_device,
    _check_vector,
    _check_weight,
    _result,
)
from .conv2d import conv2d_nhwc, pack_weight
from .conv2d_dgrad import conv2d_dgrad_nhwc, pack_weight_dgrad
from .conv2d_wgrad import conv2d_wgrad_nhwc

__all__ = ["resblock_backward_nhwc"]


def resblock_backward_nhwc(grad_out, x, w1, b1, w2, kernel_size: int, res_scale: float = 1.0, *,
                           needs=(True, True, True, True, True), dw_dtype=None, db_dtype=torch.float32,
                           dx_out=None, dw1_out=None, db1_out=None, dw2_out=None, db2_out=None):
    """Gradients of the residual block  y = x + res_scale * (conv2(relu(conv1(x) + b1)) + b2).

    grad_out: (N, H, W, C) contiguous NHWC, x's dtype; x: the block input, (N, H, W, C),
    float32 / float16 / bfloat16; w1, w2: (C, C, KS, KS) in x's dtype; b1: (C,) float32 or None
    (read for the recompute; b2 is never read). kernel_size 3 or 5.
    needs: which of (dx, dW1, db1, dW2, db2) to compute; the others come back as None.
    Returns the 5-tuple; dx in x's dtype, dW* in dw_dtype (default x's dtype), db* in db_dtype.

    Only x is needed from the forward: h = relu(conv1(x) + b1) is recomputed here (one forward
    conv), then wgrad(h, dy), dgrad of conv2 with the h > 0 mask in its epilogue, wgrad(x, dh), and
    dx = dgrad of conv1 + dy (the forward kernel's skip epilogue). Per pixel (C = 64, 3x3):
    5 x 73,728 FLOPs; transient buffers h and dh, (N, H, W, C) each, freed on return.
    """
    _check_activation("x", x)
    ks = _check_kernel_size(kernel_size, (3, 5))
    n, h, w, c = x.shape
    _check_weight("w1", w1, x, ks, c_out=c, c_in=c)
    _check_weight("w2", w2, x, ks, c_out=c, c_in=c)
    _check_activation("grad_out", grad_out)
    if tuple(grad_out.shape) != tuple(x.shape) or grad_out.dtype != x.dtype:
        raise ValueError(
            f"grad_out must be {tuple(x.shape)} {x.dtype}, got {tuple(grad_out.shape)} {grad_out.dtype}"
        )
    if b1 is not None:
        _check_vector("b1", b1, c)
    _check_same_device(x, grad_out=grad_out, w1=w1, b1=b1, w2=w2)
    need_dx, need_dw1, need_db1, need_dw2, need_db2 = (bool(v) for v in needs)
    dx = dw1 = db1 = dw2 = db2 = None
    if need_dx:
        dx = _result("dx_out", dx_out, tuple(x.shape), x.dtype, x.device, dict(x=x, grad_out=grad_out))
    if not any((need_dx, need_dw1, need_db1, need_dw2, need_db2)):
        return dx, dw1, db1, dw2, db2
    hid = conv2d_nhwc(x, pack_weight(w1), b1, ks, relu=True)  # recomputed, never saved
    wkw = dict(dw_dtype=dw_dtype, db_dtype=db_dtype)
    if need_dw2 or need_db2:
        dw2, db2 = conv2d_wgrad_nhwc(hid, grad_out, ks, res_scale=res_scale, need_dw=need_dw2, need_db=need_db2,
                                     dw_out=dw2_out, db_out=db2_out, **wkw)
    if need_dx or need_dw1 or need_db1:
        dh = conv2d_dgrad_nhwc(grad_out, w2, ks, res_scale=res_scale, input_mask=hid)
        del hid
        if need_dw1 or need_db1:
            dw1, db1 = conv2d_wgrad_nhwc(x, dh, ks, need_dw=need_dw1, need_db=need_db1,
                                         dw_out=dw1_out, db_out=db1_out, **wkw)
        if need_dx:
            conv2d_nhwc(dh, pack_weight_dgrad(w1), None, ks, skip=grad_out, out=dx)
    return dx, dw1, db1, dw2, db2
