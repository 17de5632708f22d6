"""The aten implementation of the fused ops: forward and backward.

Forward: one aten convolution per conv (oneDNN on the CPU, cuDNN on CUDA) in channels-last,
with the epilogues (ReLU, res_scale, skip, pixel shuffle) applied in place on its fresh
output. Backward: aten.convolution_backward called directly on the saved inputs, with the
epilogues' backward around it (pixel unshuffle, res_scale, the ReLU mask, the skip); nothing
but the block's conv1 + ReLU is recomputed.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastsr.ops.backends import glibc_heap
from fastsr.ops.checks import CL, autocast_off
from fastsr.ops.reference import conv2d_ref
from fastsr.ops.shuffle_order import shuffle_perm


def _post_ops(x: torch.Tensor) -> bool:
    """Whether oneDNN's fused post-ops apply: a CPU fp32/bf16 conv with oneDNN present."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


# Weights in oneDNN's blocked layout, made once per weight tensor (and again after an
# in-place update: its version counter) instead of reordered inside every call. Keyed by
# the tensor's id with a weak reference to it: an entry is dropped when its tensor dies
# and only ever matches that very tensor, never a later one at the same address.
_PACKED: dict[int, tuple] = {}


def _packed(w: torch.Tensor, pad: list[int], x: torch.Tensor) -> torch.Tensor:
    """w (Cout, Cin, k, k), x's dtype, prepacked for oneDNN when that is safe (inference on
    plain tensors, not while torch.compile traces); else w as it is."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or type(w) not in (torch.Tensor, nn.Parameter):
        return w
    key = id(w)
    # Inference tensors keep no version counter; the only ones reaching here are the plan's
    # own casts and folds (fastsr.models.fused.build_plan under inference_mode), which
    # nothing updates in place: a new plan makes new tensors.
    version = -1 if w.is_inference() else w._version
    found = _PACKED.get(key)
    if found is None or found[0]() is not w or found[1] != version:
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.detach().to_mkldnn(), pad, [1, 1], [1, 1], 1,
                                                           list(x.shape))
        found = (weakref.ref(w, lambda _, key=key: _PACKED.pop(key, None)), version, packed)
        _PACKED[key] = found
    return found[2]


# Upsampler weights with their output channels in shuffle order (`shuffle_perm`), made once
# per weight tensor, keyed like _PACKED.
_SHUFFLE_ORDERED: dict[int, tuple] = {}


def _shuffle_ordered(w: torch.Tensor, r: int, x: torch.Tensor) -> torch.Tensor:
    """w[perm] for `shuffle_perm`; made once per weight where `_packed` keeps its packed form
    (the same conditions and the same keying: a fresh w[perm] per call would be packed
    again per call), indexed per call elsewhere (microseconds against the conv)."""
    if not _post_ops(x) or torch.is_grad_enabled() or torch.compiler.is_compiling() \
            or type(w) not in (torch.Tensor, nn.Parameter):
        return w[shuffle_perm(w.shape[0], r, w.device)]
    key = id(w)
    version = -1 if w.is_inference() else w._version
    found = _SHUFFLE_ORDERED.get(key)
    if found is None or found[0]() is not w or found[1] != version:
        ordered = w[shuffle_perm(w.shape[0], r, w.device)].contiguous()
        found = (weakref.ref(w, lambda _, key=key: _SHUFFLE_ORDERED.pop(key, None)), version, ordered)
        _SHUFFLE_ORDERED[key] = found
    return found[2]


def _shuffle_from_ordered(y: torch.Tensor, r: int) -> torch.Tensor:
    """PixelShuffle(r) of a channels-last conv output whose channels are in shuffle order
    (i, j, c): out[n, h*r + i, w*r + j, c] = y[n, h, w, (i*r + j)*C + c]. In NHWC memory that
    is a copy of runs of r*C contiguous elements (the j and c of one (h, w, i)), not the
    element-wise gather F.pixel_shuffle does on a channels-last tensor (measured: 33 ms
    against 72-84 ms for a 540x960 bf16 upsampler output on 2 cores). Returns channels-last."""
    n, cq, h, w = y.shape
    c = cq // (r * r)
    nhwc = y.permute(0, 2, 3, 1)  # a view: y is channels-last
    out = nhwc.reshape(n, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, c)
    return out.permute(0, 3, 1, 2)


def conv(x, weight, bias, in_shift=None, relu=False, res_scale=1.0, skip=None, shuffle=1):
    """fastsr::conv2d's math with an aten convolution; channels-last output in x's dtype.

    On the CPU (fp32, bf16) the two epilogues EDSR's body is made of run inside oneDNN's
    convolution primitive as post-ops (mkldnn::_convolution_pointwise, the ops Inductor's
    CPU backend uses): conv + ReLU, and conv + skip with res_scale folded into the weights
    and bias (res_scale * (W x + b) = (res_scale W) x + res_scale b), so the F-map is
    written once instead of written, read and written again by a separate pass.
    With shuffle > 1 the conv runs with its output channels in shuffle order, so the pixel
    shuffle is a copy of contiguous runs (`_shuffle_from_ordered`). A CPU output above
    glibc's mmap threshold first makes the process keep large buffers on the heap
    (fastsr.ops.backends.glibc_heap: page faults were half of a 1080p conv's time)."""
    x = x.contiguous(memory_format=CL)
    if x.device.type == "cpu" and (x.numel() // max(1, x.shape[1])) * weight.shape[0] * x.element_size() \
            >= glibc_heap.MMAP_THRESHOLD_MAX:
        glibc_heap.keep_large_allocations()
    if in_shift is not None:
        x = x - in_shift.to(x.dtype).view(1, -1, 1, 1)
    w, b = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    if shuffle > 1:
        w = _shuffle_ordered(w, shuffle, x)
        b = None if b is None else b[shuffle_perm(b.shape[0], shuffle, b.device)]
    pad = [weight.shape[-1] // 2] * 2
    if _post_ops(x) and skip is not None and not relu and shuffle == 1:
        if res_scale != 1.0:  # scaled per call: a fresh tensor, packed inside the primitive as before
            w, b = w * res_scale, None if b is None else b * res_scale
        else:
            w = _packed(w, pad, x)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, skip.contiguous(memory_format=CL), w, b, pad, [1, 1], [1, 1], 1, "add", None, None, [], None)
    if _post_ops(x) and (res_scale == 1.0 or not relu) and skip is None:
        fused_relu = relu and res_scale == 1.0
        y = torch.ops.mkldnn._convolution_pointwise(x, _packed(w, pad, x), b, pad, [1, 1], [1, 1], 1,
                                                    "relu" if fused_relu else "none", [], "")
        relu = relu and not fused_relu
    else:
        y = F.conv2d(x, w, b, padding=pad)
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
        y = _shuffle_from_ordered(y.contiguous(memory_format=CL), shuffle)
    return y.contiguous(memory_format=CL)


def resblock(x, w1, b1, w2, b2, res_scale):
    """fastsr::resblock as two aten convs: conv + ReLU, then conv + res_scale + skip."""
    h = conv(x, w1, b1, relu=True)
    return conv(h, w2, b2, res_scale=res_scale, skip=x.contiguous(memory_format=CL))


# --------------------------------------------------------------------------- backward


def grads_through(fn, inputs: tuple, grad_out: torch.Tensor, needs) -> tuple:
    """Eager gradients of fn(*inputs) for the inputs flagged in `needs` (None elsewhere)."""
    needs = [t is not None and bool(n) for t, n in zip(inputs, needs)]
    if not any(needs):
        return tuple(None for _ in inputs)
    if grad_out.shape[0] == 0:  # an empty batch: zero gradients, without running aten on it
        return zero_grads(inputs, needs)
    with torch.enable_grad(), autocast_off(grad_out.device):
        detached = [t.detach().requires_grad_(n) if t is not None else None for t, n in zip(inputs, needs)]
        out = fn(*detached)
        wrt = [t for t, n in zip(detached, needs) if n]
        got = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
    return tuple(next(got) if n else None for n in needs)


def zero_grads(inputs: tuple, needs) -> tuple:
    """The gradients of an empty batch: zeros for the inputs flagged in `needs`."""
    return tuple(torch.zeros_like(t) if t is not None and n else None for t, n in zip(inputs, needs))


def in_shift_grad(dx: torch.Tensor, in_shift: torch.Tensor) -> torch.Tensor:
    """d in_shift = -(sum of dx over N, H, W): the shift is subtracted from every input pixel."""
    return dx.sum(dim=(0, 2, 3), dtype=torch.float32).neg().to(in_shift.dtype)


def _conv_grads(g, x, weight, need_x: bool, need_w: bool, need_b: bool) -> tuple:
    """(dx, dW, db) of a stride-1 "same" conv with output gradient g, by aten's convolution
    backward: no forward is recomputed. x, weight: the conv's input and weight, in x's
    dtype; results in x's dtype (None where not needed)."""
    k = weight.shape[-1]
    bias_sizes = [weight.shape[0]] if need_b else None
    return torch.ops.aten.convolution_backward(
        g, x, weight, bias_sizes, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [need_x, need_w, need_b])


def _cast(t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None or like is None else t.to(like.dtype)


def conv_backward(grad, x, weight, bias, in_shift, opts, needs, out=None) -> tuple:
    """Gradients of fastsr::conv2d: (dx, dW, db, d_in_shift), each None where not needed.

    opts: relu, res_scale, shuffle. out: the forward's output when it was saved for the ReLU
    mask (see fastsr.ops.conv2d); a ReLU conv without it is recomputed through the reference."""
    need_x, need_w, need_b, need_s = (bool(n) and t is not None for n, t in zip(needs, (x, weight, bias, in_shift)))
    if opts["relu"] and out is not None:
        grad = grad * (out > 0)  # ReLU's backward; then the conv's as without an activation
    elif opts["relu"]:  # the ReLU mask needs the output: recompute it through the reference
        f = lambda x, weight, bias, in_shift: conv2d_ref(x, weight, bias, in_shift=in_shift, **opts)
        return grads_through(f, (x, weight, bias, in_shift), grad, (need_x, need_w, need_b, need_s))
    if not (need_x or need_w or need_b or need_s):
        return None, None, None, None
    if grad.shape[0] == 0:
        return zero_grads((x, weight, bias, in_shift), (need_x, need_w, need_b, need_s))
    g = grad if opts["shuffle"] == 1 else F.pixel_unshuffle(grad, opts["shuffle"])
    if opts["res_scale"] != 1.0:
        g = g * opts["res_scale"]
    xs = x if in_shift is None else x - in_shift.to(x.dtype).view(1, -1, 1, 1)
    g = g.to(x.dtype).contiguous(memory_format=CL)
    dx, dw, db = _conv_grads(g, xs.contiguous(memory_format=CL), weight.to(x.dtype), need_x or need_s, need_w, need_b)
    ds = in_shift_grad(dx, in_shift) if need_s else None
    return (dx if need_x else None), _cast(dw, weight), _cast(db, bias), ds


def resblock_backward(grad, x, w1, b1, w2, b2, res_scale: float, needs) -> tuple:
    """Gradients of fastsr::resblock from its input alone: (dx, dW1, db1, dW2, db2). conv1 +
    ReLU is recomputed (one conv), then both convs' backward run directly (conv2's forward
    is not needed: its gradients depend only on its input and the output gradient)."""
    saved = (x, w1, b1, w2, b2)
    need_x, need_w1, need_b1, need_w2, need_b2 = (bool(n) and t is not None for n, t in zip(needs, saved))
    if not any((need_x, need_w1, need_b1, need_w2, need_b2)):
        return (None,) * 5
    if grad.shape[0] == 0:
        return zero_grads(saved, (need_x, need_w1, need_b1, need_w2, need_b2))
    xc = x.contiguous(memory_format=CL)
    w1c, w2c = w1.to(x.dtype), w2.to(x.dtype)
    h = conv(xc, w1c, b1, relu=True)
    g2 = (grad * res_scale if res_scale != 1.0 else grad).to(x.dtype).contiguous(memory_format=CL)
    need_h = need_x or need_w1 or need_b1
    dh, dw2, db2 = _conv_grads(g2, h, w2c, need_h, need_w2, need_b2)
    dx = dw1 = db1 = None
    if need_h:
        dh = dh.mul_(h > 0).contiguous(memory_format=CL)  # ReLU: h > 0 exactly where conv1 + b1 > 0
        dx1, dw1, db1 = _conv_grads(dh, xc, w1c, need_x, need_w1, need_b1)
        dx = grad.to(x.dtype) + dx1 if need_x else None  # the skip path adds the output gradient
    return dx, _cast(dw1, w1), _cast(db1, b1), _cast(dw2, w2), _cast(db2, b2)
