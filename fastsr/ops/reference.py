"""Eager references of every fused op: the specification the kernels are tested against.

All tensors are logically NCHW (any memory format). These functions are deliberately
plain: one torch call per step of the math, in the order the fused kernels claim to do it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    in_shift: torch.Tensor | None = None,
    relu: bool = False,
    res_scale: float = 1.0,
    skip: torch.Tensor | None = None,
    shuffle: int = 1,
) -> torch.Tensor:
    """Conv (stride 1, "same" zero padding) with the fused epilogues, eagerly.

    x: (N, Cin, H, W); weight: (Cout, Cin, k, k); bias, in_shift: (Cout,), (Cin,) or None;
    skip: (N, Cout, H, W) or None. Returns (N, Cout/r^2, rH, rW) for shuffle r:
        pixel_shuffle(res_scale * act(conv(x - in_shift) + bias) + skip, r)
    in_shift is subtracted before the zero padding, which is what folding the mean shift
    into the head conv means (the official model subtracts the mean, then pads with zeros).
    """
    if in_shift is not None:
        x = x - in_shift.to(x.dtype).view(1, -1, 1, 1)
    y = F.conv2d(x, weight, None if bias is None else bias.to(x.dtype), padding=weight.shape[-1] // 2)
    if relu:
        y = torch.relu(y)
    if res_scale != 1.0:
        y = y * res_scale
    if skip is not None:
        y = y + skip
    if shuffle > 1 and y.shape[0] == 0:
        # aten's pixel_shuffle backward returns a wrongly shaped gradient for an empty batch.
        n, c, h, w = y.shape
        return y.reshape(n, c // (shuffle * shuffle), h * shuffle, w * shuffle)
    if shuffle > 1:
        y = F.pixel_shuffle(y, shuffle)
    return y


def resblock_ref(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    res_scale: float = 1.0,
) -> torch.Tensor:
    """EDSR residual block: x + res_scale * conv2(relu(conv1(x) + b1)) + b2). x: (N, C, H, W)."""
    h = conv2d_ref(x, w1, b1, relu=True)
    return conv2d_ref(h, w2, b2, res_scale=res_scale, skip=x)
