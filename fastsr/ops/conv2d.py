"""`fastsr::conv2d`: a conv with its epilogues fused, registered with torch.library.

    out = pixel_shuffle(res_scale * act(conv(x - in_shift) + bias) + skip, shuffle)

written in `out_dtype` (default x's dtype: the head reads the fp32 image and writes the
compute dtype's features, with no separate cast pass where the implementation can).

Takes logically-NCHW tensors stored channels-last (NHWC in memory, so the Triton kernels
read them as (N, H, W, C) views without a copy) and returns channels-last output. The
eager specification is fastsr.ops.reference.conv2d_ref. Which implementation runs is
fastsr.ops.dispatch's choice; the op's `backend` argument names it ("triton_conv", "aten",
"cpu") and `backward` says what may compute the gradients (a family, or "auto").

Autograd saves only the inputs (x, weight, bias, in_shift; not skip, whose gradient is the
output's). The gradients are a separate choice ("conv2d_backward"): the Triton backward
kernels through the op fastsr::conv2d_backward (registered with a fake, so AOT autograd
and torch.compile trace the backward without running it), or aten.convolution_backward
with the epilogues' backward around it (fastsr.ops.backends.aten).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from fastsr.ops import dispatch
from fastsr.ops.backends import aten
from fastsr.ops.backends import triton as triton_backend
from fastsr.ops.checks import CL, autocast_args, autocast_off, bypass_dispatcher, check_conv_args, out_shape
from fastsr.ops.reference import conv2d_ref

IMPLEMENTATIONS = {"triton_conv": triton_backend.conv, "aten": aten.conv, "cpu": aten.conv}


@torch.library.custom_op("fastsr::conv2d", mutates_args=())
def conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
    skip: Optional[torch.Tensor],
    relu: bool,
    res_scale: float,
    shuffle: int,
    backend: str,
    backward: str,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The registered op; `backend` an implementation name, `backward` the gradients' request,
    `out_dtype` the output's dtype (None: x's)."""
    return run_conv(x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend, out_dtype)


# Implementations that write another dtype than x's themselves; the others' output is cast.
WRITES_OUT_DTYPE = ("triton_conv",)


def run_conv(x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend, out_dtype=None) -> torch.Tensor:
    """The body of fastsr::conv2d: checks, then the implementation `backend` names."""
    check_conv_args(x, weight, bias, in_shift, skip, shuffle)
    check_out_dtype(out_dtype)
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"fastsr::conv2d implementation must be one of {sorted(IMPLEMENTATIONS)}, got {backend!r}")
    with autocast_off(x.device):  # dtypes are the caller's (see autocast_args)
        if backend in WRITES_OUT_DTYPE:
            return IMPLEMENTATIONS[backend](x, weight, bias, in_shift, relu, res_scale, skip, shuffle,
                                            out_dtype=out_dtype)
        y = IMPLEMENTATIONS[backend](x, weight, bias, in_shift, relu, res_scale, skip, shuffle)
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")


@conv2d_op.register_fake
def conv2d_fake(x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend, backward, out_dtype=None):
    check_conv_args(x, weight, bias, in_shift, skip, shuffle)
    check_out_dtype(out_dtype)
    return x.new_empty(out_shape(x, weight.shape[0], shuffle), dtype=out_dtype or x.dtype).contiguous(
        memory_format=CL)


# ---------------------------------------------------------------------------- backward


@torch.library.custom_op("fastsr::conv2d_backward", mutates_args=())
def conv2d_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    in_shift: Optional[torch.Tensor],
    relu: bool,
    res_scale: float,
    shuffle: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> List[torch.Tensor]:  # typing.List: understood by every torch >= 2.6
    """Triton gradients of fastsr::conv2d: [dx] + [dW] + [db], each only if asked for.

    dx is channels-last in x's dtype, dW in weight's dtype, db in bias's dtype."""
    got = triton_backend.conv_backward(grad, x, weight, bias, in_shift, relu, res_scale, shuffle,
                                       (need_dx, need_dw, need_db))
    return [t for t in got if t is not None]


@conv2d_backward_op.register_fake
def conv2d_backward_fake(grad, x, weight, bias, in_shift, relu, res_scale, shuffle, need_dx, need_dw, need_db):
    outs = []
    if need_dx:
        outs.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=CL))
    if need_dw:
        outs.append(weight.new_empty(weight.shape))
    if need_db and bias is not None:
        outs.append(bias.new_empty(bias.shape))
    return outs


def take(outs, needs, like) -> list:
    """Spread a backward op's list of computed gradients over the inputs, cast to their dtypes."""
    it = iter(outs)
    return [next(it).to(t.dtype) if n else None for n, t in zip(needs, like)]


def relu_mask_from_output(relu: bool, res_scale: float, skip, shuffle: int, backend: str) -> bool:
    """Whether the aten backward reads the ReLU mask off the saved output (out > 0 exactly
    where conv + bias > 0): an aten/cpu ReLU conv with no skip, no shuffle and res_scale > 0.
    Saving the output is what eager autograd saves for its ReLU; the alternative recomputes
    the conv. (A Triton forward saves nothing: its backward kernels recompute the mask.)"""
    return backend in ("aten", "cpu") and relu and skip is None and shuffle == 1 and res_scale > 0


def _setup(ctx, inputs, output):
    x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend, backward = inputs[:10]
    ctx.mask_from_output = relu_mask_from_output(relu, res_scale, skip, shuffle, backend)
    ctx.save_for_backward(x, weight, bias, in_shift, output if ctx.mask_from_output else None)
    ctx.opts = dict(relu=relu, res_scale=res_scale, shuffle=shuffle)
    ctx.backward = None if backward == "auto" else backward


def _backward(ctx, grad):
    x, weight, bias, in_shift, out = ctx.saved_tensors
    # An output written in another dtype: its gradient in x's, as a cast's backward gives it
    # (the gradients below are computed in x's dtype; skip has x's dtype too).
    grad = grad.to(x.dtype)
    need_x, need_w, need_b, need_s, need_skip = ctx.needs_input_grad[:5]
    opts = ctx.opts
    need_b = need_b and bias is not None
    need_s = need_s and in_shift is not None
    need_dx = need_x or need_s  # d in_shift = -sum of dx

    def triton_grads():
        outs = conv2d_backward_op(grad, x, weight, bias, in_shift, opts["relu"], opts["res_scale"],
                                  opts["shuffle"], need_dx, need_w, need_b)
        dx, dw, db = take(outs, (need_dx, need_w, need_b), (x, weight, bias))
        ds = aten.in_shift_grad(dx, in_shift) if need_s else None
        return (dx if need_x else None), dw, db, ds

    def aten_grads():  # skip is additive: it does not change these gradients
        return aten.conv_backward(grad, x, weight, bias, in_shift, opts, (need_x, need_w, need_b, need_s),
                                  out if ctx.mask_from_output else None)

    flags = (opts["relu"], opts["shuffle"], in_shift is not None, (need_dx, need_w, need_b))
    runs = {"triton": triton_grads, "aten": aten_grads}
    choice = dispatch.choose("conv2d_backward", dispatch.Signature.of("conv2d_backward", x, weight, flags),
                             ctx.backward, lambda name: runs[name])
    grads = runs[choice.name]()
    return (*grads, grad if need_skip else None, None, None, None, None, None, None)


conv2d_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------ public entry


def conv2d_choice(x, weight, bias=None, in_shift=None, skip=None, relu=False, shuffle=1,
                  backend: str | None = None, out_dtype: torch.dtype | None = None) -> dispatch.Choice:
    """The implementation conv2d(...) would run for these inputs (fastsr.ops.dispatch)."""
    flags = (relu, skip is not None, shuffle, in_shift is not None)
    if out_dtype is not None and out_dtype != x.dtype:
        flags += (str(out_dtype).replace("torch.", ""),)  # only then: other keys stay as they were
    sig = dispatch.Signature.of("conv2d", x, weight, flags)

    def make_run(name: str):  # fresh data of the real shapes; the real weights
        fresh = torch.randn_like(x)
        fresh_skip = None if skip is None else torch.randn_like(skip)
        return lambda: run_conv(fresh, weight, bias, in_shift, fresh_skip, relu, 1.0, shuffle, name, out_dtype)

    return dispatch.choose("conv2d", sig, backend, make_run)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    in_shift: torch.Tensor | None = None,
    relu: bool = False,
    res_scale: float = 1.0,
    skip: torch.Tensor | None = None,
    shuffle: int = 1,
    backend: str | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fused conv: pixel_shuffle(res_scale * act(conv(x - in_shift) + bias) + skip, shuffle).

    x: (N, Cin, H, W) float (channels-last storage avoids a copy); weight (Cout, Cin, k, k),
    k in {1, 3, 5}; returns (N, Cout/r^2, rH, rW), channels-last, in out_dtype (default x's
    dtype; the Triton head kernel writes it directly, other implementations cast).
    backend: None (the measured choice, fastsr.ops.dispatch), a family ("triton", "aten",
    "cpu", "reference": its implementations only) or an implementation name.
    """
    x, weight, skip = autocast_args(x, weight, skip)
    check_conv_args(x, weight, bias, in_shift, skip, shuffle)
    with torch.no_grad():  # choosing (and timing) records nothing
        choice = conv2d_choice(x, weight, bias, in_shift, skip, relu, shuffle, backend, out_dtype)
    return apply_conv(choice, backward_request(backend), x, weight, bias, in_shift=in_shift, relu=relu,
                      res_scale=res_scale, skip=skip, shuffle=shuffle, out_dtype=out_dtype)


def backward_request(backend: str | None) -> str:
    """What may compute the gradients of an op called with `backend`: "auto" (a separate
    measured choice) when the forward was chosen automatically, else that family only."""
    if backend is None:
        return "auto"
    if backend in dispatch.BACKENDS:
        return backend
    if backend not in dispatch.FAMILY:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS} or an implementation name "
                         f"({', '.join(sorted(dispatch.FAMILY))}), got {backend!r}")
    return dispatch.FAMILY[backend]


def apply_conv(choice: dispatch.Choice, backward: str, x, weight, bias=None, *, in_shift=None, relu=False,
               res_scale=1.0, skip=None, shuffle=1, out_dtype=None) -> torch.Tensor:
    """conv2d with the implementation already chosen (checked inputs, dtypes final)."""
    if out_dtype == x.dtype:
        out_dtype = None
    if choice.name == "reference":
        check_out_dtype(out_dtype)
        y = conv2d_ref(x, weight.to(x.dtype), bias, in_shift=in_shift, relu=relu, res_scale=res_scale,
                       skip=skip, shuffle=shuffle)
        return y if out_dtype is None else y.to(out_dtype)
    args = (x, weight, bias, in_shift, skip, relu, float(res_scale), int(shuffle), choice.name, backward)
    if bypass_dispatcher(x, weight, bias, in_shift, skip):
        return run_conv(*args[:-1], out_dtype)
    return conv2d_op(*args, out_dtype)


__all__ = ["IMPLEMENTATIONS", "WRITES_OUT_DTYPE", "apply_conv", "check_out_dtype", "backward_request", "conv2d", "conv2d_backward_op", "conv2d_choice",
           "conv2d_op", "run_conv"]
