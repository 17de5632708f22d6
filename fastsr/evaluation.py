"""The evaluation protocol of SR papers, in one place: `fastsr eval`, training validation
and the training data's LR images all come through here.

One image, one scale s:

    HR  = modcrop(uint8 image, s)                      (top-left corner kept)
    LR  = MATLAB bicubic imresize(HR, size=HR/s), uint8 (`make_lr`; the C++ op when built)
    SR  = network(LR), quantized to the 256 levels of 0..255 (or MATLAB's uint8 bicubic)
    score the channel(s) the protocol names, `shave` pixels dropped per border:
        PSNR (dB, peak 255) and SSIM (Wang et al.'s ssim_index.m, fastsr.metrics)

Protocols by name (`PROTOCOLS`):

- ``paper`` (default): Y of BT.601 (16..235), shave = s; a one-channel (gray) image is
  scored on its own channel, as the MATLAB code behind the published tables does (copying
  gray into RGB and taking Y = 16 + 219/255 * gray would raise that image's PSNR by
  20 log10(255/219) = 1.32 dB: Set14's bridge.png).
- ``official``: what the EDSR-PyTorch code (and BasicSR) compute on benchmark sets: gray
  copied into RGB, then Y, shave = s.
- ``div2k``: the EDSR-PyTorch code on other sets (its training logs on DIV2K): RGB,
  shave = s + 6. SSIM is the mean of the three channels' SSIM (the official code reports
  none; this is BasicSR's convention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from fastsr.errors import FastSRError

__all__ = [
    "PROTOCOLS", "ImageScore", "Protocol", "SetScore", "evaluate_image", "get_protocol", "make_lr",
    "prepare_hr", "score", "summarize",
]

Tensor = torch.Tensor


@dataclass(frozen=True)
class Protocol:
    """How an SR result is scored: which channel(s), how much border is shaved."""

    name: str
    channel: str            # "y" (BT.601 luma) or "rgb"
    extra_shave: int        # shave = scale + extra_shave
    gray_own_channel: bool  # a one-channel image is scored on its gray values, not Y of an RGB copy
    description: str

    def shave(self, scale: int) -> int:
        return scale + self.extra_shave


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("paper", "y", 0, True, "Y (BT.601), shave = scale, gray images on their own channel, MATLAB bicubic LR"),
    Protocol("official", "y", 0, False, "EDSR-PyTorch benchmark: gray copied to RGB, Y (BT.601), shave = scale"),
    Protocol("div2k", "rgb", 6, False, "EDSR-PyTorch DIV2K: RGB, shave = scale + 6, MATLAB bicubic LR"),
)}


def get_protocol(name: str | Protocol) -> Protocol:
    """The protocol named `name` (one of PROTOCOLS); raises ValueError listing them."""
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}") from None


def min_size(scale: int, protocol: Protocol) -> int:
    """The smallest HR side (after modcrop) the protocol can score: SSIM's 11-pixel window
    must fit after shaving."""
    return 11 + 2 * protocol.shave(scale)


def prepare_hr(rgb: Tensor, scale: int, protocol: Protocol, what: str = "image") -> Tensor:
    """(3, H, W) float 0..255 (or uint8) -> uint8 (3, H', W') modcropped to `scale`.

    Raises FastSRError naming `what`, its size and the minimum when it is too small."""
    from fastsr.imresize import modcrop

    h, w = int(rgb.shape[-2]), int(rgb.shape[-1])
    need = min_size(scale, protocol)
    if (h - h % scale) < need or (w - w % scale) < need:
        raise FastSRError(
            f"{what}: {w}x{h} is too small for x{scale} under the {protocol.name} protocol "
            f"(at least {need}x{need} after cropping to a multiple of {scale}: SSIM's 11-pixel window "
            f"after shaving {protocol.shave(scale)})"
        )
    img = rgb if rgb.dtype == torch.uint8 else rgb.round().clamp(0, 255).to(torch.uint8)
    return modcrop(img, scale).contiguous()


def make_lr(hr: Tensor, scale: int) -> Tensor:
    """The protocol's degradation: MATLAB bicubic of the uint8 HR `hr` (..., H, W), cropped
    to multiples of `scale` first (a no-op after prepare_hr), to (H/s, W/s), uint8 rounded.
    The C++ op runs when the extension is built (fastsr.ext, identical output), else the
    PyTorch one."""
    from fastsr.ext import imresize_fast
    from fastsr.imresize import modcrop

    hr = modcrop(hr, scale).contiguous()
    h, w = hr.shape[-2:]
    # size= rather than scale=1/s: ceil(H * (1/3)) can land one pixel above H/3.
    return imresize_fast(hr, size=(h // scale, w // scale)).contiguous()


def score(sr: Tensor, hr: Tensor, scale: int, protocol: Protocol, gray: bool = False) -> tuple[float, float]:
    """(PSNR dB, SSIM) of one SR image against its HR under `protocol`.

    sr: (3, H, W) float, quantized 0..255; hr: (3, H, W) uint8 (prepare_hr); gray: the
    source file had one channel (rgb repeats it). PSNR is inf for identical images."""
    from fastsr.metrics import full_range_luma, psnr_y, ssim_y

    shave = protocol.shave(scale)
    sr, hr = sr.double(), hr.double()
    if protocol.channel == "rgb":
        # One MSE over the three channels (the official calc_psnr); SSIM per channel, averaged.
        crop = (slice(None), slice(shave, sr.shape[-2] - shave), slice(shave, sr.shape[-1] - shave))
        flat = lambda t: t[crop].reshape(1, -1, t.shape[-1] - 2 * shave)
        psnr = float(psnr_y(flat(sr), flat(hr), shave=0))
        ssim = sum(float(ssim_y(sr[c:c + 1], hr[c:c + 1], shave=shave)) for c in range(3)) / 3
        return psnr, ssim
    if gray and protocol.gray_own_channel:
        # One-channel sources: the HR gray itself, the SR's full-range luma (its gray for R=G=B).
        sr, hr = full_range_luma(sr), hr[:1]
    return float(psnr_y(sr, hr, shave=shave)), float(ssim_y(sr, hr, shave=shave))


@dataclass
class ImageScore:
    """One image's result; width/height are the scored (modcropped) HR size."""

    name: str
    width: int
    height: int
    psnr: float
    ssim: float
    seconds: float
    sr: Tensor | None = None  # (3, H, W) float 0..255 quantized, when asked for (keep_sr)

    def as_dict(self) -> dict:
        return {"name": self.name, "width": self.width, "height": self.height, "psnr": self.psnr,
                "ssim": self.ssim, "seconds": self.seconds}


def evaluate_image(sr_fn: Callable[[Tensor], Tensor], rgb: Tensor, scale: int, protocol: str | Protocol = "paper",
                   *, gray: bool = False, name: str = "image", keep_sr: bool = False,
                   synchronize: Callable[[], None] | None = None) -> ImageScore:
    """The protocol on one HR image.

    sr_fn: uint8 LR (1, 3, h, w) -> SR (1, 3, sh, sw) float 0..255, already quantized (the
    network's output through fastsr.metrics.quantize, or MATLAB's uint8 bicubic).
    rgb: (3, H, W) float 0..255 or uint8, the HR image. Timing covers sr_fn only
    (`synchronize`, e.g. torch.cuda.synchronize, runs around it)."""
    import time

    protocol = get_protocol(protocol)
    hr = prepare_hr(rgb, scale, protocol, name)
    lr = make_lr(hr, scale)
    if synchronize:
        synchronize()
    start = time.perf_counter()
    sr = sr_fn(lr[None])
    if synchronize:
        synchronize()
    seconds = time.perf_counter() - start
    sr = sr[0].float()
    if tuple(sr.shape) != tuple(hr.shape):
        raise FastSRError(f"{name}: the upscaler returned {tuple(sr.shape)} for an HR image of {tuple(hr.shape)}")
    psnr, ssim = score(sr, hr, scale, protocol, gray)
    return ImageScore(name, int(hr.shape[-1]), int(hr.shape[-2]), psnr, ssim, seconds, sr if keep_sr else None)


@dataclass
class SetScore:
    """Means over one dataset at one scale. Images with infinite PSNR (SR identical to HR)
    are left out of the PSNR mean and named in `infinite`; SSIM averages every image."""

    dataset: str
    scale: int
    images: list[ImageScore]
    psnr: float
    ssim: float
    infinite: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "scale": self.scale, "psnr": _json_float(self.psnr),
                "ssim": _json_float(self.ssim), "n_images": len(self.images),
                "infinite_psnr": self.infinite, "failed": self.failed,
                "images": [{k: _json_float(v) for k, v in im.as_dict().items()} for im in self.images]}


def _json_float(v):
    # JSON has no inf/nan: strings say what they are.
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def summarize(dataset: str, scale: int, images: Sequence[ImageScore], failed: Sequence[str] = ()) -> SetScore:
    """The dataset means (see SetScore); NaN when no image could be scored."""
    finite = [im.psnr for im in images if math.isfinite(im.psnr)]
    psnr = sum(finite) / len(finite) if finite else (math.inf if images else math.nan)
    ssim = sum(im.ssim for im in images) / len(images) if images else math.nan
    return SetScore(dataset, scale, list(images), psnr, ssim,
                    [im.name for im in images if not math.isfinite(im.psnr)], list(failed))
