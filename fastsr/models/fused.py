"""The fused forward of EDSR/MDSR: the same network as a sequence of fused ops.

    head   conv(x - mean)               mean shift folded into the head's input (in_shift)
    blocks resblock(...)                MDSR's 5x5 pre-processing blocks, then the body
    body   conv(r) + skip               the conv after the blocks, global skip in its epilogue
    up     conv + pixel shuffle         shuffle written by the conv (x4 = two x2 stages)
    tail   conv + (bias + mean)         add_mean folded into the tail bias

The folded weights ("plan") are derived from the live parameters with differentiable
ops, so training sees every update. Without gradients the plan is cached, keyed by the
parameters' storage and version counters: an optimizer step (or load_state_dict)
changes a version, so a stale plan is never used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastsr.errors import BackendUnavailable
from fastsr.ops.conv2d import apply_conv, backward_request, conv2d_choice
from fastsr.ops.dispatch import choose_backend
from fastsr.ops.resblock import apply_block, resblock_choice

Conv = tuple[torch.Tensor, torch.Tensor]  # (weight, bias)


@dataclass
class FusedPlan:
    """Folded weights for one compute dtype and device."""

    head: Conv
    in_shift: torch.Tensor          # (3,) fp32: subtracted from the input inside the head conv
    pre: list[list[tuple[Conv, Conv]]]   # per scale index: the 5x5 blocks (empty for EDSR)
    body: list[tuple[Conv, Conv]]
    body_last: Conv
    up: list[list[tuple[Conv, int]]]     # per scale index: (conv, shuffle) stages
    tail: Conv
    out_shift: torch.Tensor | None  # (3,) io-dtype mean added after the tail (low-precision compute only)
    res_scale: float


def kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """w: (Cout, Cin, k, k) -> the same values, stored (k, k, Cin, Cout) in memory.

    That is the Triton kernels' packed layout (fastsr.kernels.conv2d.pack_weight), so
    packing the plan's weights inside each op call becomes a free view instead of a copy
    kernel per conv per forward."""
    return w.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _plan_weight(w: torch.Tensor) -> torch.Tensor:
    # On CUDA (the Triton backend) the kernels' layout; on the CPU oneDNN wants the usual one.
    return kernel_layout(w) if w.is_cuda else w


def _conv(m: nn.Conv2d, dtype: torch.dtype) -> Conv:
    return _plan_weight(m.weight.to(dtype)), m.bias


def build_plan(model: nn.Module, dtype: torch.dtype | None = None, io_dtype: torch.dtype | None = None) -> FusedPlan:
    """Fold the mean shifts and collect the weights of `model`.

    dtype: compute dtype of the body and upsampler; io_dtype: dtype of the head and tail
    convs (the input and output images). Both default to the parameters' dtype.
    """
    dtype = dtype or model.head[0].weight.dtype
    io_dtype = io_dtype or model.head[0].weight.dtype
    sub, add = model.sub_mean, model.add_mean
    # sub_mean(x) = A x + a with A = I in the official release; head(A x + a) with zero
    # padding applied after the shift == head'(x - s) with head' = head o A, s = -A^-1 a.
    a_sub = sub.weight.detach()[:, :, 0, 0].float()
    in_shift = -torch.linalg.solve(a_sub, sub.bias.detach().float())
    head_w = torch.einsum("ojhw,jc->ochw", model.head[0].weight, a_sub.to(model.head[0].weight.dtype))
    # add_mean(tail(y)) = B (W y + b) + c: a 1x1 conv after a conv composes into one conv.
    # In low precision the mean (~110) stays out of the bf16 bias, whose spacing there is
    # 0.5: it is added in io precision after the tail instead (3 channels, cheap).
    b_add = add.weight.detach()[:, :, 0, 0].to(model.tail_conv().weight.dtype)
    tail = model.tail_conv()
    tail_w = torch.einsum("oj,jchw->ochw", b_add, tail.weight)
    tail_b = b_add @ tail.bias
    out_shift = add.bias.detach().to(io_dtype)
    if dtype == io_dtype:
        tail_b, out_shift = tail_b + out_shift.to(tail_b.dtype), None

    def blocks(mods) -> list[tuple[Conv, Conv]]:
        return [(_conv(b.body[0], dtype), _conv(b.body[2], dtype)) for b in mods]

    n_scales = len(model.scales) if hasattr(model, "scales") else 1
    ups = []
    for s in range(n_scales):
        stages = model.upsampler(s)
        convs = [m for m in stages if isinstance(m, nn.Conv2d)]
        shuffle = 3 if stages.scale == 3 else 2
        ups.append([(_conv(c, dtype), shuffle) for c in convs])
    return FusedPlan(
        head=(_plan_weight(head_w.to(io_dtype)), model.head[0].bias),
        in_shift=in_shift,
        pre=[blocks(model.pre_blocks(s)) for s in range(n_scales)],
        body=blocks(list(model.body)[:-1]),
        body_last=_conv(model.body[-1], dtype),
        up=ups,
        tail=(_plan_weight(tail_w.to(dtype)), tail_b),
        out_shift=out_shift,
        res_scale=model.res_scale,
    )


def weights_key(model: nn.Module) -> tuple:
    """Changes whenever a parameter does: each one's storage and version counter (bumped by
    in-place updates: optimizer steps, load_state_dict, .add_ under no_grad)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def get_plan(model: nn.Module, dtype: torch.dtype, io_dtype: torch.dtype) -> FusedPlan:
    """The plan for this forward: rebuilt while gradients flow, cached otherwise."""
    params = list(model.parameters())
    # Inference tensors (parameters created under inference_mode) have no version counter
    # to key a cache on, so their plan is rebuilt each call, like a training step's.
    if any(p.is_inference() for p in params) or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        return build_plan(model, dtype, io_dtype)
    key = (dtype, io_dtype) + weights_key(model)
    cached = getattr(model, "_plan_cache", None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build_plan(model, dtype, io_dtype))
        model._plan_cache = cached
    return cached[1]


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast asks for on `device`, or None when autocast is off there."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def recomputes(model: nn.Module, backend: str) -> bool:
    """Whether a training forward of `model` on `backend` recomputes in backward (see
    fused_forward): model.recompute, or when that is None, on every backend but "cpu"
    (the GPU path, and the Triton interpreter standing in for it, keep the lean default)."""
    choice = getattr(model, "recompute", None)
    return backend != "cpu" if choice is None else bool(choice)


class _Layers:
    """Runs the network's convs and blocks through the chooser, recording what ran.

    `plan`: one mapping per conv or block layer, in execution order: "layer" (its module
    name, e.g. "body.3"), "implementation" (e.g. "triton_block", "aten", "cpu"), "backend"
    (its family), and "times_ms" when timing chose it."""

    def __init__(self, model: nn.Module, requested: str | None):
        self.requested, self.backward = requested, backward_request(requested)
        self.names = _layer_names(model)
        self.plan: list[dict] = []

    def _record(self, module: nn.Module, choice) -> None:
        entry = {"layer": self.names[module], "implementation": choice.name, "backend": choice.family}
        if choice.times_ms is not None:
            entry["times_ms"] = dict(choice.times_ms)
        self.plan.append(entry)

    def conv(self, module: nn.Module, x: torch.Tensor, w: torch.Tensor, b, *, in_shift=None, relu=False,
             res_scale=1.0, skip=None, shuffle=1, out_dtype=None) -> torch.Tensor:
        with torch.no_grad():
            choice = conv2d_choice(x, w, b, in_shift, skip, relu, shuffle, self.requested, out_dtype)
        self._record(module, choice)
        return apply_conv(choice, self.backward, x, w, b, in_shift=in_shift, relu=relu, res_scale=res_scale,
                          skip=skip, shuffle=shuffle, out_dtype=out_dtype)

    def block(self, module: nn.Module, x: torch.Tensor, c1: Conv, c2: Conv, res_scale: float,
              saving: bool) -> torch.Tensor:
        """One residual block: the one-op block, or (saving) its two fused convs, whose
        autograd keeps conv1's output instead of recomputing it."""
        if saving:
            t = self.conv(module.body[0], x, *c1, relu=True)
            return self.conv(module.body[2], t, *c2, res_scale=res_scale, skip=x)
        with torch.no_grad():
            choice = resblock_choice(x, *c1, *c2, self.requested)
        self._record(module, choice)
        return apply_block(choice, self.backward, x, *c1, *c2, res_scale)

    def family(self) -> str:
        """The backend family that ran every layer, or "mixed"."""
        families = {entry["backend"] for entry in self.plan}
        return families.pop() if len(families) == 1 else "mixed"


def _layer_names(model: nn.Module) -> dict[nn.Module, str]:
    names = getattr(model, "_fused_layer_names", None)
    if names is None:
        names = {m: name for name, m in model.named_modules()}
        model._fused_layer_names = names
    return names


def _upsample_tail(layers: _Layers, plan: FusedPlan, modules: list[nn.Module], r: torch.Tensor,
                   scale_idx: int) -> torch.Tensor:
    for module, (conv, shuffle) in zip(modules, plan.up[scale_idx]):
        r = layers.conv(module, r, *conv, shuffle=shuffle)
    return layers.conv(modules[-1], r, *plan.tail)


def fused_forward(model: nn.Module, x: torch.Tensor, scale_idx: int) -> tuple[torch.Tensor, str]:
    """Run `model` on x: (N, 3, H, W) float through the fused ops. Returns (output, backend):
    the backend family that ran every layer ("triton", "aten", "cpu", "reference") or
    "mixed"; `model.plan` then lists each conv / block layer with its implementation.

    Each layer's implementation is fastsr.ops.dispatch's choice for its shapes (measured on
    CUDA; `model.backend_request` restricts it to one family).

    Everything after the head computes in `model.compute_dtype`, else in the autocast dtype
    when torch.autocast is on for x's device, else in x's dtype (weights are cast once per
    plan). The head conv, which reads the image itself, runs in x's dtype (0..255 minus the
    mean is not exact in bf16; it is ~1% of the FLOPs) and writes its features in the compute
    dtype, and the mean is added back in x's dtype. The output has x's dtype and is channels-last.

    With gradients and recomputation on (`model.recompute`, by default everywhere but the
    CPU), each block saves only its input (conv1 + ReLU is recomputed in backward) and the
    upsampler and tail are recomputed from their input (torch.utils.checkpoint): their outputs
    are F-maps at 2x-4x resolution, as large as 4-16 body activations, so keeping them would
    cost more memory than the whole fused body. With it off, a block runs as its two fused
    convs (conv1 + ReLU, then conv2 + res_scale + skip), which save conv1's output for
    backward, and nothing is checkpointed: eager autograd's memory, and no recomputed work.
    """
    requested = model.backend_request
    if requested == "openvino":
        raise BackendUnavailable("backend='openvino' runs CPU inference only: a CPU input, the model in eval "
                                 "mode, no gradients (torch.no_grad() or torch.inference_mode())")
    family = choose_backend(x, requested)  # a forced backend that cannot run x fails here, with every reason
    layers = _Layers(model, requested)
    compute = model.compute_dtype or autocast_dtype(x.device) or x.dtype
    # The dtypes are chosen above; inside, autocast must not recast the ops' arguments.
    with torch.autocast(x.device.type, enabled=False):
        plan = get_plan(model, compute, x.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        # The head reads the image in its dtype and writes the features in the compute dtype
        # (on the Triton backend in its own store: no separate cast pass over the F-map).
        h = layers.conv(model.head[0], x, *plan.head, in_shift=plan.in_shift.to(x.device), out_dtype=compute)
        saving = torch.is_grad_enabled() and not recomputes(model, family)
        for module, (c1, c2) in zip(model.pre_blocks(scale_idx), plan.pre[scale_idx]):
            h = layers.block(module, h, c1, c2, 1.0, saving)
        r = h
        for module, (c1, c2) in zip(list(model.body)[:-1], plan.body):
            r = layers.block(module, r, c1, c2, plan.res_scale, saving)
        r = layers.conv(model.body[-1], r, *plan.body_last, skip=h)
        ups = [m for m in model.upsampler(scale_idx) if isinstance(m, nn.Conv2d)] + [model.tail_conv()]
        if r.requires_grad and not saving:
            out = checkpoint(_upsample_tail, layers, plan, ups, r, scale_idx, use_reentrant=False)
        else:
            out = _upsample_tail(layers, plan, ups, r, scale_idx)
        if plan.out_shift is not None:
            out = out.to(x.dtype).add_(plan.out_shift.view(1, 3, 1, 1))
    # Recomputed in backward, the checkpointed upsampler and tail record themselves again.
    model.plan = layers.plan[: len(layers.plan)]
    return out, layers.family()


__all__ = ["FusedPlan", "autocast_dtype", "kernel_layout", "build_plan", "fused_forward", "get_plan", "recomputes", "weights_key"]
