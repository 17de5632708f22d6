"""What every fused op shares: argument checks, layout and autocast helpers.

Tensors are logically NCHW; the ops keep them channels-last in memory (NHWC), which is
what the Triton kernels read as (N, H, W, C) views and what oneDNN/cuDNN run fastest.
"""
from __future__ import annotations

import contextlib

import torch

CL = torch.channels_last


def check_conv_args(x, weight, bias, in_shift, skip, shuffle) -> None:
    """ValueError/TypeError naming the argument of fastsr::conv2d that is wrong."""
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got {x.dim()} dims {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] not in (1, 3, 5):
        raise ValueError(f"weight must be (Cout, Cin, k, k) with k in 1/3/5, got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects Cin={weight.shape[1]}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if min(x.shape[1:]) == 0:  # an empty batch is fine (empty output); an empty image is not
        raise ValueError(f"x must have at least one channel, row and column, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("in_shift", in_shift), ("skip", skip)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    cout = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"bias must be ({cout},), got {tuple(bias.shape)}")
    if in_shift is not None and tuple(in_shift.shape) != (x.shape[1],):
        raise ValueError(f"in_shift must be ({x.shape[1]},), got {tuple(in_shift.shape)}")
    if shuffle not in (1, 2, 3) or cout % (shuffle * shuffle):
        raise ValueError(f"shuffle must be 1, 2 or 3 dividing Cout={cout} by shuffle^2, got {shuffle}")
    if skip is not None:
        if shuffle != 1:
            raise ValueError("skip cannot be combined with shuffle > 1")
        want = (x.shape[0], cout, x.shape[2], x.shape[3])
        if tuple(skip.shape) != want or skip.dtype != x.dtype:
            raise ValueError(f"skip must be {want} {x.dtype}, got {tuple(skip.shape)} {skip.dtype}")


def check_block_args(x, w1, b1, w2, b2) -> None:
    """ValueError naming the argument of fastsr::resblock that is wrong."""
    check_conv_args(x, w1, b1, None, None, 1)
    c = x.shape[1]
    if w1.shape[0] != c or tuple(w2.shape) != tuple(w1.shape):
        raise ValueError(f"a residual block maps C -> C: x has C={c}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if b2 is not None and tuple(b2.shape) != (c,):
        raise ValueError(f"b2 must be ({c},), got {tuple(b2.shape)}")


def autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def autocast_off(device: torch.device):
    """A context with autocast off on `device` (a no-op where the device has no autocast)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if autocast_available(kind) else contextlib.nullcontext()


def autocast_args(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """(x, *tensors) cast to the autocast dtype when torch.autocast is on for x's device, as
    aten casts a convolution's input and weight; biases stay as given (the kernels add them
    in fp32). The ops themselves run with autocast off."""
    kind = x.device.type
    if not (x.is_floating_point() and autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, *tensors))


def out_shape(x: torch.Tensor, cout: int, shuffle: int) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    return (n, cout // (shuffle * shuffle), h * shuffle, w * shuffle)


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logical -> (N, H, W, C) contiguous; free when t is channels-last."""
    return t.permute(0, 2, 3, 1).contiguous()


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as FakeTensor


def bypass_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may run the op's body directly instead of through the registered op.

    The registration is what torch.compile (tracing), autograd (recording) and tensor
    subclasses (fake tensors) need; a plain eager call without gradients needs none of it,
    and the dispatcher's Python layers cost ~30 us per op, which dominates small inputs.
    The same implementation runs either way."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN and not (grad and t.requires_grad)) for t in tensors)
