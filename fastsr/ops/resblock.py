"""`fastsr::resblock`: the EDSR residual block as one op, registered with torch.library.

    out = x + res_scale * (conv2(relu(conv1(x) + b1)) + b2)

Channels-last in and out, like fastsr::conv2d. Implementations (fastsr.ops.dispatch
chooses): "triton_block" (one Triton launch, the intermediate never written to DRAM as a
full map), "triton_convs" (two Triton convs), "aten" / "cpu" (two aten convs with in-place
epilogues). The eager specification is fastsr.ops.reference.resblock_ref.

Autograd saves only the block's input and weights; conv1 + ReLU is recomputed in backward,
which is a separate choice ("resblock_backward"): the Triton backward through the op
fastsr::resblock_backward (with a fake), or aten.convolution_backward.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from fastsr.ops import dispatch
from fastsr.ops.backends import aten
from fastsr.ops.backends import triton as triton_backend
from fastsr.ops.checks import CL, autocast_args, autocast_off, bypass_dispatcher, check_block_args
from fastsr.ops.conv2d import backward_request, take
from fastsr.ops.reference import resblock_ref

IMPLEMENTATIONS = {"triton_block": triton_backend.resblock, "triton_convs": triton_backend.resblock_convs,
                   "aten": aten.resblock, "cpu": aten.resblock}


@torch.library.custom_op("fastsr::resblock", mutates_args=())
def resblock_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    res_scale: float,
    backend: str,
    backward: str,
) -> torch.Tensor:
    """The registered op; `backend` an implementation name, `backward` the gradients' request."""
    return run_block(x, w1, b1, w2, b2, res_scale, backend)


def run_block(x, w1, b1, w2, b2, res_scale, backend) -> torch.Tensor:
    """The body of fastsr::resblock: checks, then the implementation `backend` names."""
    check_block_args(x, w1, b1, w2, b2)
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"fastsr::resblock implementation must be one of {sorted(IMPLEMENTATIONS)}, got {backend!r}")
    with autocast_off(x.device):
        return IMPLEMENTATIONS[backend](x, w1, b1, w2, b2, res_scale)


@resblock_op.register_fake
def resblock_fake(x, w1, b1, w2, b2, res_scale, backend, backward):
    check_block_args(x, w1, b1, w2, b2)
    return x.new_empty(x.shape).contiguous(memory_format=CL)


# ---------------------------------------------------------------------------- backward


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
    got = triton_backend.resblock_backward(grad, x, w1, b1, w2, res_scale,
                                           (need_dx, need_dw1, need_db1, need_dw2, need_db2))
    return [t for t in got if t is not None]


@resblock_backward_op.register_fake
def resblock_backward_fake(grad, x, w1, b1, w2, res_scale, need_dx, need_dw1, need_db1, need_dw2, need_db2):
    outs = []
    if need_dx:
        outs.append(torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=CL))
    for need, w in ((need_dw1, w1), (need_db1, None), (need_dw2, w1), (need_db2, None)):
        if need:
            shape = w.shape if w is not None else w1.shape[:1]
            outs.append(torch.empty(shape, dtype=w1.dtype if w is not None else torch.float32, device=x.device))
    return outs


def _setup(ctx, inputs, output):
    x, w1, b1, w2, b2, res_scale, backend, backward = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)  # the block's input only: conv1+ReLU is recomputed
    ctx.res_scale = res_scale
    ctx.backward = None if backward == "auto" else backward


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    x, w1, b1, w2, b2 = saved
    needs = tuple(bool(n) and t is not None for n, t in zip(ctx.needs_input_grad[:5], saved))

    def triton_grads():
        return take(resblock_backward_op(grad, x, w1, b1, w2, ctx.res_scale, *needs), needs, saved)

    def aten_grads():
        return aten.resblock_backward(grad, *saved, ctx.res_scale, needs)

    runs = {"triton": triton_grads, "aten": aten_grads}
    sig = dispatch.Signature.of("resblock_backward", x, w1, (needs,))
    choice = dispatch.choose("resblock_backward", sig, ctx.backward, lambda name: runs[name])
    return (*runs[choice.name](), None, None, None)


resblock_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------ public entry


def resblock_choice(x, w1, b1, w2, b2, backend: str | None = None) -> dispatch.Choice:
    """The implementation resblock(...) would run for these inputs (fastsr.ops.dispatch)."""
    sig = dispatch.Signature.of("resblock", x, w1)

    def make_run(name: str):  # fresh data of the real shapes; the real weights
        fresh = torch.randn_like(x)
        return lambda: run_block(fresh, w1, b1, w2, b2, 1.0, name)

    return dispatch.choose("resblock", sig, backend, make_run)


def resblock(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    res_scale: float = 1.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Fused residual block x + res_scale * (conv2(relu(conv1(x) + b1)) + b2).

    x: (N, C, H, W) float (channels-last storage avoids a copy); w1, w2: (C, C, k, k);
    returns (N, C, H, W) channels-last in x's dtype. backend: as fastsr.ops.conv2d.conv2d's.
    """
    x, w1, w2 = autocast_args(x, w1, w2)
    check_block_args(x, w1, b1, w2, b2)
    with torch.no_grad():
        choice = resblock_choice(x, w1, b1, w2, b2, backend)
    return apply_block(choice, backward_request(backend), x, w1, b1, w2, b2, res_scale)


def apply_block(choice: dispatch.Choice, backward: str, x, w1, b1, w2, b2, res_scale=1.0) -> torch.Tensor:
    """resblock with the implementation already chosen (checked inputs, dtypes final)."""
    if choice.name == "reference":
        return resblock_ref(x, w1.to(x.dtype), b1, w2.to(x.dtype), b2, res_scale)
    args = (x, w1, b1, w2, b2, float(res_scale), choice.name, backward)
    if bypass_dispatcher(x, w1, b1, w2, b2):
        return run_block(*args[:-1])
    return resblock_op(*args)


__all__ = ["IMPLEMENTATIONS", "apply_block", "resblock", "resblock_backward_op", "resblock_choice", "resblock_op", "run_block"]
