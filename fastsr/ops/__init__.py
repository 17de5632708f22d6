"""The fused ops: `conv2d` (fastsr::conv2d) and `resblock` (fastsr::resblock).

One module per op (fastsr.ops.conv2d, fastsr.ops.resblock: the registered op, its fake,
autograd, backward op and public function), their implementations in fastsr.ops.backends,
the choice between them in fastsr.ops.dispatch, the eager specs in fastsr.ops.reference.
"""
from fastsr.ops.conv2d import conv2d
from fastsr.ops.resblock import resblock

__all__ = ["conv2d", "resblock"]
