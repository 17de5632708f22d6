"""Counting the bytes of tensors an operation creates, on any device (CPU included).

`TensorMemory` is a dispatch mode that tracks every tensor storage created inside it until
the storage is freed: `peak` is the most bytes alive at once, `live` what is still alive.
After a forward pass, `live` minus the output is what autograd keeps for backward (the
activation memory of a training step), including tensors torch.utils.checkpoint holds
for recomputation, which saved-tensor hooks do not see.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storages created inside the mode: `live` now and `peak` so far."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self._seen or st.nbytes() == 0:
                    continue
                self._seen.add(key)
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, st.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes


def activation_bytes(forward) -> int:
    """Bytes that `forward()` leaves alive besides its output: what autograd keeps for backward.

    forward: a callable returning the output tensor (N, C, H, W); its graph is freed after."""
    with TensorMemory() as mem:
        out = forward()
        kept = mem.live - out.untyped_storage().nbytes()
        del out
    return kept


__all__ = ["TensorMemory", "activation_bytes"]
