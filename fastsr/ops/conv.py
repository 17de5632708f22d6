"""The fused ops, registered with torch.library: `fastsr::conv2d` and `fastsr::resblock`.

Each op takes logically-NCHW tensors stored channels-last (NHWC in memory, so the Triton
kernels read them as (N, H, W, C) views without a copy) and returns channels-last
output. The `backend` argument picks the implementation ("triton" or "cpu"); the eager
specification is fastsr.ops.reference. Autograd: every op saves only its inputs (the fused
block recomputes its intermediate in backward); the gradients run on the forward's backend
-- Triton backward kernels for "triton", aten's (oneDNN's) convolution backward for "cpu"
(see `backward_backend`).
"""
from __future__ import annotations

import contextlib
from types import MappingProxyType
from typing import List, Optional

import torch
import torch.nn.functional as F

from fastsr.ops.reference import conv2d_ref, resblock_ref

CL = torch.channels_last
# What computes the gradients of an op, keyed by the backend its forward ran with (see
# `backward_backend` in the autograd section): "triton" -> the Triton backward kernels
# (kernels/conv2d_backward.py); "cpu" -> "aten", aten.convolution_backward (oneDNN, the
# CPU's fast path already) called directly on the saved inputs.
BACKWARD_BACKEND = MappingProxyType({"triton": "triton", "cpu": "aten"})


def _check_conv_args(x, weight, bias, in_shift, skip, shuffle) -> None:
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


def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def _autocast_off(device: torch.device):
    """A context with autocast off on `device` (a no-op where the device has no autocast)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if _autocast_available(kind) else contextlib.nullcontext()


def _out_shape(x: torch.Tensor, cout: int, shuffle: int) -> tuple[int, int, int, int]:
    n, _, h, w = x.shape
    return (n, cout // (shuffle * shuffle), h * shuffle, w * shuffle)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) logical -> (N, H, W, C) contiguous; free when t is channels-last."""
    return t.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- cpu backend


def _conv_cpu(x, weight, bias, in_shift=None, relu=False, res_scale=1.0, skip=None, shuffle=1):
    x = x.contiguous(memory_format=CL)
    if in_shift is not None:
        x = x - in_shift.to(x.dtype).view(1, -1, 1, 1)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=weight.shape[-1] // 2)
    # Epilogues in place on the fresh conv output: one extra read/write each, no new buffers.
    if relu:
        y.relu_()
    if skip is not None:
        if res_scale == 1.0:
            y.add_(skip)
        else:
            torch.add(skip, y, alpha=res_scale, out=y)  # skip + s*y in one pass
    elif res_scale != 1.0:
        y.mul_(res_scale)
    if shuffle > 1:
        y = F.pixel_shuffle(y, shuffle)
    return y.contiguous(memory_format=CL)


def _resblock_cpu(x, w1, b1, w2, b2, res_scale):
    h = _conv_cpu(x, w1, b1, relu=True)
    return _conv_cpu(h, w2, b2, res_scale=res_scale, skip=x.contiguous(memory_format=CL))


# ------------------------------------------------------------------------ triton backend


def _conv_triton(x, weight, bias, in_shift=None, relu=False, res_scale=1.0, skip=None, shuffle=1):
    from fastsr.kernels.conv2d import conv2d_nhwc, pack_weight

    out = conv2d_nhwc(
        _nhwc(x),
        pack_weight(weight.to(x.dtype)),
        None if bias is None else bias.float().contiguous(),
        weight.shape[-1],
        in_shift=None if in_shift is None else in_shift.float().contiguous(),
        relu=relu,
        res_scale=res_scale,
        skip=None if skip is None else _nhwc(skip),
        shuffle=shuffle,
    )
    return out.permute(0, 3, 1, 2)


def _resblock_triton(x, w1, b1, w2, b2, res_scale):
    from fastsr.kernels.conv2d import pack_weight
    from fastsr.kernels.resblock import resblock_nhwc, resblock_supported

    k = w1.shape[-1]
    if not resblock_supported(x.shape[1], k):  # two-kernel path: conv+ReLU, conv+scale+add
        h = _conv_triton(x, w1, b1, relu=True)
        return _conv_triton(h, w2, b2, res_scale=res_scale, skip=x)
    def bias(b):  # the one-launch kernel always adds a bias: a missing one is zeros
        return x.new_zeros(x.shape[1], dtype=torch.float32) if b is None else b.float().contiguous()

    out = resblock_nhwc(_nhwc(x), pack_weight(w1.to(x.dtype)), bias(b1), pack_weight(w2.to(x.dtype)), bias(b2),
                        k, res_scale)
    return out.permute(0, 3, 1, 2)


_CONV_IMPLS = {"cpu": _conv_cpu, "triton": _conv_triton}
_BLOCK_IMPLS = {"cpu": _resblock_cpu, "triton": _resblock_triton}


def _impl(table: dict, backend: str):
    try:
        return table[backend]
    except KeyError:
        raise ValueError(f"fused op backend must be one of {sorted(table)}, got {backend!r}") from None


# ------------------------------------------------------------------------ registration


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
) -> torch.Tensor:
    return _run_conv(x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend)


def _run_conv(x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend) -> torch.Tensor:
    """The body of fastsr::conv2d: checks, then the backend's implementation."""
    _check_conv_args(x, weight, bias, in_shift, skip, shuffle)
    with _autocast_off(x.device):  # dtypes are the caller's (see _autocast)
        return _impl(_CONV_IMPLS, backend)(x, weight, bias, in_shift, relu, res_scale, skip, shuffle)


@conv2d_op.register_fake
def _(x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend):
    _check_conv_args(x, weight, bias, in_shift, skip, shuffle)
    return x.new_empty(_out_shape(x, weight.shape[0], shuffle)).contiguous(memory_format=CL)


@torch.library.custom_op("fastsr::resblock", mutates_args=())
def resblock_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    res_scale: float,
    backend: str,
) -> torch.Tensor:
    return _run_block(x, w1, b1, w2, b2, res_scale, backend)


def _run_block(x, w1, b1, w2, b2, res_scale, backend) -> torch.Tensor:
    """The body of fastsr::resblock: checks, then the backend's implementation."""
    _check_block_args(x, w1, b1, w2, b2)
    with _autocast_off(x.device):
        return _impl(_BLOCK_IMPLS, backend)(x, w1, b1, w2, b2, res_scale)


def _check_block_args(x, w1, b1, w2, b2) -> None:
    _check_conv_args(x, w1, b1, None, None, 1)
    c = x.shape[1]
    if w1.shape[0] != c or tuple(w2.shape) != tuple(w1.shape):
        raise ValueError(f"a residual block maps C -> C: x has C={c}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}")
    if b2 is not None and tuple(b2.shape) != (c,):
        raise ValueError(f"b2 must be ({c},), got {tuple(b2.shape)}")


@resblock_op.register_fake
def _(x, w1, b1, w2, b2, res_scale, backend):
    _check_block_args(x, w1, b1, w2, b2)
    return x.new_empty(x.shape).contiguous(memory_format=CL)


# ---------------------------------------------------------------------------- autograd
# Every op saves only its inputs (the conv its x, weight, bias, in_shift -- not skip, whose
# gradient is the output's; the block its x and weights: conv1 + ReLU is recomputed). The
# gradients run on the backend the forward ran with:
#   "triton" -> the Triton backward kernels, through the ops fastsr::conv2d_backward and
#               fastsr::resblock_backward (registered with fake implementations, so AOT autograd
#               and torch.compile trace the backward without running it);
#   "cpu"    -> aten.convolution_backward (oneDNN's fast CPU path) called directly, with the
#               epilogues' backward (pixel unshuffle, res_scale, the block's ReLU mask and skip)
#               around it. Nothing but the block's conv1 + ReLU is recomputed; a conv with a
#               ReLU epilogue saves its output for the mask (when the output shows it: no skip,
#               no shuffle), else it is recomputed through the reference.


def backward_backend(forward_backend: str) -> str:
    """What computes the gradients of an op whose forward ran on `forward_backend`:
    "triton" (fused Triton backward kernels) or "aten" (aten.convolution_backward)."""
    try:
        return BACKWARD_BACKEND[forward_backend]
    except KeyError:
        raise ValueError(
            f"fused op backend must be one of {sorted(BACKWARD_BACKEND)}, got {forward_backend!r}"
        ) from None


def _grads(fn, inputs: tuple, grad_out: torch.Tensor, needs) -> tuple:
    """Eager gradients of fn(*inputs) for the inputs flagged in `needs` (None elsewhere)."""
    needs = [t is not None and bool(n) for t, n in zip(inputs, needs)]
    if not any(needs):
        return tuple(None for _ in inputs)
    if grad_out.shape[0] == 0:  # an empty batch: zero gradients, without running aten on it
        return _zero_grads(inputs, needs)
    with torch.enable_grad(), _autocast_off(grad_out.device):
        detached = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(inputs, needs)]
        out = fn(*detached)
        wrt = [t for t, n in zip(detached, needs) if n]
        got = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    return tuple(next(got) if n else None for n in needs)


def _zero_grads(inputs: tuple, needs) -> tuple:
    """The gradients of an empty batch: zeros for the inputs flagged in `needs`."""
    return tuple(torch.zeros_like(t) if t is not None and n else None for t, n in zip(inputs, needs))


def _in_shift_grad(dx: torch.Tensor, in_shift: torch.Tensor) -> torch.Tensor:
    """d in_shift = -(sum of dx over N, H, W): the shift is subtracted from every input pixel."""
    return dx.sum(dim=(0, 2, 3), dtype=torch.float32).neg().to(in_shift.dtype)


def _conv_grads_cpu(g, x, weight, need_x: bool, need_w: bool, need_b: bool) -> tuple:
    """(dx, dW, db) of a stride-1 "same" conv with output gradient g, by aten's convolution
    backward (oneDNN on the CPU): no forward is recomputed. x, weight: the conv's input and
    weight, in x's dtype; results in x's dtype (None where not needed)."""
    k = weight.shape[-1]
    bias_sizes = [weight.shape[0]] if need_b else None
    return torch.ops.aten.convolution_backward(
        g, x, weight, bias_sizes, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [need_x, need_w, need_b])


def _cast(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or like is None else t.to(like.dtype)


def _conv_backward_cpu(grad, x, weight, bias, in_shift, opts, needs, out=None) -> tuple:
    """Gradients of fastsr::conv2d on the "cpu" backend: (dx, dW, db, d_in_shift).

    out: the forward's output when it was saved for the ReLU mask (_relu_mask_from_output);
    a ReLU conv without it is recomputed through the reference."""
    need_x, need_w, need_b, need_s = (bool(n) and t is not None for n, t in zip(needs, (x, weight, bias, in_shift)))
    if opts["relu"] and out is not None:
        grad = grad * (out > 0)  # ReLU's backward; then the conv's as without an activation
    elif opts["relu"]:  # the ReLU mask needs the output: recompute it through the reference
        f = lambda x, weight, bias, in_shift: conv2d_ref(x, weight, bias, in_shift=in_shift, **opts)
        return _grads(f, (x, weight, bias, in_shift), grad, (need_x, need_w, need_b, need_s))
    if not (need_x or need_w or need_b or need_s):
        return None, None, None, None
    if grad.shape[0] == 0:
        return _zero_grads((x, weight, bias, in_shift), (need_x, need_w, need_b, need_s))
    g = grad if opts["shuffle"] == 1 else F.pixel_unshuffle(grad, opts["shuffle"])
    if opts["res_scale"] != 1.0:
        g = g * opts["res_scale"]
    xs = x if in_shift is None else x - in_shift.to(x.dtype).view(1, -1, 1, 1)
    g = g.to(x.dtype).contiguous(memory_format=CL)
    dx, dw, db = _conv_grads_cpu(g, xs.contiguous(memory_format=CL), weight.to(x.dtype),
                                 need_x or need_s, need_w, need_b)
    ds = _in_shift_grad(dx, in_shift) if need_s else None
    return (dx if need_x else None), _cast(dw, weight), _cast(db, bias), ds


def _block_backward_cpu(grad, x, w1, b1, w2, b2, res_scale: float, needs) -> tuple:
    """Gradients of fastsr::resblock on the "cpu" backend from its input alone: conv1 + ReLU
    is recomputed (one conv), then both convs' backward run directly (conv2's forward is
    not needed: its gradients depend only on its input and the output gradient)."""
    saved = (x, w1, b1, w2, b2)
    need_x, need_w1, need_b1, need_w2, need_b2 = (bool(n) and t is not None for n, t in zip(needs, saved))
    if not any((need_x, need_w1, need_b1, need_w2, need_b2)):
        return (None,) * 5
    if grad.shape[0] == 0:
        return _zero_grads(saved, (need_x, need_w1, need_b1, need_w2, need_b2))
    xc = x.contiguous(memory_format=CL)
    w1c, w2c = w1.to(x.dtype), w2.to(x.dtype)
    h = _conv_cpu(xc, w1c, b1, relu=True)
    g2 = (grad * res_scale if res_scale != 1.0 else grad).to(x.dtype).contiguous(memory_format=CL)
    need_h = need_x or need_w1 or need_b1
    dh, dw2, db2 = _conv_grads_cpu(g2, h, w2c, need_h, need_w2, need_b2)
    dx = dw1 = db1 = None
    if need_h:
        dh = dh.mul_(h > 0).contiguous(memory_format=CL)  # ReLU: h > 0 exactly where conv1 + b1 > 0
        dx1, dw1, db1 = _conv_grads_cpu(dh, xc, w1c, need_x, need_w1, need_b1)
        dx = grad.to(x.dtype) + dx1 if need_x else None  # the skip path adds the output gradient
    return dx, _cast(dw1, w1), _cast(db1, b1), _cast(dw2, w2), _cast(db2, b2)


def _take(outs, needs, like) -> list:
    """Spread the backward op's list of computed gradients over the inputs, cast to their dtypes."""
    it = iter(outs)
    return [next(it).to(t.dtype) if n else None for n, t in zip(needs, like)]


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
    from fastsr.kernels.conv2d_backward import conv2d_backward_nhwc

    dx, dw, db = conv2d_backward_nhwc(
        _nhwc(grad),
        _nhwc(x),
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
    return [t for t in (None if dx is None else dx.permute(0, 3, 1, 2), dw, db) if t is not None]


@conv2d_backward_op.register_fake
def _(grad, x, weight, bias, in_shift, relu, res_scale, shuffle, need_dx, need_dw, need_db):
    outs = []
    if need_dx:
        outs.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=CL))
    if need_dw:
        outs.append(weight.new_empty(weight.shape))
    if need_db and bias is not None:
        outs.append(bias.new_empty(bias.shape))
    return outs


@torch.library.custom_op("fastsr::resblock_backward", mutates_args=())
def resblock_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    res_scale: float,
    need_dx: bool,
    need_dw1: bool,
    need_db1: bool,
    need_dw2: bool,
    need_db2: bool,
) -> List[torch.Tensor]:  # typing.List: understood by every torch >= 2.6
    """Triton gradients of fastsr::resblock from its input alone: [dx, dW1, db1, dW2, db2],
    each only if asked for. dx channels-last in x's dtype, dW* in w1's dtype, db* float32."""
    from fastsr.kernels.conv2d_backward import resblock_backward_nhwc

    got = resblock_backward_nhwc(
        _nhwc(grad),
        _nhwc(x),
        w1.to(x.dtype),
        None if b1 is None else b1.float().contiguous(),
        w2.to(x.dtype),
        w1.shape[-1],
        res_scale,
        needs=(need_dx, need_dw1, need_db1, need_dw2, need_db2),
        dw_dtype=w1.dtype,
    )
    dx = got[0]
    return [t for t in (None if dx is None else dx.permute(0, 3, 1, 2), *got[1:]) if t is not None]


@resblock_backward_op.register_fake
def _(grad, x, w1, b1, w2, res_scale, need_dx, need_dw1, need_db1, need_dw2, need_db2):
    outs = []
    if need_dx:
        outs.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=CL))
    for need, w in ((need_dw1, w1), (need_db1, None), (need_dw2, w1), (need_db2, None)):
        if need:
            shape = w.shape if w is not None else w1.shape[:1]
            outs.append(torch.empty(shape, dtype=w1.dtype if w is not None else torch.float32, device=x.device))
    return outs


def _relu_mask_from_output(relu: bool, res_scale: float, skip, shuffle: int, backend: str) -> bool:
    """Whether the cpu backward reads the ReLU mask off the saved output (out > 0 exactly
    where conv + bias > 0): a ReLU conv with no skip, no shuffle and res_scale > 0. Saving the
    output is what eager autograd saves for its ReLU; the alternative recomputes the conv."""
    return backend == "cpu" and relu and skip is None and shuffle == 1 and res_scale > 0


def _conv_setup(ctx, inputs, output):
    x, weight, bias, in_shift, skip, relu, res_scale, shuffle, backend = inputs
    # Not skip: its gradient is the output's.
    ctx.mask_from_output = _relu_mask_from_output(relu, res_scale, skip, shuffle, backend)
    ctx.save_for_backward(x, weight, bias, in_shift, output if ctx.mask_from_output else None)
    ctx.opts = dict(relu=relu, res_scale=res_scale, shuffle=shuffle)
    ctx.backend = backend


def _conv_backward(ctx, grad):
    x, weight, bias, in_shift, out = ctx.saved_tensors
    need_x, need_w, need_b, need_s, need_skip = ctx.needs_input_grad[:5]
    opts = ctx.opts
    if backward_backend(ctx.backend) == "triton":
        need_b = need_b and bias is not None
        need_dx = need_x or (need_s and in_shift is not None)  # d in_shift = -sum of dx
        outs = conv2d_backward_op(grad, x, weight, bias, in_shift, opts["relu"], opts["res_scale"],
                                  opts["shuffle"], need_dx, need_w, need_b)
        dx, dw, db = _take(outs, (need_dx, need_w, need_b), (x, weight, bias))
        ds = _in_shift_grad(dx, in_shift) if need_s and in_shift is not None else None
        grads = (dx if need_x else None, dw, db, ds)
    else:  # skip is additive: it does not change these gradients
        grads = _conv_backward_cpu(grad, x, weight, bias, in_shift, opts, (need_x, need_w, need_b, need_s),
                                   out if ctx.mask_from_output else None)
    return (*grads, grad if need_skip else None, None, None, None, None)


conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def _block_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, res_scale, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)  # the block's input only: conv1+ReLU is recomputed
    ctx.res_scale = res_scale
    ctx.backend = backend


def _block_backward(ctx, grad):
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[:5]
    if backward_backend(ctx.backend) == "triton":
        x, w1, b1, w2, b2 = saved
        needs = tuple(bool(n) and t is not None for n, t in zip(needs, saved))
        outs = resblock_backward_op(grad, x, w1, b1, w2, ctx.res_scale, *needs)
        grads = _take(outs, needs, saved)
    else:
        grads = _block_backward_cpu(grad, *saved, ctx.res_scale, needs)
    return (*grads, None, None)


resblock_op.register_autograd(_block_backward, setup_context=_block_setup)


# ------------------------------------------------------------------------ public entry


def _autocast(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """(x, *tensors) cast to the autocast dtype when torch.autocast is on for x's device, as
    aten casts a convolution's input and weight; biases stay as given (the kernels add them
    in fp32). The ops themselves run with autocast off."""
    kind = x.device.type
    if not (x.is_floating_point() and _autocast_available(kind) and torch.is_autocast_enabled(kind)):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t if t is None or not t.is_floating_point() else t.to(dtype) for t in (x, *tensors))


def _bypass_dispatcher(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may run the op's body directly instead of through the registered op.

    The registration is what torch.compile (tracing), autograd (recording) and tensor
    subclasses (fake tensors) need; a plain eager call without gradients needs none of it,
    and the dispatcher's Python layers cost ~30 us per op, which dominates small inputs.
    The same implementation runs either way."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) in _PLAIN and not (grad and t.requires_grad)) for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as FakeTensor


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
    backend: str = "cpu",
) -> torch.Tensor:
    """Fused conv: pixel_shuffle(res_scale * act(conv(x - in_shift) + bias) + skip, shuffle).

    x: (N, Cin, H, W) float (channels-last storage avoids a copy); weight (Cout, Cin, k, k),
    k in {1, 3, 5}; returns (N, Cout/r^2, rH, rW), channels-last, dtype of x.
    backend "reference" runs fastsr.ops.reference.conv2d_ref.
    """
    x, weight, skip = _autocast(x, weight, skip)
    if backend == "reference":
        _check_conv_args(x, weight, bias, in_shift, skip, shuffle)
        return conv2d_ref(x, weight.to(x.dtype), bias, in_shift=in_shift, relu=relu, res_scale=res_scale,
                          skip=skip, shuffle=shuffle)
    args = (x, weight, bias, in_shift, skip, relu, float(res_scale), int(shuffle), backend)
    if _bypass_dispatcher(x, weight, bias, in_shift, skip):
        return _run_conv(*args)
    return conv2d_op(*args)


def resblock(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    res_scale: float = 1.0,
    *,
    backend: str = "cpu",
) -> torch.Tensor:
    """Fused residual block x + res_scale * (conv2(relu(conv1(x) + b1)) + b2); x: (N, C, H, W)."""
    x, w1, w2 = _autocast(x, w1, w2)
    if backend == "reference":
        _check_block_args(x, w1, b1, w2, b2)
        return resblock_ref(x, w1.to(x.dtype), b1, w2.to(x.dtype), b2, res_scale)
    args = (x, w1, b1, w2, b2, float(res_scale), backend)
    if _bypass_dispatcher(x, w1, b1, w2, b2):
        return _run_block(*args)
    return resblock_op(*args)
