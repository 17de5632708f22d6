"""MATLAB-compatible bicubic ``imresize`` in pure PyTorch, plus ``modcrop``.

Super-resolution papers make their LR inputs and bicubic baselines with MATLAB's
``imresize(img, scale, 'bicubic')``. Its antialiasing, coordinate mapping, symmetric
edge handling and uint8 rounding all move PSNR by tenths of a dB, so each of them is
reproduced here rather than approximated with ``torch.nn.functional.interpolate``.

Each spatial dimension is resized by one dense ``(out, in)`` weight matrix (mostly
zeros, a band of ``ceil(4 / scale) + 2`` taps per row), applied with a matmul: batched,
and on whatever device the image lives on. Where that matrix would be large (a long side:
a 65,000-pixel column doubled needs 68 GB of it), the band is applied tap by tap instead,
in memory proportional to the output; BLAS makes the matmul faster below that.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["imresize", "modcrop", "resize_weights"]

Tensor = torch.Tensor


def _cubic(x: Tensor) -> Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    outer = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return inner + outer


def _contributions(in_length: int, out_length: int, scale: float, antialias: bool) -> tuple[Tensor, Tensor]:
    """MATLAB's ``contributions``: per output pixel, its input indices and weights.

    Returns ``(weights, indices)``, both ``(out_length, P)``; weights float64, indices
    int64 and 0-based, already mirrored into ``[0, in_length)``.
    """
    kernel_width = 4.0
    if scale < 1 and antialias:
        # Stretching the kernel by 1/scale makes it a low-pass filter at the new rate.
        def h(x: Tensor) -> Tensor:
            return scale * _cubic(scale * x)

        kernel_width = kernel_width / scale
    else:
        h = _cubic

    # 1-based throughout, as in MATLAB, so the mirroring formula below is verbatim.
    x = torch.arange(1, out_length + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - kernel_width / 2)
    taps = math.ceil(kernel_width) + 2
    indices = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]
    weights = h(u[:, None] - indices)
    weights = weights / weights.sum(dim=1, keepdim=True)

    # Symmetric padding: aux = [1:in_length, in_length:-1:1] indexed cyclically, which
    # repeats the edge pixel (…, 2, 1, 1, 2, …) instead of reflecting about it.
    aux = torch.cat([torch.arange(1, in_length + 1), torch.arange(in_length, 0, -1)])
    indices = aux[torch.remainder(indices.long() - 1, aux.numel())] - 1

    # MATLAB drops tap columns whose weight is zero for every output pixel; that does not
    # change the result here (they would add zeros), it only keeps P small.
    keep = (weights != 0).any(dim=0)
    return weights[:, keep], indices[:, keep]


def resize_weights(in_length: int, out_length: int, scale: float, antialias: bool = True) -> Tensor:
    """Dense ``(out_length, in_length)`` float64 CPU matrix of one 1-D MATLAB bicubic resize.

    Row ``i`` holds the weights of output pixel ``i``; mirrored taps that land on the
    same input pixel are summed, exactly as MATLAB accumulates them.
    """
    weights, indices = _contributions(in_length, out_length, scale, antialias)
    matrix = torch.zeros(out_length, in_length, dtype=torch.float64)
    matrix.scatter_add_(1, indices, weights)
    return matrix


@lru_cache(maxsize=32)
def _cached_weights(
    in_length: int, out_length: int, scale: float, antialias: bool, device: torch.device, dtype: torch.dtype
) -> Tensor:
    # Built in float64 on the CPU so every device and dtype starts from the same numbers.
    return resize_weights(in_length, out_length, scale, antialias).to(device=device, dtype=dtype)


# Dense weight matrices up to this many elements (128 MiB in float64); beyond, the band.
DENSE_MAX_ELEMENTS = 1 << 24


def _resize_dim(x: Tensor, dim: int, out_length: int, scale: float, antialias: bool) -> Tensor:
    """Resize x: (B, H, W) along dim 1 (rows) or 2 (columns) to out_length."""
    in_length = x.shape[dim]
    if in_length * out_length <= DENSE_MAX_ELEMENTS:
        weights = _cached_weights(in_length, out_length, scale, antialias, x.device, x.dtype)
        # (out, in) @ (B, in, W) -> (B, out, W);  (B, H, in) @ (in, out) -> (B, H, out)
        return torch.matmul(weights, x) if dim == 1 else torch.matmul(x, weights.T)
    weights, indices = _contributions(in_length, out_length, scale, antialias)
    weights, indices = weights.to(x.device, x.dtype), indices.to(x.device)
    shape = (1, -1, 1) if dim == 1 else (1, 1, -1)
    out = None
    for p in range(weights.shape[1]):  # mirrored taps on one pixel add up, as in the matrix
        term = x.index_select(dim, indices[:, p]).mul_(weights[:, p].view(shape))
        out = term if out is None else out.add_(term)
    return out


def _round_uint8(x: Tensor) -> Tensor:
    """Saturate to 0..255 and round half away from zero (values stay in x's float dtype)."""
    # After the clamp everything is non-negative, where floor(x + 0.5) is MATLAB's round;
    # torch.round would round halves to even.
    return torch.floor(x.clamp(0, 255) + 0.5)


def _check_args(img: object, scale: float | None, size: tuple[int, int] | None) -> None:
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"imresize: img must be a torch.Tensor, got {type(img).__name__}")
    if img.dim() not in (2, 3, 4):
        raise ValueError(
            f"imresize: img must have shape (H, W), (C, H, W) or (N, C, H, W), got {img.dim()} dims "
            f"with shape {tuple(img.shape)}"
        )
    if img.dtype != torch.uint8 and not img.dtype.is_floating_point:
        raise TypeError(f"imresize: img dtype must be torch.uint8 or floating point, got {img.dtype}")
    if img.shape[-1] == 0 or img.shape[-2] == 0:
        raise ValueError(f"imresize: img must have a non-empty H and W, got shape {tuple(img.shape)}")
    if (scale is None) == (size is None):
        given = "both" if scale is not None else "neither"
        raise ValueError(f"imresize: pass exactly one of scale= or size=, got {given}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"imresize: scale must be a positive number, got {scale!r}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"imresize: scale must be a positive finite number, got {scale!r}")
    if size is not None:
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)
        ):
            raise ValueError(f"imresize: size must be a pair of ints (out_h, out_w), got {size!r}")
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"imresize: size entries must be positive, got {tuple(size)}")


def imresize(
    img: Tensor,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
) -> Tensor:
    """Resize like MATLAB's ``imresize(img, scale_or_size, 'bicubic')``.

    Args:
        img: ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)``; ``torch.uint8`` (values
            0..255) or any floating dtype (any range). Only the last two dims resize.
        scale: factor for both spatial dims; the output is ``ceil(H * scale)`` by
            ``ceil(W * scale)``, as in MATLAB (e.g. ``1 / 4`` or ``3``).
        size: ``(out_h, out_w)`` instead of ``scale``; each dim then uses the scale
            ``out / in`` of its own.
        antialias: when downscaling, stretch the kernel by ``1 / scale`` (MATLAB's
            default ``'Antialiasing', true``).

    Returns:
        The resized tensor with the same leading dims, on img's device. uint8 in, uint8
        out: like MATLAB, each 1-D pass is rounded half away from zero and saturated to
        0..255 before the next one. Floating in, same floating dtype out, unclamped.
        uint8 and float64 are computed in float64, other floats in float32 (or their own
        dtype if wider).

    Raises:
        ValueError: both or neither of scale/size, a non-positive scale or size entry, or
            an img rank other than 2, 3 or 4.
        TypeError: img is not a tensor, or has an integer dtype other than uint8.
    """
    _check_args(img, scale, size)
    in_h, in_w = img.shape[-2], img.shape[-1]
    if scale is not None:
        scale_h = scale_w = float(scale)
        out_h, out_w = math.ceil(in_h * scale_h), math.ceil(in_w * scale_w)
    else:
        out_h, out_w = size
        scale_h, scale_w = out_h / in_h, out_w / in_w

    is_uint8 = img.dtype == torch.uint8
    if is_uint8 or img.dtype == torch.float64:
        work_dtype = torch.float64
    else:
        work_dtype = torch.promote_types(img.dtype, torch.float32)

    lead = img.shape[:-2]
    x = img.reshape(-1, in_h, in_w).to(work_dtype)

    # MATLAB resizes the dimension with the smallest scale first (a stable sort, so rows
    # first on ties). Shrinking first makes the second pass cheaper, and for uint8 it
    # decides where the intermediate rounding happens, so the order changes results.
    order = ("h", "w") if scale_h <= scale_w else ("w", "h")
    for dim in order:
        if dim == "h":
            x = _resize_dim(x, 1, out_h, scale_h, antialias)
        else:
            x = _resize_dim(x, 2, out_w, scale_w, antialias)
        if is_uint8:
            # MATLAB's imresizemex returns the input's class after each pass.
            x = _round_uint8(x)

    x = x.reshape(*lead, out_h, out_w)
    return x.to(torch.uint8) if is_uint8 else x.to(img.dtype)


def modcrop(img: Tensor, scale: int) -> Tensor:
    """Crop the last two dims down to multiples of ``scale``, keeping the top-left corner.

    Args:
        img: any tensor (or array) shaped ``(..., H, W)``.
        scale: positive int.

    Returns:
        A view ``img[..., :H - H % scale, :W - W % scale]``, same dtype and device.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
        raise ValueError(f"modcrop: scale must be a positive int, got {scale!r}")
    if len(img.shape) < 2:
        raise ValueError(f"modcrop: img must have at least 2 dims (..., H, W), got shape {tuple(img.shape)}")
    h, w = img.shape[-2], img.shape[-1]
    return img[..., : h - h % scale, : w - w % scale]
