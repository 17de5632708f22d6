"""The evaluation protocol of SR papers: PSNR and SSIM on the BT.601 Y channel.

Images are compared in 0..255 after shaving ``shave`` pixels at each border (papers use
the scale factor, the official EDSR code ``scale`` for benchmark sets). SSIM is the
original Wang et al. ``ssim_index.m``: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
K2 = 0.03, L = 255, 'valid' filtering, mean of the map, no automatic downsampling.
"""
from __future__ import annotations

import math

import torch

__all__ = ["full_range_luma", "psnr_y", "quantize", "rgb_to_y", "ssim_y"]

Tensor = torch.Tensor

# BT.601 "studio swing" luma for RGB in 0..1, as MATLAB's rgb2ycbcr: Y in 16..235.
_Y_OFFSET = 16.0
_Y_COEFFS = (65.481, 128.553, 24.966)

_SSIM_WIN = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_L = 255.0


def _float_dtype(img: Tensor) -> torch.dtype:
    # Integer images (uint8) and float64 go to float64; narrower floats at least float32.
    if not img.dtype.is_floating_point or img.dtype == torch.float64:
        return torch.float64
    return torch.promote_types(img.dtype, torch.float32)


def rgb_to_y(img: Tensor) -> Tensor:
    """BT.601 luma of an RGB image in 0..255.

    Args:
        img: ``(N, 3, H, W)`` or ``(3, H, W)`` RGB, uint8 or float, values 0..255. A
            1-channel ``(N, 1, H, W)`` / ``(1, H, W)`` image, or a bare ``(H, W)`` one,
            is taken as already gray/Y.

    Returns:
        Y, ``(N, 1, H, W)`` / ``(1, H, W)`` (or ``(H, W)`` for a 2-D input), in 16..235
        for in-range input; float64 for uint8/float64 input, else float32 or wider.
        Y is not rounded.
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"rgb_to_y: img must be a torch.Tensor, got {type(img).__name__}")
    dtype = _float_dtype(img)
    if img.dim() == 2:
        return img.to(dtype)
    if img.dim() not in (3, 4):
        raise ValueError(
            f"rgb_to_y: img must have shape (N, C, H, W), (C, H, W) or (H, W), got shape {tuple(img.shape)}"
        )
    channels = img.shape[-3]
    if channels == 1:
        return img.to(dtype)
    if channels != 3:
        raise ValueError(f"rgb_to_y: img must have 1 or 3 channels (dim -3), got {channels} in shape {tuple(img.shape)}")
    x = img.to(dtype)
    r, g, b = x.narrow(-3, 0, 1), x.narrow(-3, 1, 1), x.narrow(-3, 2, 1)
    return _Y_OFFSET + (_Y_COEFFS[0] * r + _Y_COEFFS[1] * g + _Y_COEFFS[2] * b) / 255.0


def full_range_luma(img: Tensor) -> Tensor:
    """BT.601 luma in 0..255 (not 16..235): 0.299 R + 0.587 G + 0.114 B, float64.

    img: ``(N, 3, H, W)`` or ``(3, H, W)`` RGB in 0..255. Gray copied into RGB (R = G = B)
    gives the gray back exactly; it is how a one-channel image's SR output (three channels
    from the network) is compared with its one-channel HR. Returns ``(N, 1, H, W)`` /
    ``(1, H, W)``."""
    return (rgb_to_y(img).to(torch.float64) - _Y_OFFSET) * (255.0 / 219.0)


def _y_pair(sr: Tensor, hr: Tensor, shave: int, name: str) -> tuple[Tensor, Tensor, bool]:
    """Y channels of sr and hr as float64 ``(N, 1, H', W')`` after shaving; flag unbatched."""
    for arg, value in (("sr", sr), ("hr", hr)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(value).__name__}")
    if sr.shape != hr.shape:
        raise ValueError(f"{name}: sr and hr must have the same shape, got {tuple(sr.shape)} and {tuple(hr.shape)}")
    if sr.dim() not in (2, 3, 4):
        raise ValueError(
            f"{name}: images must have shape (N, C, H, W), (C, H, W) or (H, W), got shape {tuple(sr.shape)}"
        )
    if isinstance(shave, bool) or not isinstance(shave, int) or shave < 0:
        raise ValueError(f"{name}: shave must be a non-negative int, got {shave!r}")
    h, w = sr.shape[-2], sr.shape[-1]
    if h - 2 * shave <= 0 or w - 2 * shave <= 0:
        raise ValueError(f"{name}: shave={shave} leaves nothing of a {h}x{w} image")

    unbatched = sr.dim() < 4
    ys = []
    for img in (sr, hr):
        y = rgb_to_y(img).to(torch.float64)
        if y.dim() == 2:
            y = y[None]
        if unbatched:
            y = y[None]
        ys.append(y[..., shave : h - shave, shave : w - shave])
    return ys[0], ys[1], unbatched


def psnr_y(sr: Tensor, hr: Tensor, shave: int, data_range: float = 255.0) -> Tensor:
    """PSNR in dB on the Y channel, per image, after shaving ``shave`` pixels per border.

    Args:
        sr, hr: same shape, ``(N, 3, H, W)`` / ``(3, H, W)`` RGB or ``(N, 1, H, W)`` /
            ``(1, H, W)`` / ``(H, W)`` gray, uint8 or float in 0..255. Quantize sr first
            (``quantize``) to follow the papers; float input is accepted as is.
        shave: border pixels dropped on each side before comparing (usually the scale).
        data_range: the peak value in the PSNR formula.

    Returns:
        float64 PSNR, shape ``(N,)`` for batched input, a 0-d tensor otherwise; ``inf``
        where the images are identical.
    """
    y_sr, y_hr, unbatched = _y_pair(sr, hr, shave, "psnr_y")
    mse = (y_sr - y_hr).pow(2).mean(dim=(-3, -2, -1))
    # mse == 0 divides to inf, which is the right answer for identical images.
    psnr = 10.0 * torch.log10(data_range**2 / mse)
    return psnr[0] if unbatched else psnr


def _gaussian_1d() -> Tensor:
    """1-D factor of ``fspecial('gaussian', 11, 1.5)``, float64 on the CPU, summing to 1."""
    radius = (_SSIM_WIN - 1) / 2
    x = torch.arange(_SSIM_WIN, dtype=torch.float64) - radius
    g = torch.exp(-(x**2) / (2 * _SSIM_SIGMA**2))
    # The 2-D window is the outer product of this with itself, and normalizing the 2-D sum
    # equals normalizing each factor. fspecial also zeroes entries below eps * max; at
    # sigma 1.5 over 11 taps none are that small.
    return g / g.sum()


def _valid_filter_matrix(n: int, g: Tensor, device: torch.device) -> Tensor:
    """``(n - 10, n)`` banded matrix M with ``(M @ x)[i] = sum_k g[k] x[i + k]``: 'valid' filtering."""
    m = torch.zeros(n - _SSIM_WIN + 1, n, dtype=g.dtype)
    for k in range(_SSIM_WIN):
        m.diagonal(k).fill_(g[k].item())
    # Built on the CPU and moved once, rather than 11 small fills on an accelerator.
    return m.to(device)


def ssim_y(sr: Tensor, hr: Tensor, shave: int) -> Tensor:
    """MATLAB ``ssim_index`` SSIM on the Y channel, per image, after shaving.

    Args:
        sr, hr: as in ``psnr_y`` (RGB or gray, uint8 or float, 0..255, same shape). After
            shaving each side must still be at least 11 pixels.
        shave: border pixels dropped on each side before comparing.

    Returns:
        float64 mean SSIM, shape ``(N,)`` for batched input, a 0-d tensor otherwise.
    """
    y_sr, y_hr, unbatched = _y_pair(sr, hr, shave, "ssim_y")
    if y_sr.shape[-2] < _SSIM_WIN or y_sr.shape[-1] < _SSIM_WIN:
        raise ValueError(
            f"ssim_y: after shave={shave} the images are {y_sr.shape[-2]}x{y_sr.shape[-1]}, "
            f"smaller than the {_SSIM_WIN}x{_SSIM_WIN} SSIM window"
        )
    c1 = (_SSIM_K1 * _SSIM_L) ** 2
    c2 = (_SSIM_K2 * _SSIM_L) ** 2

    # The Gaussian window is separable and symmetric, so filter2(window, x, 'valid') is
    # Mh @ x @ Mw^T with banded 1-D matrices. That is the same sum as a direct 11x11
    # conv2d, but float64 conv2d on the CPU is ~15x slower than these BLAS matmuls.
    g = _gaussian_1d()
    m_h = _valid_filter_matrix(y_sr.shape[-2], g, y_sr.device)
    m_w = _valid_filter_matrix(y_sr.shape[-1], g, y_sr.device)

    def filt(x: Tensor) -> Tensor:
        return m_h @ x @ m_w.T

    mu1, mu2 = filt(y_sr), filt(y_hr)
    e11, e22, e12 = filt(y_sr * y_sr), filt(y_hr * y_hr), filt(y_sr * y_hr)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = e11 - mu1_sq
    sigma2_sq = e22 - mu2_sq
    sigma12 = e12 - mu12
    ssim_map = ((2 * mu12 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    ssim = ssim_map.mean(dim=(-3, -2, -1))
    return ssim[0] if unbatched else ssim


def quantize(img: Tensor, rgb_range: float = 255) -> Tensor:
    """Snap to the 256 levels of an 8-bit image spanning 0..rgb_range (the official ``quantize``).

    Args:
        img: any shape, floating, values nominally 0..rgb_range.
        rgb_range: the value that maps to 255 (255 for 0..255 images, 1 for 0..1).

    Returns:
        Same shape and dtype: ``round(clamp(img * 255 / rgb_range, 0, 255)) * rgb_range / 255``.
        Rounding is torch's half-to-even, as in the official code.
    """
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"quantize: img must be a torch.Tensor, got {type(img).__name__}")
    if not math.isfinite(rgb_range) or rgb_range <= 0:
        raise ValueError(f"quantize: rgb_range must be a positive finite number, got {rgb_range!r}")
    pixel_range = 255 / rgb_range
    return img.mul(pixel_range).clamp(0, 255).round().div(pixel_range)
