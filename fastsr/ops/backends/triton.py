"""The Triton implementation of the fused ops (fastsr.kernels): forward and backward.

Every function takes logically-NCHW tensors stored channels-last and hands the kernels
(N, H, W, C) views of them (no copy); outputs come back as channels-last NCHW views.
The kernels import lazily: this module loads on machines without Triton.
"""
from __future__ import annotations

import torch

from fastsr.ops.checks import nhwc


def conv(x, weight, bias, in_shift=None, relu=False, res_scale=1.0, skip=None, shuffle=1, out_dtype=None):
    """fastsr::conv2d as one Triton kernel, the epilogues (shuffle included) in it, the output
    in out_dtype (default x's dtype).

    A conv whose KS*KS*Cin is at most 32 (the head: 3x3 on the image, 27) runs the head kernel
    (fastsr.kernels.conv2d_head: a padded 16-byte-pixel copy of the image, then its taps in
    unrolled tensor-core K steps, 3xTF32 for a float32 image, the features written in
    out_dtype). Every other conv runs conv2d_nhwc, cast
    after it where out_dtype differs from x's. The weight is packed per call (`pack_weight`): a
    free view of the fused plan's weights (stored in the kernels' layout), except for a shuffle
    conv, whose columns go in shuffle order: one gather (295 KB at EDSR-baseline's x2 upsampler)."""
    from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight
    from fastsr.kernels.conv2d_head import conv2d_head_nhwc, head_conv_supported

    k = weight.shape[-1]
    w = pack_weight(weight.to(x.dtype), shuffle)
    b = None if bias is None else bias.float().contiguous()
    s = None if in_shift is None else in_shift.float().contiguous()
    if head_conv_supported(x.shape[1], k, skip=skip, shuffle=shuffle):
        out = conv2d_head_nhwc(nhwc(x), w, b, k, in_shift=s, relu=relu, res_scale=res_scale, out_dtype=out_dtype)
        return out.permute(0, 3, 1, 2)
    out = conv2d_nhwc(nhwc(x), w, b, k, in_shift=s, relu=relu, res_scale=res_scale,
                      skip=None if skip is None else nhwc(skip), shuffle=shuffle).permute(0, 3, 1, 2)
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)


def block_supported(channels: int, kernel_size: int) -> bool:
    """Whether the one-launch block kernel takes this shape (its own declared limits)."""
    from fastsr.kernels.resblock import resblock_supported

    return resblock_supported(channels, kernel_size)


def resblock(x, w1, b1, w2, b2, res_scale):
    """fastsr::resblock as one Triton launch (conv1 + ReLU + conv2 + scale + skip)."""
    from fastsr.kernels.conv2d import pack_weight
    from fastsr.kernels.resblock import resblock_nhwc

    def bias(b):  # the one-launch kernel always adds a bias: a missing one is zeros
        return x.new_zeros(x.shape[1], dtype=torch.float32) if b is None else b.float().contiguous()

    out = resblock_nhwc(nhwc(x), pack_weight(w1.to(x.dtype)), bias(b1), pack_weight(w2.to(x.dtype)), bias(b2),
                        w1.shape[-1], res_scale)
    return out.permute(0, 3, 1, 2)


def resblock_convs(x, w1, b1, w2, b2, res_scale):
    """fastsr::resblock as two Triton convs: conv + ReLU, then conv + res_scale + skip."""
    h = conv(x, w1, b1, relu=True)
    return conv(h, w2, b2, res_scale=res_scale, skip=x)


def conv_backward(grad, x, weight, bias, in_shift, relu, res_scale, shuffle, needs) -> tuple:
    """Triton gradients of fastsr::conv2d: (dx, dW, db), None where `needs` says not.

    dx is channels-last in x's dtype, dW in weight's dtype, db in bias's dtype."""
    from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc

    need_dx, need_dw, need_db = needs
    dx, dw, db = conv2d_backward_nhwc(
        nhwc(grad),
        nhwc(x),
        weight.to(x.dtype),
        None if bias is None else bias.float().contiguous(),
        weight.shape[-1],
        in_shift=None if in_shift is None else in_shift.float().contiguous(),
        relu=relu,
        res_scale=res_scale,
        shuffle=shuffle,
        needs=(need_dx, need_dw, need_db and bias is not None),
        dw_dtype=weight.dtype,
        db_dtype=torch.float32 if bias is None else bias.dtype,
    )
    return (None if dx is None else dx.permute(0, 3, 1, 2)), dw, db


def resblock_backward(grad, x, w1, b1, w2, res_scale, needs) -> tuple:
    """Triton gradients of fastsr::resblock from its input alone: (dx, dW1, db1, dW2, db2),
    None where `needs` says not. dx channels-last in x's dtype, dW* in w1's dtype, db* fp32."""
    from fastsr.kernels.resblock_backward import resblock_backward_nhwc

    got = resblock_backward_nhwc(
        nhwc(grad),
        nhwc(x),
        w1.to(x.dtype),
        None if b1 is None else b1.float().contiguous(),
        w2.to(x.dtype),
        w1.shape[-1],
        res_scale,
        needs=tuple(needs),
        dw_dtype=w1.dtype,
    )
    dx = got[0]
    return (None if dx is None else dx.permute(0, 3, 1, 2), *got[1:])
