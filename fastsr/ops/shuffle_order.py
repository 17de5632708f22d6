"""The shuffle order of an upsampler conv's output channels, shared by the aten backend and
the Triton kernels (this module needs no Triton).

PixelShuffle(r) sends conv channel c*r^2 + i*r + j to sub-pixel (i, j), channel c. In shuffle
order, position q = (i*r + j)*C/r^2 + c holds that channel, so each (i, j) group is C/r^2
consecutive positions that land in one output pixel's contiguous channels: the pixel shuffle
of a channels-last output becomes a copy of contiguous runs, and the kernels' stores and
gathers run along contiguous memory.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["shuffle_perm"]


@functools.lru_cache(maxsize=64)
def shuffle_perm(c_out: int, shuffle: int, device) -> torch.Tensor:
    """perm[q] = the conv output channel at shuffle-order position q (module docstring); int64,
    (c_out,), on `device`. Made once per (c_out, shuffle, device): building it is 4 small device
    ops, more launches than the gather that uses it. Never modified (indexing only reads it)."""
    r2 = shuffle * shuffle
    c_sh = c_out // r2
    return (torch.arange(c_sh, device=device)[None, :] * r2 + torch.arange(r2, device=device)[:, None]).reshape(-1)
